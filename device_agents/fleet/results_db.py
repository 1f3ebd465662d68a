"""The collector's SQLite file: the `results` and `rejects` tables, and turning one MQTT message
into one row.

Kept apart from the MQTT side (collect.py) so that tools reading or merging collector files, and
the benchmarks, use the same schema and decoding without a broker.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from device_agents import protocol
from device_agents.fleet.client import FleetError

SCHEMA_VERSION: Final = 2  # 2: the run column, in the unique key
REJECT_KEEP_BYTES: Final = 64 * 1024  # of a refused payload, enough to see what sent it

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS results (
    device TEXT NOT NULL,         -- from the topic edgefleet/v1/{device}/out/{stream}
    stream TEXT NOT NULL,
    epoch INTEGER NOT NULL,       -- the agent's start count; with seq, identifies a result
    seq INTEGER NOT NULL,
    id,                           -- the sensor message's id as sent (text or integer), or NULL
    model_name TEXT,
    model_version TEXT,
    label TEXT,
    score REAL,
    latency_ms REAL,              -- latency_ms.total: sensor message in -> result out, on the device
    ts_in REAL,                   -- unix seconds, the device's clock
    ts_out REAL,
    received_at REAL NOT NULL,    -- unix seconds, the collector's clock
    payload TEXT NOT NULL,        -- the whole result as JSON (json_extract works on it)
    run TEXT NOT NULL DEFAULT '', -- the device's data_dir id ('' from agents that send none)
    UNIQUE (device, run, epoch, seq)
);
CREATE TABLE IF NOT EXISTS rejects (
    received_at REAL NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    size INTEGER NOT NULL,        -- the payload's full size in bytes
    payload BLOB NOT NULL         -- its first 64 KiB
);
"""

_INSERT_RESULT: Final = "INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
# schema 1 -> 2: SQLite cannot change a UNIQUE constraint in place, so the table is rebuilt
_MIGRATE_1: Final = """
ALTER TABLE results RENAME TO results_schema1;
""" + SCHEMA.split("CREATE TABLE IF NOT EXISTS rejects")[0] + """
INSERT INTO results SELECT *, '' FROM results_schema1;
DROP TABLE results_schema1;
"""
_INSERT_REJECT: Final = "INSERT INTO rejects VALUES (?,?,?,?,?)"


class CollectError(FleetError):
    """The collector cannot run: database unusable, broker unreachable, bad options."""


class NotAResultError(Exception):
    """A message that is not a result: counted, its reason kept in the rejects table."""


def result_row(topic: str, payload: bytes, received_at: float) -> tuple[Any, ...]:
    """The `results` row of one message; raises NotAResultError (and nothing else, whatever
    the topic and the bytes) when it is not a result."""
    try:
        where = protocol.parse_topic(topic)
    except protocol.ProtocolError as exc:
        raise NotAResultError(str(exc)) from None
    if where.kind != "out" or where.name is None:
        raise NotAResultError(f"not a result topic (out/{{stream}}) but a {where.kind} topic: "
                              f"{topic[:120]!r}")
    try:
        doc = protocol.parse_result(payload)
        text = payload.decode()  # the whole result is kept, as JSON text json_extract reads
    except protocol.ProtocolError as exc:
        raise NotAResultError(f"not a result: {exc}") from None
    except UnicodeDecodeError as exc:
        raise NotAResultError(f"not a result: not UTF-8: {exc}") from None
    model = doc.model
    total = doc.latency_ms.get("total") if doc.latency_ms is not None else None
    return (where.device, where.name, doc.epoch, doc.seq, doc.id,
            model.name if model else None, model.version if model else None,
            None if doc.label is None else str(doc.label), doc.score, total, doc.ts_in,
            doc.ts_out, received_at, text, doc.run or "")


def reject_row(topic: str, payload: bytes, reason: str, received_at: float
               ) -> tuple[float, str, str, int, bytes]:
    """The `rejects` row of a message that is not a result."""
    return (received_at, _storable(topic), _storable(reason), len(payload),
            payload[:REJECT_KEEP_BYTES])


def _storable(text: str) -> str:
    """What SQLite can store as text: a lone surrogate (no broker sends one, a caller might)
    would fail the whole batch."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class WriteOutcome:
    stored: int
    duplicates: int
    rejects: int


class ResultStore:
    """The SQLite file: WAL (readers never block the writer), a busy timeout (several collectors
    may share one file: SQLite serialises their commits), one transaction per batch."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL", busy_timeout_s: float = 30.0
                 ) -> None:
        self.path = path
        if path.is_dir():
            raise CollectError(f"--db {path} is a directory; give a file path such as "
                               f"{path / 'results.db'}")
        if not path.parent.is_dir():
            raise CollectError(f"cannot create the database {path}: directory {path.parent} "
                               "does not exist")
        db = None
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CollectError(f"{path} was written by a newer edgefleet (schema {version}; "
                                   f"this one knows {SCHEMA_VERSION})")
            if version == 1:  # one transaction: a crash leaves schema 1 whole
                db.executescript(f"BEGIN IMMEDIATE;\n{_MIGRATE_1}\nPRAGMA user_version=2;\nCOMMIT;")
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.Error, CollectError) as exc:
            if db is not None:
                db.close()
            if isinstance(exc, CollectError):
                raise
            raise CollectError(f"cannot use {path} as the results database: {exc}") from None
        self._db = db

    def write(self, messages: Sequence[tuple[str, bytes]], received_at: float) -> WriteOutcome:
        """Store a batch of (topic, payload) in one transaction; raises sqlite3.Error (rolled
        back) when the disk or a lock says no."""
        rows: list[tuple[Any, ...]] = []
        rejects: list[tuple[float, str, str, int, bytes]] = []
        for topic, payload in messages:
            try:
                rows.append(result_row(topic, payload, received_at))
            except NotAResultError as exc:
                rejects.append(reject_row(topic, payload, str(exc), received_at))
        try:
            self._db.execute("BEGIN IMMEDIATE")  # the write lock now, under the busy timeout
            stored = self._db.executemany(_INSERT_RESULT, rows).rowcount if rows else 0
            if rejects:
                self._db.executemany(_INSERT_REJECT, rejects)
            self._db.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        return WriteOutcome(stored, len(rows) - stored, len(rejects))

    def reject(self, topic: str, payload: bytes, reason: str, received_at: float) -> None:
        """Keep one message aside as a reject, in a transaction of its own."""
        self._db.execute(_INSERT_REJECT, reject_row(topic, payload, reason, received_at))

    def close(self) -> None:
        self._db.close()


