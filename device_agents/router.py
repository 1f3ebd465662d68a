"""Requests (CONTRACT 5.4) routed by a table of command name -> handler.

Every handler returns the response's `data`; any error it raises becomes `status: "error"` with
the message, so a bad request never reaches the agent's loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from device_agents.protocol import ProtocolError

log = logging.getLogger("edgefleet.requests")

Handler = Callable[[dict[str, Any]], Any]


class RequestError(Exception):
    """A request that cannot be honoured; the message goes back to the caller."""


class Router:
    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def add(self, command: str, handler: Handler) -> None:
        self.handlers[command] = handler

    def handle(self, command: str, args: dict[str, Any]) -> tuple[str, Any, str | None]:
        """-> (status, data, error) for the response to parsed arguments."""
        try:
            handler = self.handlers.get(command)
            if handler is None:
                raise RequestError(f"unknown command {command[:64]!r}; known: "
                                   f"{', '.join(sorted(self.handlers))}")
            return "ok", handler(args), None
        except (RequestError, ProtocolError) as exc:
            return "error", None, str(exc)
        except Exception as exc:  # every handler error becomes an error response
            log.warning("request %s failed: %r", command[:64], exc)
            return "error", None, str(exc) or type(exc).__name__
