"""The disk outbox: every result and error is on disk before it is published, and leaves only
when the broker has acknowledged it.

SQLite in WAL mode with `synchronous=FULL`, written by one thread that commits whatever has
arrived since its last commit in one transaction (group commit): one fsync covers hundreds of
results, and callers never wait on the disk. A caller that must know a row is durable (to
acknowledge the sensor message it answers) passes `on_durable`, called after the commit with
True, or with False if the row could not be stored (disk full): then the sensor message is not
acknowledged and the broker delivers it again later. Bounds: `max_bytes` (drop the oldest rows,
or refuse new ones) and `ttl_s`; every row dropped is counted by reason, never silent.

A caller with nothing else to do may commit on its own thread instead (`put(defer=True)`, then
`commit_deferred()`): the agent's intake worker does so when its queue runs dry, which saves
handing each result to the writer thread and waiting for that thread's commit in progress.
Acknowledged rows are deleted by the next commit, whoever makes it, or by the writer within
ACK_IDLE_S: a PUBACK never costs a transaction (and an fsync) of its own.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("edgefleet.outbox")

# Page cache per connection, in KiB when negative. The outbox touches the head and the tail of
# one table, and reads a backlog in order (the OS caches that); SQLite's default (2 MiB) for each
# of two connections is memory an edge box does without (agent RSS after a burst of 12,000
# results: 94.4 -> 89.8 MB).
CACHE_SIZE = -256
ROW_OVERHEAD = 64  # bytes counted per row besides topic and payload (ids, times, index)
# Bytes put and not yet committed, at most: past this (a disk that has stopped syncing, a flood)
# a put is refused at once, so memory stays bounded while the disk catches up.
MAX_PENDING_BYTES = 16 << 20
# How long an acknowledged row may wait for a commit to delete it when no new rows come. A crash
# in that window only publishes the row once more, which QoS 1 allows.
ACK_IDLE_S = 0.1
Durable = Callable[[bool], None]
# topic, payload, qos, retain, created, cb, MQTT 5 correlation data (of a response)
_Put = tuple[str, bytes, int, bool, float, Durable | None, bytes | None]
_Stored = tuple[str, bytes, int, int, float, int, bytes | None]  # ..., size, correlation
_Item = tuple[str, Any]  # ("put", _Put), ("ack" | "dead", row id), ("wake" | "stop", None)


@dataclass(slots=True)
class Row:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float
    correlation: bytes | None = None  # MQTT 5 correlation data a response carries back


@dataclass
class OutboxStats:
    depth: int
    bytes: int
    oldest_s: float
    dropped: int
    dropped_by: dict[str, int] = field(default_factory=dict)
    write_errors: int = 0

    def as_telemetry(self) -> dict[str, float | int]:
        return {"depth": self.depth, "bytes": self.bytes, "oldest_s": round(self.oldest_s, 3),
                "dropped": self.dropped}


class Outbox:
    """A durable FIFO of messages waiting for the broker's acknowledgement."""

    def __init__(self, path: Path, *, max_bytes: int = 256 << 20, ttl_s: float = 86400,
                 on_full: Literal["drop-oldest", "reject-new"] = "drop-oldest",
                 synchronous: Literal["FULL", "NORMAL"] = "FULL",
                 on_commit: Callable[[], None] | None = None,
                 max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.on_full = on_full
        self.on_commit = on_commit  # rows were stored: e.g. publish them
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                         " topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,"
                         " retain INTEGER NOT NULL, created REAL NOT NULL, size INTEGER NOT NULL,"
                         " correlation BLOB)")
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}
        if "correlation" not in columns:  # an outbox written by an agent before responses
            self._db.execute("ALTER TABLE outbox ADD COLUMN correlation BLOB")
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY,"
                         " value INTEGER NOT NULL)")
        depth, size = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
        self._depth, self._bytes = int(depth), int(size)
        self.dropped_by: dict[str, int] = dict(
            self._db.execute("SELECT name, value FROM counters").fetchall())
        self._last_id = int(self._db.execute("SELECT coalesce(max(id), 0) FROM outbox").fetchone()[0])
        # rows just committed, for a publisher that keeps up (see take); bounded: past this it
        # reads the backlog from the database instead
        self._fresh: deque[Row] = deque(maxlen=1024)
        self._sizes: dict[int, int] = {}  # row id -> counted size, for rows committed here
        self.write_errors = 0
        # Only a committer holding _write_lock uses _db; readers (the publisher, telemetry) have
        # their own connection, which WAL lets read while a commit is written.
        self._reader = _connect(path)
        self._read_lock = threading.Lock()
        self._lock = threading.Lock()  # _queued_seq
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()  # wakes the writer
        self._deferred: deque[_Item] = deque()  # puts their caller commits (commit_deferred)
        self._acks: deque[_Item] = deque()  # deleted by the next commit: no wake-up of their own
        # One transaction at a time, on the writer's thread or a caller's (commit_deferred).
        self._write_lock = threading.Lock()
        self._changed = threading.Condition()
        self._committed_seq = 0
        self._queued_seq = 0
        self.max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0  # put, not yet committed (under _lock)
        self.refused_pending = 0  # puts refused because that budget was spent
        self._last_refused_log = -1.0
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="edgefleet-outbox",
                                        daemon=True)
        self._writer.start()

    # -- the callers' side -------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
            on_durable: Durable | None = None, defer: bool = False,
            correlation: bytes | None = None, bounded: bool = False) -> None:
        """Queue a message for the disk; never blocks. on_durable(stored) follows the commit.

        defer=True: the caller commits it soon itself (`commit_deferred`), so the writer thread
        is not woken for it. Should the caller not, the writer takes it within ACK_IDLE_S.
        bounded=True (an answer to a QoS 0 message, which no broker window holds back): when
        max_pending_bytes already wait for the disk, the put is refused at once, on_durable(False)
        here on the caller's thread. Other puts are bounded by what produces them (the broker's
        in-flight window for QoS 1 answers) and are always taken.
        """
        size = _put_size(topic, payload, correlation)
        with self._lock:
            refused = (bounded and self._pending_bytes > 0
                       and self._pending_bytes + size > self.max_pending_bytes)
            if refused:
                self.refused_pending += 1
            else:
                self._pending_bytes += size
                self._queued_seq += 1
        if refused:
            now = time.monotonic()
            if now - self._last_refused_log >= 1.0:  # not a line a put: the disk is behind
                self._last_refused_log = now
                log.warning("outbox: %d bytes wait for the disk; puts are refused (%d so far)",
                            self._pending_bytes, self.refused_pending)
            if on_durable is not None:
                try:
                    on_durable(False)
                except Exception:
                    log.exception("outbox durability callback failed")
            return
        item = ("put", (topic, payload, qos, retain, time.time(), on_durable, correlation))
        if defer:
            self._deferred.append(item)
        else:
            self._queue.put(item)

    def commit_deferred(self, inline: bool = True) -> None:
        """Commit the deferred puts: here, on the caller's thread, when the writer is idle (the
        caller's results are durable one thread switch sooner); else (or with inline=False) by
        waking the writer, and the caller goes on with its work while the disk syncs. A caller
        never waits for the writer's commit in progress: that stalled the agent's intake under
        a flood."""
        if not self._deferred:
            return
        if inline and self._write_lock.acquire(blocking=False):
            try:
                batch = self._gather([], queued=False)
                if batch:
                    self._commit(batch)
            except Exception:  # as on the writer: the caller's own loop must go on
                log.exception("outbox commit failed on the caller's thread")
            finally:
                self._write_lock.release()
            return
        self._queue.put(("wake", None))

    @property
    def writer(self) -> threading.Thread:
        return self._writer

    def ack(self, row_id: int) -> None:
        """The broker acknowledged this row: it may go (with the next commit)."""
        self._acks.append(("ack", row_id))

    def dead_letter(self, row_id: int) -> None:
        """This row can never be published (its topic or size is refused for good): it goes,
        counted as `dead_letter`, so it holds back nothing behind it."""
        self._acks.append(("dead", row_id))
        self._queue.put(("wake", None))

    def take(self, after_id: int, limit: int) -> list[Row]:
        """The next rows after `after_id`: from memory when the caller keeps up with the writer
        (rows committed since it last asked), else from the database (a backlog, a restart)."""
        fresh = self._fresh
        while fresh and fresh[0].id <= after_id:
            fresh.popleft()
        if fresh and fresh[0].id == after_id + 1:
            out: list[Row] = []
            cutoff = time.time() - self.ttl_s
            expect = after_id + 1
            while fresh and len(out) < limit:
                row = fresh.popleft()
                if row.id != expect:  # a commit just pushed rows out of the bounded deque:
                    return out + self.peek(expect - 1, limit - len(out))  # read them from disk
                expect += 1
                if row.created >= cutoff:  # an expired row is the writer's to drop and count
                    out.append(row)
            return out
        return self.peek(after_id, limit)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until everything put so far is committed (or refused)."""
        with self._lock:
            target = self._queued_seq
        self._queue.put(("wake", None))  # deferred puts included
        with self._changed:
            return self._changed.wait_for(lambda: self._committed_seq >= target, timeout)

    def peek(self, after_id: int, limit: int) -> list[Row]:
        """Rows after `after_id`, oldest first (the publisher's next batch)."""
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT id, topic, payload, qos, retain, created, correlation FROM outbox WHERE id > ? "
                "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [Row(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5],
                    None if r[6] is None else bytes(r[6])) for r in rows]

    def stats(self) -> OutboxStats:
        with self._read_lock:
            oldest = self._reader.execute("SELECT min(created) FROM outbox").fetchone()[0]
        dropped = self.dropped_by  # replaced, never mutated, by the writer: a consistent copy
        return OutboxStats(self._depth, self._bytes,
                           0.0 if oldest is None else max(0.0, time.time() - oldest),
                           sum(dropped.values()), dict(dropped), self.write_errors)

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(("stop", None))
        self._writer.join(timeout)
        self._db.close()
        with self._read_lock:
            self._reader.close()

    # -- the writer thread -------------------------------------------------------------------

    def _write_loop(self) -> None:  # the writer thread
        next_expiry = 0.0
        while True:
            try:
                first = [self._queue.get(timeout=ACK_IDLE_S)]
            except queue.Empty:  # idle: acknowledged rows, or deferred puts left behind
                first = []
            with self._write_lock:
                batch = self._gather(first)
                stop = any(kind == "stop" for kind, _ in batch)
                try:
                    if any(kind in ("put", "ack", "dead") for kind, _ in batch):
                        self._commit(batch)
                    elif batch:  # a flush with nothing to write: its waiter checks again
                        with self._changed:
                            self._changed.notify_all()
                    now = time.monotonic()
                    if now >= next_expiry:
                        self._expire()
                        next_expiry = now + 1.0
                except Exception:  # the outbox must outlive any one bad batch
                    log.exception("outbox writer failed on a batch")
            if stop:
                return

    def _gather(self, batch: list[_Item], queued: bool = True) -> list[_Item]:
        """What waits to be written: queued items (up to 4096; not for a caller, which commits
        only what it deferred, not the writer's work), deferred puts, then acknowledgements."""
        while queued and len(batch) < 4096:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        deferred, acks = self._deferred, self._acks
        while deferred:
            batch.append(deferred.popleft())
        while acks:
            batch.append(acks.popleft())
        return batch

    def _commit(self, batch: list[_Item]) -> None:
        puts: list[_Put] = [item for kind, item in batch if kind == "put"]
        acks: list[int] = [item for kind, item in batch if kind in ("ack", "dead")]
        dead = sum(kind == "dead" for kind, _ in batch)
        callbacks: list[tuple[Durable, bool]] = []
        # under _write_lock: one committer at a time touches _db and the counters
        self._next_id = self._last_id + 1
        self._pending_rows: list[Row] = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            if acks:
                self._delete(acks)
            if dead:
                self._count("dead_letter", dead)
            stored = self._insert(puts, callbacks)
            self._db.execute("COMMIT")
        except Exception as exc:  # SQLite's, or any other: each put still hears its outcome
            self._rollback(exc)
            for row in self._pending_rows:
                self._sizes.pop(row.id, None)
            stored = 0
            callbacks = [(put[5], False) for put in puts if put[5] is not None]
            self.write_errors += len(puts)
            try:
                self._recount()
            except sqlite3.Error:  # the disk is gone: the counts wait for the next commit
                log.exception("outbox recount after a failed write failed")
        else:
            if stored:
                self._last_id = self._next_id - 1
                self._fresh.extend(self._pending_rows)
        if self.on_commit is not None and stored:  # first: the publisher waits on this one
            try:
                self.on_commit()
            except Exception:
                log.exception("outbox commit callback failed")
        for cb, ok in callbacks:
            try:
                cb(ok)
            except Exception:  # a caller's bug must not stop the outbox
                log.exception("outbox durability callback failed")
        with self._lock:
            self._pending_bytes -= sum(_put_size(p[0], p[1], p[6]) for p in puts)
        with self._changed:
            self._committed_seq += len(puts)
            self._changed.notify_all()

    def _delete(self, ids: list[int]) -> None:
        known = [i for i in ids if i in self._sizes]  # committed by this process: sizes known
        if len(known) == len(ids):
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
            self._depth -= len(ids)
            self._bytes -= sum(self._sizes.pop(i) for i in ids)
            return
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            depth, size = self._db.execute(
                f"SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE id IN ({marks})",
                chunk).fetchone()
            self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
            self._depth -= depth
            self._bytes -= size
            for row_id in chunk:
                self._sizes.pop(row_id, None)

    def _insert(self, puts: list[_Put], callbacks: list[tuple[Durable, bool]]) -> int:
        rows: list[_Stored] = []
        stored = 0
        for topic, payload, qos, retain, created, cb, correlation in puts:
            size = _put_size(topic, payload, correlation)
            if self._bytes + size > self.max_bytes:
                stored += self._write_rows(rows)  # what is pending must be on disk to be dropped
                rows = []
                if not self._make_room(size):
                    self._count("rejected_full", 1)
                    if cb is not None:
                        callbacks.append((cb, True))  # handled: dropped and counted, not retried
                    continue
            rows.append((topic, payload, qos, int(retain), created, size, correlation))
            self._bytes += size
            self._depth += 1
            if cb is not None:
                callbacks.append((cb, True))
        return stored + self._write_rows(rows)

    def _write_rows(self, rows: list[_Stored]) -> int:
        if rows:
            first = self._next_id
            self._db.executemany("INSERT INTO outbox (id, topic, payload, qos, retain, created, "
                                 "size, correlation) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 [(first + i, *row) for i, row in enumerate(rows)])
            self._next_id += len(rows)
            self._pending_rows += [Row(first + i, r[0], r[1], r[2], bool(r[3]), r[4], r[6])
                                   for i, r in enumerate(rows)]
            for i, r in enumerate(rows):
                self._sizes[first + i] = r[5]
        return len(rows)

    def _make_room(self, size: int) -> bool:
        """drop-oldest: delete the oldest rows until `size` fits; reject-new: refuse."""
        if self.on_full == "reject-new" or size > self.max_bytes:
            return False
        while self._bytes + size > self.max_bytes and self._depth > 0:
            n = max(1, self._depth // 100)
            victims = self._db.execute("SELECT id, size FROM outbox ORDER BY id LIMIT ?",
                                       (n,)).fetchall()
            if not victims:
                break
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(v[0],) for v in victims])
            for row_id, _ in victims:
                self._sizes.pop(row_id, None)
            depth, freed = len(victims), sum(v[1] for v in victims)
            self._depth -= depth
            self._bytes -= freed
            self._count("dropped_oldest", depth)
        return self._bytes + size <= self.max_bytes

    def _expire(self) -> None:
        cutoff = time.time() - self.ttl_s
        try:
            self._db.execute("BEGIN IMMEDIATE")
            victims = self._db.execute("SELECT id, size FROM outbox WHERE created < ?",
                                       (cutoff,)).fetchall()
            depth, size = len(victims), sum(v[1] for v in victims)
            if depth:
                self._db.execute("DELETE FROM outbox WHERE created < ?", (cutoff,))
                for row_id, _ in victims:
                    self._sizes.pop(row_id, None)
                self._depth -= depth
                self._bytes -= size
                self._count("expired", depth)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(exc)

    def _count(self, reason: str, n: int) -> None:
        self.dropped_by = {**self.dropped_by, reason: self.dropped_by.get(reason, 0) + n}
        self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) "
                         "DO UPDATE SET value = value + excluded.value", (reason, n))

    def _rollback(self, exc: Exception) -> None:
        log.error("outbox write failed (%s): nothing in this batch is acknowledged; sensors "
                  "will resend", exc)
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def _recount(self) -> None:
        depth, size = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
        self._depth, self._bytes = int(depth), int(size)
        self.dropped_by = dict(self._db.execute("SELECT name, value FROM counters").fetchall())


def _put_size(topic: str, payload: bytes, correlation: bytes | None) -> int:
    """The bytes a row counts against max_bytes (and a put against max_pending_bytes)."""
    return len(topic) + len(payload) + len(correlation or b"") + ROW_OVERHEAD


def _connect(path: Path) -> sqlite3.Connection:
    """A connection of the outbox's: explicit transactions, any thread, a small page cache."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute(f"PRAGMA cache_size={CACHE_SIZE}")
    return conn
