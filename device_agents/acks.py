"""In-order acknowledgement of received QoS 1 messages.

MQTT requires PUBACKs in the order the messages came; the agent answers them in whatever order
their answers become durable (a batch, an error, a request). The broker holds back new messages
once `max_inflight_messages` are unacknowledged, so one message without an end stalls its whole
connection: every message registered here must reach `done` exactly once (its answer durable, or
refused for good), or the connection must be dropped so the broker redelivers (`reset`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Protocol

log = logging.getLogger("edgefleet.acks")


class _Acker(Protocol):
    def ack(self, mid: int, qos: int, generation: int) -> None: ...


class _Received(Protocol):
    mid: int
    qos: int
    generation: int


class AckSequencer:
    """Acknowledges QoS 1 messages in arrival order, as each one's answer becomes durable.

    `register` runs on paho's network thread, inside its callback; `done` calls into paho. So the
    lock `register` takes is never held while calling paho (that would deadlock against paho's
    own locks); a second lock, which the network thread never takes, keeps the sends in order.
    """

    def __init__(self, transport: _Acker) -> None:
        self.transport = transport
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._order: dict[int, list[Any]] = {}  # token -> [mid, qos, generation, done, since]
        self._tokens = itertools.count()
        self._next = 0
        self._progress = time.monotonic()  # when the head of the order last moved

    def register(self, msg: _Received) -> int:
        with self._lock:
            token = next(self._tokens)
            self._order[token] = [msg.mid, msg.qos, msg.generation, False, time.monotonic()]
            return token

    def done(self, token: int) -> None:
        with self._send_lock:
            ready = []
            with self._lock:
                entry = self._order.get(token)
                if entry is None:
                    return
                entry[3] = True
                while self._next in self._order and self._order[self._next][3]:
                    ready.append(self._order.pop(self._next))
                    self._next += 1
                if ready:
                    self._progress = time.monotonic()
            for mid, qos, generation, _, _ in ready:
                try:  # each ack is sent, whatever one of them meets
                    self.transport.ack(mid, qos, generation)
                except Exception:
                    log.exception("acknowledging message %d failed", mid)

    def waiting(self) -> int:
        """Messages registered and not yet acknowledged (a stalled sequence shows here)."""
        with self._lock:
            return len(self._order)

    def oldest_wait_s(self) -> float:
        """How long the order has been stuck: the message at its head waiting for its answer,
        with no acknowledgement going out meanwhile. Every later acknowledgement waits behind
        it, so a long wait is a stalled connection (a long backlog that moves is not)."""
        with self._lock:
            head = self._order.get(self._next)
            if head is None:
                return 0.0
            since: float = max(head[4], self._progress)
            return time.monotonic() - since

    def reset(self) -> None:
        """A new connection: the broker redelivers what was not acknowledged on the old one."""
        with self._lock:
            self._next = next(self._tokens) + 1
            self._order.clear()
