"""`edgefleet fleet collect`: every device's results into SQLite, several collectors sharing the load.

Data flows one way: transport (paho's thread) -> queue -> writer thread (decode, INSERT OR IGNORE
a batch, COMMIT) -> PUBACKs in arrival order. A result is acknowledged to the broker only once its
row is committed, and the collector keeps a persistent MQTT session, so a crash, a restart or a
dropped link loses nothing: what was not acknowledged comes again, and UNIQUE(device, epoch, seq)
stores it once. Collectors in one MQTT 5 shared-subscription group (`$share/{group}/...`) split
the results: the broker hands each message to one member of the group.

The writer is supervised: one that fails is logged with its traceback and restarted (the batch it
held is written again one message at a time, so a message that breaks it ends in `rejects`); one
that keeps failing ends the collector, and `run` raises CollectorFailedError (exit 70): never a
command that runs on with a dead writer.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import socket
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import msgspec

from device_agents import protocol
from device_agents.config import BrokerConfig
from device_agents.fleet.client import ALL_RESULTS, device_results
from device_agents.fleet.results_db import CollectError, ResultStore, WriteOutcome
from device_agents.supervise import EXIT_SOFTWARE, Supervisor
from device_agents.transport import Message, Transport

log = logging.getLogger("edgefleet.collect")

DEFAULT_GROUP: Final = "edgefleet-collect"
SESSION_EXPIRY_S: Final = 86400  # a collector down for less than this loses nothing
MQTT5: Final = 5  # the protocol level of MQTT 5 in CONNECT (3.1.1 is 4)
WRITER: Final = "collect-writer"
WRITER_RESTARTS: Final = 3  # within WRITER_WINDOW_S; one more failure ends the collector
WRITER_WINDOW_S: Final = 60.0


class CollectorFailedError(CollectError):
    """The writer kept failing (its tracebacks are in the log): nothing unacknowledged is lost,
    the broker delivers it again at the next start."""

    exit_code = EXIT_SOFTWARE


@dataclass(frozen=True)
class CollectStats:
    """Counters of one collector since start(). `stored + duplicates + rejects` were handled and
    acknowledged; `received` also counts what is still queued for the writer."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejects: int = 0
    batches: int = 0
    write_errors: int = 0
    connects: int = 0
    seconds: float = 0.0

    @property
    def handled(self) -> int:
        return self.stored + self.duplicates + self.rejects

    @property
    def rate(self) -> float:
        """Messages handled per second since start."""
        return self.handled / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3), "rate_per_s": round(self.rate, 1)}


def plain_filters(devices: Sequence[str] = ()) -> list[str]:
    """Every device's results, or those of the devices given."""
    return [device_results(d) for d in devices] or [ALL_RESULTS]


def result_filters(group: str, devices: Sequence[str] = ()) -> list[str]:
    """The shared subscriptions: every device's results, or those of the devices given."""
    return [f"$share/{group}/{t}" for t in plain_filters(devices)]


def default_name(db: Path) -> str:
    """Stable across restarts (the session is found again) and distinct for two collectors on
    one host writing different files; collectors sharing one file on one host need --name."""
    digest = hashlib.sha1(str(db.resolve()).encode()).hexdigest()[:8]  # a label
    return f"{socket.gethostname().split('.')[0] or 'host'}-{digest}"


class Collector:
    """Ingests results into a ResultStore; usable from Python:

        with Collector(Path("results.db"), BrokerConfig(url="mqtt://broker:1883")) as c:
            c.wait_for(1000, timeout=60)
        print(c.stats)
    """

    def __init__(self, db: Path, broker: BrokerConfig | None = None, *,
                 group: str = DEFAULT_GROUP, devices: Sequence[str] = (), name: str | None = None,
                 batch_rows: int = 1000, session_expiry_s: int = SESSION_EXPIRY_S,
                 synchronous: str = "NORMAL", connect_timeout_s: float = 10.0) -> None:
        for what, value in [("--group", group), *(("--device", d) for d in devices),
                            ("--name", name or "x")]:
            if not protocol.NAME_RE.match(value):
                raise CollectError(f"{what} {value!r} must match {protocol.NAME_RE.pattern}")
        if synchronous not in ("NORMAL", "FULL"):
            raise CollectError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.db_path = Path(db)
        self.broker = msgspec.structs.replace(broker or BrokerConfig(),
                                              session_expiry_s=session_expiry_s)
        self.group = group
        self.name = name or default_name(self.db_path)
        self.client_id = f"edgefleet-collect-{self.name}"
        self.filters = result_filters(group, devices)
        self._plain_filters = plain_filters(devices)  # where a broker has no shared subscriptions
        self.batch_rows = batch_rows
        self.synchronous = synchronous
        self.connect_timeout_s = connect_timeout_s
        # Unbounded here, bounded in effect: the broker never has more un-PUBACKed messages out
        # to us than its in-flight window (Mosquitto's max_inflight_messages, 20 by default).
        self._queue: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._accepting = False
        self._counts = {"received": 0, "stored": 0, "duplicates": 0, "rejects": 0, "batches": 0,
                        "write_errors": 0}
        self._progress = threading.Condition()
        self._connected = threading.Event()  # set once the transport has sent our SUBSCRIBE
        self._started = 0.0
        self._stopped: float | None = None
        self._store: ResultStore | None = None
        self._supervisor: Supervisor | None = None
        self._batch: list[Message] = []  # the writer's, kept across its restarts
        self._last = False  # the writer took the end-of-input marker
        self.failure: str | None = None  # why the writer gave up, if it did
        self.transport: Transport | None = None

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stats(self) -> CollectStats:
        end = self._stopped or time.monotonic()
        connects = self.transport.connects if self.transport is not None else 0
        return CollectStats(**self._counts, connects=connects,
                            seconds=end - self._started if self._started else 0.0)

    def start(self) -> Collector:
        """Open the database (first: a bad path fails before any network), connect, subscribe."""
        self._store = ResultStore(self.db_path, synchronous=self.synchronous)
        self._started = time.monotonic()
        self._batch, self._last, self.failure = [], False, None  # a collector may start again
        supervisor = self._supervisor = Supervisor("edgefleet collect", on_fatal=self._on_fatal)
        supervisor.spawn(WRITER, self._write_loop, max_restarts=WRITER_RESTARTS,
                         window_s=WRITER_WINDOW_S)
        self._accepting = True
        # manual ack: the PUBACK waits for the commit. Subscribing after the constructor (not
        # through it) also adds a new filter to a session resumed from an earlier run.
        try:
            self.transport = Transport(
                self.broker, self.client_id, manual_ack=True,
                on_message=supervisor.guard("on_message", self._on_message),
                on_connect=supervisor.guard("on_connect", self._on_connect))
        except Exception:  # TLS files, a password variable not set: close what was opened
            self.stop()
            raise
        self.transport.subscribe(self.filters)
        self.transport.start()
        if not self._connected.wait(self.connect_timeout_s):
            error = (self.transport.last_error or "").removeprefix(
                f"cannot connect to {self.broker.url}: ")
            self.stop()
            raise CollectError(f"cannot connect to the broker at {self.broker.url}"
                               f"{': ' + error if error else ''}")
        self.transport.wait_subscribed(self.connect_timeout_s)
        return self

    def wait_for(self, stored: int, timeout: float | None = None) -> bool:
        """Wait until at least `stored` new rows are committed (False at once if the writer
        gave up: see `failure`)."""
        with self._progress:
            self._progress.wait_for(
                lambda: self._counts["stored"] >= stored or self.failure is not None, timeout)
            return self._counts["stored"] >= stored

    def run(self, *, count: int | None = None, duration: float | None = None,
            stop: threading.Event | None = None,
            on_tick: Callable[[CollectStats], None] | None = None, tick_s: float = 0.5) -> bool:
        """Collect until `count` rows are stored, `duration` seconds pass or `stop` is set; then
        flush and stop. True unless a `count` was given and not reached. Raises
        CollectorFailedError when the writer kept failing."""
        stop = stop or threading.Event()
        deadline = None if duration is None else time.monotonic() + duration
        self.start()
        try:
            while not stop.is_set() and self.failure is None:
                wait = tick_s if deadline is None else max(0.0, min(tick_s,
                                                                    deadline - time.monotonic()))
                if count is not None:
                    if self.wait_for(count, wait):
                        break
                else:
                    stop.wait(wait)
                if on_tick is not None:
                    on_tick(self.stats)
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            self.stop()
        if self.failure is not None:
            raise CollectorFailedError(f"the collector stopped: {self.failure}; nothing "
                                       "unacknowledged is lost, the broker delivers it again at "
                                       "the next start")
        return count is None or self._counts["stored"] >= count

    def stop(self, timeout: float = 30.0) -> CollectStats:
        """Commit and acknowledge what arrived, then disconnect. Messages that arrive meanwhile
        are not acknowledged: the session keeps them for this collector's next start."""
        self._accepting = False
        if self._supervisor is not None and not self._supervisor.stopping:
            self._supervisor.stop()
            self._queue.put(None)
            self._supervisor.join(WRITER, timeout)
        if self.transport is not None:
            self.transport.stop()  # the DISCONNECT queues behind the PUBACKs just sent
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._stopped is None and self._started:
            self._stopped = time.monotonic()
        return self.stats

    # -- paho's network thread: hand over, never block -----------------------------------

    def _on_message(self, msg: Message) -> None:
        if not self._accepting:
            return  # not acknowledged: delivered again to this session
        self._counts["received"] += 1
        self._queue.put(msg)

    def _on_connect(self, session_present: bool) -> None:
        if self.transport is None:
            return
        if getattr(self.transport, "protocol", MQTT5) != MQTT5 and self.filters[0].startswith("$share/"):
            self._without_sharing(self.transport)
        self._connected.set()
        if not session_present and self.transport.connects > 1:
            log.warning("the broker lost %s's session (expired, or broker without persistence): "
                        "results published meanwhile to this collector's share are gone",
                        self.client_id)

    def _without_sharing(self, transport: Transport) -> None:
        """A broker without MQTT 5 (the embedded one) has no shared subscriptions: it would take
        `$share/...` for a plain topic and send nothing. So this collector takes every result."""
        plain = self._plain_filters
        log.warning("%s does not speak MQTT 5: no shared subscriptions, so this collector takes "
                    "every result (run one collector per broker)", self.broker.url)
        transport.unsubscribe(self.filters)
        transport.subscribe(plain)
        self.filters = plain

    # -- the writer thread ----------------------------------------------------------------

    def _write_loop(self) -> None:
        """One transaction per batch. A batch ends at batch_rows or as soon as the queue runs dry:
        waiting for more rows would only stall the broker, which sends nothing past its in-flight
        window until it has our PUBACKs. Under load the queue fills during a commit, so batches
        grow by themselves (group commit)."""
        assert self._supervisor is not None
        if self._batch:  # what a failed run of this loop held
            self._isolate()
        while not self._last:
            self._fill()
            if not self._batch:
                return
            if self._commit(self._batch):
                self._batch = []
            elif self._last or self._supervisor.wait_stopping(1.0):
                return  # unacknowledged: the broker delivers them again at the next start

    def _fill(self) -> None:
        """Add to the batch: wait for a first message, then take what is queued already."""
        if not self._batch:
            first = self._queue.get()
            if first is None:
                self._last = True
                return
            self._batch.append(first)
        while len(self._batch) < self.batch_rows:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._last = True
                break
            self._batch.append(item)

    def _commit(self, batch: list[Message]) -> bool:
        """Store and acknowledge a batch; False (unacknowledged) when SQLite says no."""
        assert self._store is not None
        try:
            outcome = self._store.write([(m.topic, m.payload) for m in batch], time.time())
        except sqlite3.Error as exc:
            self._counts["write_errors"] += 1
            log.warning("cannot commit %d results to %s (%s); retrying, unacknowledged",
                        len(batch), self.db_path, exc)
            return False
        self._acknowledge(batch)
        self._count(outcome)
        return True

    def _isolate(self) -> None:
        """Write the batch a failed run left, one message at a time: the one that fails again is
        kept as a reject, so a single message cannot fail the writer over and over. A message
        leaves the batch only once handled: if even its reject fails, the next run tries again
        (and a writer that keeps failing ends the collector)."""
        assert self._store is not None
        while self._batch:
            msg = self._batch[0]
            try:
                done = self._commit([msg])
            except Exception as exc:
                log.exception("cannot store a message from %s; keeping it in rejects",
                              msg.topic[:120])
                self._store.reject(msg.topic, msg.payload, f"collector error: "
                                   f"{type(exc).__name__}: {exc}", time.time())
                self._acknowledge([msg])
                self._count(WriteOutcome(0, 0, 1))
                done = True
            if not done:  # the database said no, not the message: back to whole batches
                return
            self._batch.pop(0)

    def _on_fatal(self, reason: str) -> None:
        """The writer kept failing: stop taking messages (those not acknowledged come again at
        the next start) and wake whoever waits in `run` or `wait_for`."""
        self._accepting = False
        with self._progress:
            self.failure = reason
            self._progress.notify_all()

    def _acknowledge(self, batch: list[Message]) -> None:
        assert self.transport is not None
        for msg in batch:  # arrival order, as MQTT requires
            self.transport.ack(msg.mid, msg.qos, msg.generation)

    def _count(self, outcome: WriteOutcome) -> None:
        with self._progress:
            self._counts["stored"] += outcome.stored
            self._counts["duplicates"] += outcome.duplicates
            self._counts["rejects"] += outcome.rejects
            self._counts["batches"] += 1
            self._progress.notify_all()


class ProgressLine:
    """Progress on stderr: rewritten in place on a terminal, one line every 10 s otherwise (a
    log file should not get two lines a second)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self._last = (time.monotonic(), 0)
        self._printed = 0.0
        self._rate = 0.0

    def update(self, stats: CollectStats) -> None:
        now = time.monotonic()
        then, handled = self._last
        if now - then >= 0.25:
            self._rate = (stats.handled - handled) / (now - then)
            self._last = (now, stats.handled)
        if self.tty:
            self.out.write(f"\r{self.line(stats, self._rate)}\x1b[K")
            self.out.flush()
        elif now - self._printed >= 10:
            self._printed = now
            print(self.line(stats, self._rate), file=self.out, flush=True)

    def close(self, stats: CollectStats) -> None:
        print(("\r" if self.tty else "") + self.line(stats, stats.rate) + " (average)"
              + ("\x1b[K" if self.tty else ""), file=self.out, flush=True)

    @staticmethod
    def line(stats: CollectStats, rate: float) -> str:
        return (f"{stats.stored} stored, {stats.duplicates} duplicates, {stats.rejects} rejected, "
                f"{rate:,.0f}/s")


class WarningLines(logging.Handler):
    """edgefleet's warnings (a dropped link, a failed commit) as `warning: ...` lines on stderr,
    and its errors (a writer that failed) as `error: ...` with their traceback, once the
    collector has connected: before that, an unreachable broker is the one error line the
    command ends with."""

    def __init__(self, collector: Collector) -> None:
        super().__init__(logging.WARNING)
        self.collector = collector

    def emit(self, record: logging.LogRecord) -> None:
        transport = self.collector.transport
        if transport is None or transport.connects == 0:
            return
        level = "warning" if record.levelno < logging.ERROR else "error"
        text = f"{level}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        print(text, file=sys.stderr, flush=True)
