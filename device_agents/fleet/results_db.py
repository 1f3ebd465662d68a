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
from typing import Annotated, Any, Final

import msgspec

from device_agents import protocol
from device_agents.fleet.client import FleetError

SCHEMA_VERSION: Final = 1
REJECT_KEEP_BYTES: Final = 64 * 1024  # of a refused payload, enough to see what sent it
_INT64: Final = 2**63 - 1

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
    UNIQUE (device, epoch, seq)
);
CREATE TABLE IF NOT EXISTS rejects (
    received_at REAL NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    size INTEGER NOT NULL,        -- the payload's full size in bytes
    payload BLOB NOT NULL         -- its first 64 KiB
);
"""

_INSERT_RESULT: Final = "INSERT OR IGNORE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
_INSERT_REJECT: Final = "INSERT INTO rejects VALUES (?,?,?,?,?)"


class CollectError(FleetError):
    """The collector cannot run: database unusable, broker unreachable, bad options."""


class _Result(msgspec.Struct):
    """The fields of a result the table needs; msgspec skips the rest (outputs, top) unparsed."""

    epoch: Annotated[int, msgspec.Meta(ge=0, le=_INT64)]
    seq: Annotated[int, msgspec.Meta(ge=0, le=_INT64)]
    id: Any = None
    model: Any = None
    label: Any = None
    score: Any = None
    latency_ms: Any = None
    ts_in: Any = None
    ts_out: Any = None


_decoder = msgspec.json.Decoder(_Result)


class NotAResultError(Exception):
    """A message that is not a result: counted, its reason kept in the rejects table."""


def result_row(topic: str, payload: bytes, received_at: float) -> tuple[Any, ...]:
    """The `results` row of one message; raises NotAResultError when it is not a result."""
    device, stream = _device_stream(topic)
    try:
        doc = _decoder.decode(payload)
        text = payload.decode()
    except msgspec.ValidationError as exc:
        raise NotAResultError(f"not a result: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise NotAResultError(f"not JSON: {exc}") from None
    model = doc.model if isinstance(doc.model, dict) else {}
    latency = doc.latency_ms if isinstance(doc.latency_ms, dict) else {}
    return (device, stream, doc.epoch, doc.seq, _scalar(doc.id), _text(model.get("name")),
            _text(model.get("version")), _text(doc.label), _number(doc.score),
            _number(latency.get("total")), _number(doc.ts_in), _number(doc.ts_out), received_at,
            text)


def _device_stream(topic: str) -> tuple[str, str]:
    parts = topic.split("/")
    # protocol.Topics(device).output(stream) is ROOT/{device}/out/{stream}
    if (len(parts) != 5 or f"{parts[0]}/{parts[1]}" != protocol.ROOT or parts[3] != "out"
            or not parts[2] or not parts[4]):
        raise NotAResultError(f"not a result topic ({protocol.ROOT}/{{device}}/out/{{stream}})")
    return parts[2], parts[4]


def _scalar(value: Any) -> str | int | float | None:
    """What SQLite can bind: an integer past 64 bits would fail the whole batch, so it is text."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value if -_INT64 - 1 <= value <= _INT64 else str(value)
    if isinstance(value, str | float):
        return value
    return None if value is None else protocol.encode(value).decode()


def _text(value: Any) -> str | None:
    return None if value is None else str(_scalar(value))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


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
                rejects.append((received_at, topic, str(exc), len(payload),
                                payload[:REJECT_KEEP_BYTES]))
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

    def close(self) -> None:
        self._db.close()


