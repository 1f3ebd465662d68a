"""One direction of one proxied TCP connection: delay, jitter, pacing and loss, in order.

Bytes read from one side are cut into pieces, each given a release time (when the shaper has sent
it at the capped rate, plus the one-way delay), and written to the other side at that time by one
timer per direction. Release times never go backwards, so a connection keeps its byte order as
TCP does, whatever the jitter. The pipe holds a bounded amount: past `high_water` it pauses
reading its source, so a bulk sender feels the cap through TCP flow control instead of filling
the emulator's memory.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Final

TCP_MSS: Final = 1460
HEADER_BYTES: Final = 40  # IPv4 + TCP per segment: the cap counts bytes on the wire
MIN_RTO_S: Final = 0.2  # Linux's minimum retransmission timeout
PACING_S: Final = 0.002  # with a cap, pieces of about this much air time are released at once
EOF: Final = b""  # queued marker: the source closed its sending side (FIN)
# asyncio's epoll waits are rounded up to whole milliseconds, so a timer fires up to 1 ms late.
# Aiming half a millisecond early, and releasing what is due within that half millisecond,
# centres the error on zero instead of adding 0.5 ms on average to every hop.
TIMER_SLACK_S: Final = 0.0005


@dataclass(frozen=True, slots=True)
class Direction:
    """How one direction shapes traffic (see LinkProfile for the meaning of the figures)."""

    one_way_s: float
    jitter_s: float = 0.0
    bytes_per_s: float | None = None
    loss: float = 0.0
    rto_s: float = MIN_RTO_S

    @property
    def passthrough(self) -> bool:
        return (self.one_way_s == 0 and self.jitter_s == 0 and self.bytes_per_s is None
                and self.loss == 0)

    def wire_seconds(self, n: int) -> float:
        assert self.bytes_per_s is not None
        return (n + HEADER_BYTES * math.ceil(n / TCP_MSS)) / self.bytes_per_s


class Gate:
    """Whether the link carries traffic now: shared by every pipe of one emulator."""

    def __init__(self) -> None:
        self.blackholed = False


class Pipe:
    """Carries the bytes of one connection in one direction."""

    def __init__(self, loop: asyncio.AbstractEventLoop, shape: Direction, gate: Gate,
                 rng: random.Random, *, not_before: float = 0.0,
                 high_water: int = 64 * 1024) -> None:
        self.loop = loop
        self.shape = shape
        self.gate = gate
        self.rng = rng
        self.not_before = not_before  # e.g. the TCP handshake's round trip
        self.high_water = high_water
        self.src: asyncio.Transport | None = None  # paused when too much is held
        self.dst: asyncio.Transport | None = None  # None until the far side is connected
        self.dst_closed_its_side = False  # the destination sent EOF itself: close, don't half-close
        self.delivered = 0  # payload bytes written to dst
        self._queue: deque[tuple[float, bytes]] = deque()
        self._held = 0
        self._free_at = 0.0
        self._last_release = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._dst_paused = False
        self._src_paused = False
        self.finished = False  # EOF delivered, or the pipe was dropped

    @property
    def held_bytes(self) -> int:
        return self._held

    def push(self, data: bytes) -> None:
        """Accept bytes from the source; they are released to dst in order, when due."""
        if self.finished:
            return
        now = self.loop.time()
        shape = self.shape
        if (shape.passthrough and not self._queue and self.dst is not None and not self._dst_paused
                and not self.gate.blackholed and now >= self.not_before):
            self.dst.write(data)  # nothing to emulate: no timer, no copy
            self.delivered += len(data)
            return
        if shape.bytes_per_s is None:
            self._enqueue(now, now, data)
        else:
            step = max(TCP_MSS, int(shape.bytes_per_s * PACING_S))
            for i in range(0, len(data), step):
                piece = data[i:i + step]
                self._free_at = max(now, self._free_at) + shape.wire_seconds(len(piece))
                self._enqueue(now, self._free_at, piece)
        if self._held > self.high_water and self.src is not None and not self._src_paused:
            self._src_paused = True
            self.src.pause_reading()
        self._schedule()

    def push_eof(self) -> None:
        """The source closed its sending side: the FIN travels behind its last bytes."""
        if self.finished:
            return
        now = self.loop.time()
        self._enqueue(now, max(now, self._free_at), EOF)
        self._schedule()

    def _enqueue(self, now: float, sent: float, piece: bytes) -> None:
        shape = self.shape
        delay = shape.one_way_s
        if shape.jitter_s:
            delay = max(0.0, delay + self.rng.uniform(-shape.jitter_s / 2, shape.jitter_s / 2))
        if shape.loss and piece:
            segments = math.ceil(len(piece) / TCP_MSS)
            if self.rng.random() < 1 - (1 - shape.loss) ** segments:
                delay += shape.rto_s  # a lost segment: the receiver sees it one RTO later
        release = max(sent + delay, self._last_release, self.not_before)
        self._last_release = release
        self._queue.append((release, piece))
        self._held += len(piece)

    def connect(self, dst: asyncio.Transport) -> None:
        """The destination is connected: start delivering what was held for it."""
        self.dst = dst
        self._schedule()

    def pause_writing(self) -> None:
        self._dst_paused = True
        self._cancel_timer()

    def resume_writing(self) -> None:
        self._dst_paused = False
        self._schedule()

    def hold(self) -> None:
        """The link is blackholed: deliver nothing until `release_held`."""
        self._cancel_timer()

    def release_held(self) -> None:
        """The link is back: what was held arrives one one-way delay from now, in order."""
        earliest = self.loop.time() + self.shape.one_way_s
        if self._queue and self._queue[0][0] < earliest:
            self._queue = deque((max(t, earliest), piece) for t, piece in self._queue)
            self._last_release = max(self._last_release, earliest)
        self._schedule()

    def drop(self) -> None:
        """Forget everything held (the connection is gone)."""
        self._cancel_timer()
        self._queue.clear()
        self._held = 0
        self.finished = True

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        if (self._timer is None and self._queue and self.dst is not None and not self._dst_paused
                and not self.gate.blackholed and not self.finished):
            self._timer = self.loop.call_at(self._queue[0][0] - TIMER_SLACK_S, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self.dst is None or self.gate.blackholed:
            return
        if self.dst.is_closing():  # the far side is gone: what is held has nowhere to go
            self.drop()
            return
        now = self.loop.time() + TIMER_SLACK_S
        queue, dst = self._queue, self.dst
        while queue and queue[0][0] <= now and not self._dst_paused:
            _, piece = queue.popleft()
            if not piece:  # EOF
                self._deliver_eof(dst)
                return
            if dst.is_closing():  # the write before this one found the peer gone
                self.drop()
                return
            dst.write(piece)
            self._held -= len(piece)
            self.delivered += len(piece)
        if self._src_paused and self._held <= self.high_water // 2 and self.src is not None:
            self._src_paused = False
            self.src.resume_reading()
        self._schedule()

    def _deliver_eof(self, dst: asyncio.Transport) -> None:
        self.finished = True
        self._queue.clear()
        self._held = 0
        if self.dst_closed_its_side or not dst.can_write_eof():
            dst.close()
        else:
            dst.write_eof()
