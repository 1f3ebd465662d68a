"""The link emulator: a TCP proxy whose connections behave like a radio link.

`Link` is the asyncio core (one per listening address); `LinkEmulator` runs one in a background
thread for synchronous code such as tests, benchmarks and paho clients. Both can cut the link
(`blackhole`: bytes and new connections stall, as behind a dead radio, until restored or until
the peers' own timeouts give up; `reset`: every connection is closed at once and new ones are
refused) and restore it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

from device_agents.errors import LinkError
from device_agents.linkem.pipe import MIN_RTO_S, Direction, Gate, Pipe
from device_agents.linkem.profiles import LinkProfile

CutMode = Literal["blackhole", "reset"]
CUT_MODES: tuple[CutMode, ...] = ("blackhole", "reset")
T = TypeVar("T")


@dataclass(slots=True)
class LinkStats:
    """Counters since the emulator started; `outage_s` includes an outage still going on."""

    profile: str
    bytes_up: int = 0  # client -> upstream, delivered
    bytes_down: int = 0  # upstream -> client, delivered
    connections: int = 0  # accepted from clients
    active: int = 0
    refused: int = 0  # accepted while the link was reset-cut, closed at once
    upstream_failures: int = 0  # the upstream address did not accept
    resets: int = 0  # connections closed by a reset cut
    outages: int = 0
    outage_s: float = 0.0
    state: str = "up"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.profile}: up {self.bytes_up} B, down {self.bytes_down} B, "
                f"{self.connections} connections ({self.active} open, {self.refused} refused, "
                f"{self.resets} reset), {self.outages} outages, {self.outage_s:.1f} s in outage")


def directions(profile: LinkProfile) -> tuple[Direction, Direction]:
    """(up, down) shaping for a profile."""
    one_way = profile.rtt_ms / 2000
    jitter = profile.jitter_ms / 1000
    # What a lost segment costs: Linux's RTO is srtt + 4 x rttvar, at least 200 ms.
    rto = max(MIN_RTO_S, profile.rtt_ms / 1000 + 4 * jitter)

    def one(mbps: float | None) -> Direction:
        rate = None if mbps is None else mbps * 1e6 / 8
        return Direction(one_way, jitter, rate, profile.loss, rto)

    return one(profile.up_mbps), one(profile.down_mbps)


class _Side(asyncio.Protocol):
    """asyncio callbacks of one socket of a proxied connection, handed to its _Connection."""

    def __init__(self, conn: _Connection, upstream: bool) -> None:
        self.conn = conn
        self.upstream = upstream
        self.inbound, self.outbound = ((conn.down, conn.up) if upstream else (conn.up, conn.down))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.set_write_buffer_limits(high=64 * 1024)
        self.inbound.src = transport
        if not self.upstream:
            self.conn.client_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inbound.push(data)

    def eof_received(self) -> bool:
        self.outbound.dst_closed_its_side = True
        self.inbound.push_eof()
        return True  # keep the other direction open: a half-close travels like any byte

    def pause_writing(self) -> None:
        self.outbound.pause_writing()

    def resume_writing(self) -> None:
        self.outbound.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.side_lost(self.upstream, exc)


class _Connection:
    def __init__(self, link: Link) -> None:
        self.link = link
        loop = link.loop
        up_shape, down_shape = link.shapes
        now = loop.time()
        # Data cannot leave before the TCP handshake's round trip over the link.
        handshake = now + 2 * up_shape.one_way_s
        self.up = Pipe(loop, up_shape, link.gate, link.rng, not_before=handshake,
                       high_water=link.high_water(up_shape))
        self.down = Pipe(loop, down_shape, link.gate, link.rng, high_water=link.high_water(down_shape))
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.connecting = False
        self.closed = False
        self.counted = False

    def client_made(self, transport: asyncio.Transport) -> None:
        self.client = transport
        self.down.dst = transport
        link = self.link
        link.stats.connections += 1
        if link.cut_mode == "reset":
            link.stats.refused += 1
            self.closed = True
            transport.abort()
            return
        link.conns.add(self)
        self.counted = True
        link.stats.active += 1
        if link.cut_mode is None:
            self.open_upstream()
        # blackholed: the upstream connection opens when the link is restored, as a SYN would

    def open_upstream(self) -> None:
        if self.connecting or self.upstream is not None or self.closed:
            return
        self.connecting = True
        self.link.loop.create_task(self._open_upstream())

    async def _open_upstream(self) -> None:
        host, port = self.link.upstream
        try:
            transport, _ = await self.link.loop.create_connection(lambda: _Side(self, True), host, port)
        except OSError:
            self.link.stats.upstream_failures += 1
            self.abort()
            return
        assert isinstance(transport, asyncio.Transport)
        if self.closed:
            transport.abort()
            return
        self.upstream = transport
        self.up.connect(transport)

    def side_lost(self, upstream: bool, exc: Exception | None) -> None:
        if upstream:
            self.upstream = None
            self.down.src = None
            self.up.drop()
            if exc is not None:  # a reset travels to the client like a byte, after the delay
                self.down.push_eof()
        else:
            self.client = None
            self.up.src = None
            self.down.drop()
            if self.upstream is None and not self.connecting:
                self.up.drop()  # the client gave up before its SYN got through: nothing to send
            elif exc is not None:
                self.up.push_eof()
        if self.client is None and (self.upstream is None or self.up.finished):
            self._forget()

    def abort(self) -> None:
        self.closed = True
        self.up.drop()
        self.down.drop()
        for transport in (self.client, self.upstream):
            if transport is not None:
                transport.abort()
        self._forget()

    def _forget(self) -> None:
        self.closed = True
        if self.counted:
            self.counted = False
            self.link.stats.active -= 1
            self.link.stats.bytes_up += self.up.delivered
            self.link.stats.bytes_down += self.down.delivered
            self.up.delivered = self.down.delivered = 0
        self.link.conns.discard(self)


class Link:
    """The asyncio core of the emulator: listens, shapes, cuts and restores.

    Example (inside a running event loop):
        link = Link(("127.0.0.1", 1883), PROFILES["lte"])
        await link.start()            # link.address is where clients connect
        link.cut("blackhole"); ...; link.restore()
        await link.close()
    """

    def __init__(self, upstream: tuple[str, int], profile: LinkProfile,
                 listen: tuple[str, int] = ("127.0.0.1", 0), seed: int | None = None) -> None:
        self.upstream = upstream
        self.listen = listen
        self.profile = profile
        self.shapes = directions(profile)
        self.rng = random.Random(seed)
        self.gate = Gate()
        self.conns: set[_Connection] = set()
        self.stats = LinkStats(profile.name)
        self.cut_mode: CutMode | None = None
        self._cut_since = 0.0
        self._server: asyncio.Server | None = None
        self._outage_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the link is not started"
        return self._loop

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect (the port is known once started)."""
        assert self._server is not None, "the link is not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @staticmethod
    def high_water(shape: Direction) -> int:
        """How much one direction holds before it pauses its source: two bandwidth-delay products,
        at least 64 KiB (what a sender's socket buffer would hold on a real link)."""
        if shape.bytes_per_s is None:
            return 1 << 20
        return max(64 * 1024, int(2 * shape.bytes_per_s * (2 * shape.one_way_s + shape.jitter_s)))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        host, port = self.listen
        try:
            self._server = await self._loop.create_server(
                lambda: _Side(_Connection(self), False), host, port, reuse_address=True)
        except OSError as exc:
            raise LinkError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc

    def cut(self, mode: CutMode = "blackhole") -> None:
        """Take the link down. blackhole: traffic and new connections stall; reset: every
        connection is closed now and new ones are closed as they come."""
        if mode not in CUT_MODES:
            raise LinkError(f"unknown cut mode {mode!r}; choose blackhole or reset")
        if self.cut_mode is None:
            self.stats.outages += 1
            self._cut_since = time.monotonic()
        self.cut_mode = mode
        self.stats.state = f"cut ({mode})"
        if mode == "blackhole":
            self.gate.blackholed = True
            for conn in self.conns:
                conn.up.hold()
                conn.down.hold()
        else:
            self.gate.blackholed = False
            for conn in list(self.conns):
                self.stats.resets += 1
                conn.abort()

    def restore(self) -> None:
        """Bring the link back: held bytes flow again, held connections reach upstream."""
        if self.cut_mode is None:
            return
        self.stats.outage_s += time.monotonic() - self._cut_since
        self.cut_mode = None
        self.stats.state = "up"
        self.gate.blackholed = False
        for conn in list(self.conns):
            conn.open_upstream()
            conn.up.release_held()
            conn.down.release_held()

    def snapshot(self) -> LinkStats:
        """The counters now (bytes of open connections included)."""
        stats = LinkStats(**self.stats.as_dict())
        for conn in self.conns:
            stats.bytes_up += conn.up.delivered
            stats.bytes_down += conn.down.delivered
        if self.cut_mode is not None:
            stats.outage_s += time.monotonic() - self._cut_since
        stats.outage_s = round(stats.outage_s, 3)
        return stats

    def schedule_outages(self, every_s: float, for_s: float, mode: CutMode = "blackhole") -> None:
        """Repeat: the link is up for `every_s` seconds, then cut for `for_s` seconds."""
        if every_s <= 0 or for_s <= 0:
            raise LinkError("--outage-every and --outage-for must both be > 0 seconds")

        async def cycle() -> None:
            while True:
                await asyncio.sleep(every_s)
                self.cut(mode)
                await asyncio.sleep(for_s)
                self.restore()

        self._outage_task = self.loop.create_task(cycle())

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._outage_task is not None:
            self._outage_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._outage_task
        if self.cut_mode is not None:
            self.restore()
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports report connection_lost


class LinkEmulator:
    """A Link running in a background thread, for synchronous code.

    Example:
        with LinkEmulator(("127.0.0.1", broker_port), "lte") as link:
            client.connect(*link.address)
            link.cut()            # blackhole; link.cut("reset") closes every connection
            link.restore()
            print(link.stats().bytes_up)
    """

    def __init__(self, upstream: tuple[str, int], profile: LinkProfile | str = "none",
                 listen: tuple[str, int] = ("127.0.0.1", 0), seed: int | None = None,
                 **overrides: float | None) -> None:
        from device_agents.linkem.profiles import get_profile

        base = get_profile(profile) if isinstance(profile, str) else profile
        self.link = Link(upstream, base.with_overrides(**overrides), listen, seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgefleet-linkem",
                                        daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.link.address

    @property
    def profile(self) -> LinkProfile:
        return self.link.profile

    def start(self) -> LinkEmulator:
        self._thread.start()
        self._call(self.link.start())
        return self

    def cut(self, mode: CutMode = "blackhole") -> None:
        self._call_sync(lambda: self.link.cut(mode))

    def restore(self) -> None:
        self._call_sync(self.link.restore)

    def stats(self) -> LinkStats:
        return self._call_sync(self.link.snapshot)

    def schedule_outages(self, every_s: float, for_s: float, mode: CutMode = "blackhole") -> None:
        self._call_sync(lambda: self.link.schedule_outages(every_s, for_s, mode))

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self.link.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Awaitable[T]) -> T:
        async def wrap() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result(10)

    def _call_sync(self, fn: Callable[[], T]) -> T:
        async def wrap() -> T:
            return fn()

        return self._call(wrap())
