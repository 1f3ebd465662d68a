"""Requests to the agent (CONTRACT 5.4): the request worker and the agent's own handlers.

Every request on `request/+` ends in exactly one response, then its acknowledgement: a bad
command name, a payload that is not a request, a handler that fails, a full queue and a
response topic no broker takes (an MQTT 5 ResponseTopic with wildcards falls back to the
contract's own) each get an error response, never silence. The response goes through the disk
outbox like a result, and the request is acknowledged once it is durable: a crash in between
leaves the request with the broker, which delivers it again.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import Any

from device_agents import protocol
from device_agents.commands import CommandGuard, UnauthorizedError
from device_agents.intake import IDLE_BEAT_S, message_size
from device_agents.outbox import Outbox
from device_agents.protocol import ProtocolError, Topics
from device_agents.queues import BudgetFull, ByteBudgetQueue
from device_agents.router import RequestError, Router
from device_agents.transport import Message
from runtime.errors import EdgefleetError

log = logging.getLogger("edgefleet.requests")

QUEUE_REQUESTS = 256
QUEUE_BYTES = 16 << 20


class RequestWorker:
    def __init__(self, router: Router, topics: Topics, outbox: Outbox, max_bytes: int,
                 handled: Callable[[Message], None], unstored: Callable[[Message], None],
                 beat: Callable[[], None] = lambda: None,
                 fits: Callable[[str, bytes], bool] = lambda topic, payload: True,
                 guard: CommandGuard | None = None) -> None:
        self.router, self.topics, self.outbox = router, topics, outbox
        self.guard = guard  # signed commands (CONTRACT 10); None: every command is obeyed
        self.max_bytes, self.handled, self.unstored, self.beat = max_bytes, handled, unstored, beat
        self.fits = fits  # whether the uplink's broker takes a message this size
        self.queue: ByteBudgetQueue[Message] = ByteBudgetQueue(QUEUE_REQUESTS, QUEUE_BYTES,
                                                               message_size)
        self._stopping = False
        self.refused = 0  # response topics no broker would take (the next one was used)

    def offer(self, msg: Message) -> None:
        """paho's thread: queue the request, or answer it as busy at once."""
        try:
            self.queue.put_nowait(msg)
        except BudgetFull as exc:
            self._answer(msg, protocol.peek_transaction(msg.payload, self.max_bytes), "error",
                         None, f"overloaded: the request queue is full ({exc}); try again")

    def stop(self) -> None:
        self._stopping = True
        self.queue.put_nowait(None)

    def loop(self) -> None:
        while not self._stopping:
            self.beat()
            try:
                msg = self.queue.get(IDLE_BEAT_S)
            except queue.Empty:
                continue
            if msg is None:
                continue
            try:
                self.handle(msg)
            except Exception as exc:  # still one answer, and the acknowledgement after it
                log.exception("unexpected failure handling %s", msg.topic[:120])
                self._answer(msg, None, "error", None, f"internal error: {exc!r}")

    def handle(self, msg: Message) -> None:
        if msg.stale:  # the broker delivers it again on the new connection: answer that copy
            log.info("skipping %s from an earlier connection", msg.topic[:120])
            return
        command = self.topics.command_of(msg.topic) or ""
        try:
            if msg.oversize:
                raise ProtocolError(protocol.BAD_REQUEST, f"request of {msg.oversize} bytes is "
                                    f"over the {self.max_bytes}-byte limit")
            transaction, args = protocol.parse_request(msg.payload, self.max_bytes)
            if msg.correlation_data and len(msg.correlation_data) > protocol.MAX_CORRELATION:
                raise ProtocolError(protocol.BAD_REQUEST, f"correlation data of "
                                    f"{len(msg.correlation_data)} bytes is over the "
                                    f"{protocol.MAX_CORRELATION}-byte limit")
        except ProtocolError as exc:
            self._answer(msg, protocol.peek_transaction(msg.payload, self.max_bytes), "error",
                         None, str(exc))
            return
        if self.guard is not None:
            try:
                args = self.guard.check(command, args)
            except UnauthorizedError as exc:
                log.warning("refused %s: %s", msg.topic[:120], exc)
                self._answer(msg, transaction, "error", None, exc.as_error())
                return
        status, data, error = self.router.handle(command, args)
        self._answer(msg, transaction, status, data, error)

    def _answer(self, msg: Message, transaction: Any, status: str, data: Any,
                error: str | dict[str, str] | None) -> None:
        """Put the response in the outbox (for the MQTT 5 response topic when it is one a broker
        takes); the request is acknowledged once it is durable."""
        try:
            payload = protocol.response(transaction, status, data, error)
        except Exception as exc:  # data the encoder refuses: still one answer
            log.exception("response to %s could not be encoded", msg.topic[:120])
            payload = protocol.response(transaction, "error", None, f"internal error: {exc!r}")

        topic = self._response_topic(msg)
        if not self.fits(topic, payload):
            payload = protocol.response(transaction, "error", None, f"the response ({len(payload)} "
                                        "bytes) is over the broker's maximum packet size")

        def durable(stored: bool) -> None:
            (self.handled if stored else self.unstored)(msg)

        correlation = msg.correlation_data
        if correlation and len(correlation) > protocol.MAX_CORRELATION:
            correlation = None  # refused above; never stored
        self.outbox.put(topic, payload, qos=1, on_durable=durable, correlation=correlation)

    def _response_topic(self, msg: Message) -> str:
        """Where the response goes: the caller's MQTT 5 response topic when a broker takes it,
        else the contract's response/{command}, or for a command name no topic may hold, the
        error topic."""
        if msg.response_topic:
            try:
                return protocol.check_response_topic(msg.response_topic, self.topics.device_id)
            except ProtocolError as exc:
                self.refused += 1
                log.warning("response topic of %s refused: %s", msg.topic[:120], exc)
        try:
            return self.topics.response(self.topics.command_of(msg.topic) or "")
        except ProtocolError:
            return self.topics.error


def add_agent_requests(router: Router, agent: Any) -> None:
    """The agent's own commands: ping, models, config, telemetry and rollback."""
    router.add("ping", lambda args: {"pong": True, "epoch": agent.epoch, "ts": protocol.now()})
    router.add("models", lambda args: models(agent))
    router.add("config", lambda args: agent.config.redacted())
    router.add("telemetry", lambda args: agent.telemetry())
    router.add("rollback", lambda args: rollback(agent, protocol.parse_rollback(args)))


def models(agent: Any) -> list[dict[str, Any]]:
    serving = {m["name"]: m for m in agent.inference.models_summary()}
    out = []
    for installed in agent.store.active():
        entry = agent.store.entry(installed.name)
        out.append({"name": installed.name, "active": entry.get("active"),
                    "previous": entry.get("previous"),
                    "serving": serving.get(installed.name, {}).get("version")})
    return out


def rollback(agent: Any, name: str) -> dict[str, Any]:
    """Back to the previous version, loaded and verified before it is recorded as active: one
    that no longer verifies (its key left trusted_keys) leaves everything as it was."""
    previous = agent.store.entry(name).get("previous")
    try:
        if previous:
            model = agent.inference.load(agent.store.verify(agent.store.path(name, previous)))
        version = agent.store.rollback(name, previous)  # raises: nothing to go back to
    except EdgefleetError as exc:
        raise RequestError(str(exc)) from exc
    agent.inference.activate(model, agent.streams.get(name))
    return {"model": name, "active": version}
