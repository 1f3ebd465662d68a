"""One MQTT connection for the fleet tools: requests with transaction ids, retained status and
state topics, and publishing with a wait for the broker's acknowledgements.

Every message is routed by `protocol.parse_topic` and read by protocol's typed parsers, on paho's
network thread; listeners get the parsed topic and the raw payload. Nothing a device (or anyone
with publish rights) sends can raise into paho: a bad topic goes to the bad-topic listeners, a bad
payload is the listener's to report, and a listener that raises anyway is logged with its
traceback by the supervisor's guard while the client goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agents import commands, protocol
from device_agents.config import BrokerConfig
from device_agents.errors import DeviceAgentError
from device_agents.supervise import Supervisor
from device_agents.transport import Message, Transport

log = logging.getLogger("edgefleet.fleet")

ALL_STATUS: Final = protocol.ALL_STATUS
ALL_TELEMETRY: Final = protocol.ALL_TELEMETRY
ALL_RESULTS: Final = protocol.ALL_RESULTS
MAX_RESPONSE_BYTES: Final = 16 << 20  # of a response whose transaction is read from a bad one

Listener = Callable[[protocol.DeviceTopic, bytes], None]
BadTopicListener = Callable[[str, str], None]  # (topic, why it is not one of the contract's)


def device_results(device: str) -> str:
    """The filter of one device's results: `edgefleet/v1/{device}/out/+`."""
    return protocol.Topics(device).outputs


class FleetError(DeviceAgentError):
    """A fleet operation could not be done (broker unreachable, device silent, bad arguments)."""


@dataclass(frozen=True)
class _Listener:
    kind: str
    device: str | None
    name: str | None
    callback: Listener

    def wants(self, where: protocol.DeviceTopic) -> bool:
        return (where.kind == self.kind and self.device in (None, where.device)
                and self.name in (None, where.name))


@dataclass
class StatusScan:
    """The retained statuses seen: the valid ones by device id, and what could not be read: by
    device id (a status that breaks the contract) or by topic (one that names no device)."""

    statuses: dict[str, protocol.Status] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def copy(self) -> StatusScan:
        return StatusScan(dict(self.statuses), dict(self.problems))


class FleetClient:
    def __init__(self, broker: BrokerConfig, name: str = "fleet",
                 sign_key: Ed25519PrivateKey | None = None) -> None:
        # Nothing here starts a thread of ours; the supervisor guards the callbacks paho runs.
        self.supervisor = Supervisor(f"edgefleet-{name}")
        guard = self.supervisor.guard
        self.transport = Transport(broker, f"edgefleet-{name}-{uuid.uuid4().hex[:8]}",
                                   on_message=guard("on_message", self._on_message),
                                   on_published=guard("on_published", self._on_published),
                                   max_inflight=64, quiet_first_connect=True)
        self.sign_key = sign_key  # every request is signed with it (CONTRACT 10) when set
        self._responses: dict[str, queue.Queue[tuple[str, protocol.Response | FleetError]]] = {}
        self._listeners: list[_Listener] = []
        self._bad_topic_listeners: list[BadTopicListener] = []
        self._scan: StatusScan | None = None  # the statuses seen, once `statuses` was asked
        self._unacked: set[int] = set()
        self._acked = threading.Condition()
        self._lock = threading.Lock()

    def __enter__(self) -> FleetClient:
        self.transport.start()
        if not self.transport.wait_connected(10):
            self.transport.stop(1)
            raise FleetError(f"cannot connect to the broker at {self.transport.broker.url}"
                             f"{': ' + self.transport.last_error if self.transport.last_error else ''}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.transport.stop()

    def callback_errors(self) -> dict[str, int]:
        """How often each callback raised (logged with its traceback, then carried on)."""
        return self.supervisor.callback_errors()

    # -- incoming ----------------------------------------------------------------------------

    def listen(self, topic_filter: str, kind: str, callback: Listener, *,
               device: str | None = None, name: str | None = None) -> None:
        """Subscribe to `topic_filter` and call `callback(topic, payload)` for each message of
        that kind (and device, and name after the kind, when given), on paho's thread."""
        guarded = self.supervisor.guard(f"{kind} listener", callback)
        with self._lock:
            self._listeners.append(_Listener(kind, device, name, guarded))
        self.transport.subscribe([topic_filter])

    def on_bad_topic(self, callback: BadTopicListener) -> None:
        """Call `callback(topic, reason)` for every message whose topic is not one of the
        contract's (a wildcard filter lets through a device id no device may have)."""
        with self._lock:
            self._bad_topic_listeners.append(self.supervisor.guard("bad-topic listener", callback))

    def _on_message(self, msg: Message) -> None:
        try:
            where = protocol.parse_topic(msg.topic)
        except protocol.ProtocolError as exc:
            with self._lock:
                bad = list(self._bad_topic_listeners)
            for callback in bad:
                callback(msg.topic, str(exc))
            return
        if where.kind == "response":
            self._on_response(where, msg.payload)
        with self._lock:
            listeners = [lst for lst in self._listeners if lst.wants(where)]
        for listener in listeners:
            listener.callback(where, msg.payload)

    def _on_response(self, where: protocol.DeviceTopic, payload: bytes) -> None:
        answer: protocol.Response | FleetError
        try:
            answer = protocol.parse_response(payload)
            transaction = answer.transaction
        except protocol.ProtocolError as exc:  # tell the waiter now rather than at its timeout
            transaction = protocol.peek_transaction(payload, MAX_RESPONSE_BYTES)
            answer = FleetError(f"{where.device} answered {where.name} with a response that breaks "
                                f"the contract: {exc}")
        waiter = None if transaction is None else self._responses.get(str(transaction))
        if waiter is not None:
            waiter.put((where.device, answer))

    def _on_published(self, mid: int) -> None:
        with self._acked:
            self._unacked.discard(mid)
            self._acked.notify_all()

    # -- outgoing ----------------------------------------------------------------------------

    def request(self, device: str, command: str, args: dict[str, Any] | None = None,
                timeout: float = 30.0) -> protocol.Response:
        """Send a request and wait for its response (matched by transaction id)."""
        answer = self.request_many([device], command, args, timeout)[device]
        if isinstance(answer, FleetError):
            raise answer
        return answer

    def request_many(self, devices: list[str], command: str, args: dict[str, Any] | None = None,
                     timeout: float = 30.0) -> dict[str, protocol.Response | FleetError]:
        """The same request to many devices at once: one round trip for the whole group instead
        of one per device. Each device gets its own response or a FleetError."""
        try:
            topics = {d: protocol.Topics(d) for d in devices}
            requests = {d: (t.request(command), t.response(command)) for d, t in topics.items()}
        except protocol.ProtocolError as exc:
            raise FleetError(str(exc)) from None
        transactions = {uuid.uuid4().hex: device for device in devices}
        waiter: queue.Queue[tuple[str, protocol.Response | FleetError]] = queue.Queue()
        for transaction in transactions:
            self._responses[transaction] = waiter
        try:
            self.transport.subscribe([response for _, response in requests.values()])
            self.transport.wait_subscribed(timeout)
            for transaction, device in transactions.items():
                body = {"transaction": transaction, **(args or {})}
                if self.sign_key is not None:
                    body = commands.sign(self.sign_key, device, command, body)
                self.publish(requests[device][0], protocol.encode(body))
            return self._gather(waiter, transactions, command, timeout)
        finally:
            for transaction in transactions:
                self._responses.pop(transaction, None)

    @staticmethod
    def _gather(waiter: queue.Queue[tuple[str, protocol.Response | FleetError]],
                transactions: dict[str, str], command: str, timeout: float
                ) -> dict[str, protocol.Response | FleetError]:
        """The first answer of each device, from the device it was sent to, until `timeout`."""
        expected = set(transactions.values())
        answers: dict[str, protocol.Response | FleetError] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(expected):
            try:
                device, answer = waiter.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if device in expected:  # a transaction is ours, but anyone may echo one
                answers.setdefault(device, answer)
        for device in transactions.values():
            answers.setdefault(device, FleetError(
                f"{device} did not answer {command} within {timeout:g} s (offline, or not "
                "running edgefleet)"))
        return answers

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        mid = self.transport.publish(topic, payload, qos=1, retain=retain)
        if mid is not None:
            with self._acked:
                self._unacked.add(mid)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until the broker acknowledged everything published so far."""
        with self._acked:
            return self._acked.wait_for(lambda: not self._unacked, timeout)

    # -- retained statuses -------------------------------------------------------------------

    def statuses(self, wait_s: float = 1.0) -> StatusScan:
        """Every device's retained status (and the later ones), after listening `wait_s`
        seconds the first time and `wait_s` more at each later call."""
        with self._lock:
            first = self._scan is None
            if first:
                self._scan = StatusScan()
        if first:
            self.on_bad_topic(self._on_bad_status_topic)
            self.listen(ALL_STATUS, "status", self._on_status)
        time.sleep(wait_s)
        with self._lock:
            assert self._scan is not None
            return self._scan.copy()

    def devices(self, wait_s: float = 1.0) -> dict[str, dict[str, Any]]:
        """Every device's valid retained status as a JSON object, by device id (those that
        break the contract are logged and left out)."""
        scan = self.statuses(wait_s)
        for who, reason in scan.problems.items():
            log.warning("ignoring the status of %s: %s", who, reason)
        return {d: msgspec.to_builtins(s) for d, s in scan.statuses.items()}

    def _on_status(self, where: protocol.DeviceTopic, payload: bytes) -> None:
        status: protocol.Status | None = None
        reason: str | None = None
        if payload:  # else a cleared retained status: the device is gone
            try:
                status = protocol.parse_status(payload)
            except protocol.ProtocolError as exc:
                reason = str(exc)
        with self._lock:
            assert self._scan is not None
            self._scan.statuses.pop(where.device, None)
            self._scan.problems.pop(where.device, None)
            if status is not None:
                self._scan.statuses[where.device] = status
            elif reason is not None:
                self._scan.problems[where.device] = reason

    def _on_bad_status_topic(self, topic: str, reason: str) -> None:
        with self._lock:
            assert self._scan is not None
            if len(self._scan.problems) < protocol.MAX_ITEMS:  # a flood of them stays bounded
                self._scan.problems[topic] = reason
