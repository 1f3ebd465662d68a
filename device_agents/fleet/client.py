"""One MQTT connection for the fleet tools: requests with transaction ids, retained status and
state topics, and publishing with a wait for the broker's acknowledgements."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from device_agents import protocol
from device_agents.config import BrokerConfig
from device_agents.errors import DeviceAgentError
from device_agents.transport import Message, Transport

Listener = Callable[[str, Any], None]


class FleetError(DeviceAgentError):
    """A fleet operation could not be done (broker unreachable, device silent, bad arguments)."""


class FleetClient:
    def __init__(self, broker: BrokerConfig, name: str = "fleet") -> None:
        self.transport = Transport(broker, f"edgefleet-{name}-{uuid.uuid4().hex[:8]}",
                                   on_message=self._on_message, on_published=self._on_published,
                                   max_inflight=64)
        self._responses: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._listeners: list[tuple[str, Listener]] = []  # topic prefix -> callback(topic, doc)
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

    # -- incoming ----------------------------------------------------------------------------

    def listen(self, topic_filter: str, prefix: str, callback: Listener) -> None:
        with self._lock:
            self._listeners.append((prefix, callback))
        self.transport.subscribe([topic_filter])

    def _on_message(self, msg: Message) -> None:
        try:
            doc = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            return
        if "/response/" in msg.topic and isinstance(doc, dict):
            waiter = self._responses.get(str(doc.get("transaction")))
            if waiter is not None:
                waiter.put(doc)
        with self._lock:
            listeners = list(self._listeners)
        for prefix, callback in listeners:
            if msg.topic.startswith(prefix):
                callback(msg.topic, doc)

    def _on_published(self, mid: int) -> None:
        with self._acked:
            self._unacked.discard(mid)
            self._acked.notify_all()

    # -- outgoing ----------------------------------------------------------------------------

    def request(self, device: str, command: str, args: dict[str, Any] | None = None,
                timeout: float = 30.0) -> dict[str, Any]:
        """Send a request and wait for its response (matched by transaction id)."""
        answer = self.request_many([device], command, args, timeout)[device]
        if isinstance(answer, FleetError):
            raise answer
        return answer

    def request_many(self, devices: list[str], command: str, args: dict[str, Any] | None = None,
                     timeout: float = 30.0) -> dict[str, dict[str, Any] | FleetError]:
        """The same request to many devices at once: one round trip for the whole group instead
        of one per device. Each device gets its own response or a FleetError."""
        transactions = {uuid.uuid4().hex: device for device in devices}
        waiter: queue.Queue[dict[str, Any]] = queue.Queue()
        for transaction in transactions:
            self._responses[transaction] = waiter
        try:
            self.transport.subscribe([protocol.Topics(d).response(command) for d in devices])
            self.transport.wait_subscribed(timeout)
            for transaction, device in transactions.items():
                self.publish(protocol.Topics(device).request(command),
                             protocol.encode({"transaction": transaction, **(args or {})}))
            answers: dict[str, dict[str, Any] | FleetError] = {}
            deadline = time.monotonic() + timeout
            while len(answers) < len(transactions):
                try:
                    doc = waiter.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                device = transactions.get(str(doc.get("transaction")), "")
                if device:
                    answers.setdefault(device, doc)
            for device in devices:
                answers.setdefault(device, FleetError(
                    f"{device} did not answer {command} within {timeout:g} s (offline, or not "
                    "running edgefleet)"))
            return answers
        finally:
            for transaction in transactions:
                self._responses.pop(transaction, None)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        mid = self.transport.publish(topic, payload, qos=1, retain=retain)
        if mid is not None:
            with self._acked:
                self._unacked.add(mid)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until the broker acknowledged everything published so far."""
        with self._acked:
            return self._acked.wait_for(lambda: not self._unacked, timeout)

    def devices(self, wait_s: float = 1.0) -> dict[str, dict[str, Any]]:
        """Every device's retained status, by device id."""
        seen: dict[str, dict[str, Any]] = {}

        def on_status(topic: str, doc: Any) -> None:
            if isinstance(doc, dict):
                seen[topic.split("/")[2]] = doc

        self.listen(f"{protocol.ROOT}/+/status", f"{protocol.ROOT}/", on_status)
        time.sleep(wait_s)
        return seen
