"""Requests (CONTRACT 5.4) routed by a table of command name -> handler.

Every handler returns the response's `data`; any error it raises becomes `status: "error"` with
the message, so a bad request never reaches the agent's loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec

log = logging.getLogger("edgefleet.requests")

Handler = Callable[[dict[str, Any]], Any]


class RequestError(Exception):
    """A request that cannot be honoured; the message goes back to the caller."""


class Router:
    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def add(self, command: str, handler: Handler) -> None:
        self.handlers[command] = handler

    def handle(self, command: str, payload: bytes) -> tuple[Any, str, Any, str | None]:
        """-> (transaction, status, data, error) for the response."""
        transaction = None
        try:
            args = msgspec.json.decode(payload) if payload else {}
            if not isinstance(args, dict):
                raise RequestError("a request is a JSON object")
            transaction = args.get("transaction")
            handler = self.handlers.get(command)
            if handler is None:
                raise RequestError(f"unknown command {command!r}; known: "
                                   f"{', '.join(sorted(self.handlers))}")
            return transaction, "ok", handler(args), None
        except msgspec.DecodeError as exc:
            return transaction, "error", None, f"request is not valid JSON: {exc}"
        except Exception as exc:  # every handler error becomes an error response
            if not isinstance(exc, RequestError):
                log.warning("request %s failed: %r", command, exc)
            return transaction, "error", None, str(exc) or type(exc).__name__
