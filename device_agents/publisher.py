"""The publisher pump: outbox rows -> the uplink, in order, at most a window in flight.

Rows leave the outbox only when the broker acknowledged them (PUBACK). Two threads pump: the
outbox's writer right after each commit (fresh results go out with no thread switch), and the
publisher thread on PUBACKs that free the window, reconnects and backlog. One lock keeps one
order. A row that paho or the contract refuses for good (a topic no broker accepts, a payload
over the limits) is dead-lettered: deleted, counted, reported on the `event` topic, never
retried, so it cannot hold back every row behind it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from device_agents import protocol
from device_agents.outbox import Outbox
from device_agents.transport import PublishRefusedError, Transport

log = logging.getLogger("edgefleet.publisher")

PUBLISH_WINDOW = 64  # results handed to paho and not yet acknowledged by the broker
# PUBACK reasons that say "not now" (quota exceeded, packet identifier in use): published again
RETRY_REASONS = ("Quota exceeded", "Packet identifier in use")


class Publisher:
    def __init__(self, outbox: Outbox, transport: Transport, topics: protocol.Topics,
                 window: int = PUBLISH_WINDOW, beat: Callable[[], None] = lambda: None) -> None:
        self.outbox, self.transport, self.topics, self.window = outbox, transport, topics, window
        self.beat = beat
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._published: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._refused: dict[int, str] = {}  # mid -> the broker's reason, for the next pump
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # mid -> outbox row id, handed to paho, no PUBACK yet
        self._last_row = 0  # the last outbox row handed to paho
        self._backlog = True  # rows may wait for the window: PUBACKs wake the publisher
        self.dead_letters = 0
        self._last_dead_log = self._last_dead_event = -1.0

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def loop(self) -> None:
        """The publisher thread: pumps on PUBACKs, reconnects and backlog."""
        while not self._stop.is_set():
            self.beat()
            self._wake.wait(0.2)
            self._wake.clear()
            self.pump()

    def on_published(self, mid: int) -> None:
        """PUBACK (paho's thread): the row can leave the outbox, and the window has room.

        The publisher is woken only when rows wait for that room. Otherwise the PUBACK is taken
        up by the next commit's pump (its row deleted in that same transaction) or by the
        publisher's next tick: waking a thread for each PUBACK cost one thread switch per result.
        """
        self._published.put(mid)
        if self._backlog:
            self._wake.set()

    def on_refused(self, mid: int, reason: str) -> None:
        """A PUBACK with a failure reason (MQTT 5: not authorized, quota exceeded, payload
        format): the broker will not take the row, so it goes as a dead letter, reported."""
        self._refused[mid] = reason
        self.on_published(mid)

    def after_commit(self) -> None:
        """On the outbox's writer thread, right after a commit: the rows just made durable go
        to paho from here. Waking the publisher thread instead cost one more thread switch, and
        GIL wait, on every result's way out."""
        try:
            self.pump()
        except Exception:  # the writer must go on committing; the publisher retries
            log.exception("publishing after a commit failed")
            self._wake.set()

    def pump(self) -> None:
        """Let acknowledged rows go, then hand paho the next rows the window has room for."""
        with self._lock:
            inflight = self._inflight
            while True:
                try:
                    mid = self._published.get_nowait()
                except queue.Empty:
                    break
                row_id = inflight.pop(mid, None)
                reason = self._refused.pop(mid, None)
                if row_id is not None:
                    if reason is None:
                        self.outbox.ack(row_id)
                    elif reason in RETRY_REASONS:  # from this row on, again
                        self._last_row = min(self._last_row, row_id - 1)
                    else:
                        self._dead_letter(row_id, f"row {row_id}", f"the broker refused it: {reason}",
                                          report=True)
            if not self.transport.connected:
                return
            room = self.window - len(inflight)
            self._backlog = True  # until shown otherwise: more rows than room, or paho refused
            if room <= 0:
                return
            rows = self.outbox.take(self._last_row, room)
            for row in rows:
                try:
                    sent = self.transport.publish(
                        row.topic, row.payload, qos=row.qos, retain=row.retain,
                        properties=None if row.correlation is None
                        else {"CorrelationData": row.correlation})
                except PublishRefusedError as exc:
                    self._dead_letter(row.id, row.topic, str(exc), report=row.topic != self.topics.event)
                    self._last_row = row.id
                    continue
                if sent is None:  # not now (paho's queue is full, the link just went)
                    return
                self._last_row = row.id
                if row.qos == 0:
                    self.outbox.ack(row.id)
                else:
                    inflight[sent] = row.id
            self._backlog = len(rows) >= room

    def _dead_letter(self, row_id: int, topic: str, reason: str, report: bool) -> None:
        """Delete and count the row; with `report`, say so on `event`. A refused event is never
        reported by another event (a broker refusing the event topic would make that a loop)."""
        self.dead_letters += 1
        now = time.monotonic()
        if now - self._last_dead_log >= 1.0:  # a storm of them must not flood the log (and disk)
            self._last_dead_log = now
            log.error("outbox row %d to %r can never be published (%s): dead-lettered "
                      "(%d so far)", row_id, topic[:120], reason, self.dead_letters)
        self.outbox.dead_letter(row_id)
        if report and now - self._last_dead_event >= 1.0:
            self._last_dead_event = now
            self.outbox.put(self.topics.event, protocol.event(
                "dead_letter", topic=topic[:protocol.MAX_ID], reason=reason[:protocol.MAX_TEXT],
                count=self.dead_letters), qos=1)
