"""Files in the data dir that a bad SD card, a power cut or a bug left unreadable: found before
the agent opens them, moved aside, and started without.

A corrupt `outbox.db` or a truncated `models/state.json` once made the agent raise at start, and
systemd restarted it into the same failure forever: a box that needed a visit. Each file the
agent owns is checked first (JSON files parse as an object; SQLite files pass `PRAGMA
quick_check`); a bad one is moved to `data_dir/quarantine/` under its path and the time, with its
`-wal` and `-shm` files, and the agent starts with an empty one. Nothing is deleted: the operator
can still look at, or recover, what was in it. The agent says so in its log, in telemetry
(`faults.quarantined`) and as an `event` once it can publish.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger("edgefleet.quarantine")

JSON_FILES: Final = ("state.json", "models/state.json", "chunks/index.json")
SQLITE_FILES: Final = ("outbox.db", "commands.db")


@dataclass(frozen=True)
class Quarantined:
    """A file moved aside: where it was, where it is now, and what was wrong with it."""

    path: str  # relative to the data dir
    moved_to: str
    reason: str


def check_data_dir(data_dir: Path) -> list[Quarantined]:
    """Check every file the agent owns and move the bad ones aside (see the module docstring)."""
    moved = []
    candidates = [(name, _json_problem) for name in JSON_FILES]
    candidates += [(f"deliveries/{p.name}", _json_problem)
                   for p in sorted((data_dir / "deliveries").glob("*.json"))]
    candidates += [(name, _sqlite_problem) for name in SQLITE_FILES]
    for name, check in candidates:
        path = data_dir / name
        if not path.exists():
            continue
        problem = check(path)
        if problem is not None:
            moved.append(_move(data_dir, name, problem))
    return moved


def _json_problem(path: Path) -> str | None:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return f"not JSON: {type(exc).__name__}: {str(exc)[:200]}"
    return None if isinstance(doc, dict) else f"not a JSON object but {type(doc).__name__}"


def _sqlite_problem(path: Path) -> str | None:
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return f"SQLite cannot read it: {exc}"
    verdict = [str(r[0]) for r in rows]
    return None if verdict == ["ok"] else "quick_check: " + "; ".join(verdict)[:300]


def _move(data_dir: Path, name: str, reason: str) -> Quarantined:
    target_dir = data_dir / "quarantine"
    target_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = target_dir / f"{name.replace('/', '_')}.{stamp}.{os.getpid()}"
    for suffix in ("", "-wal", "-shm", "-journal"):
        src = data_dir / f"{name}{suffix}"
        if src.exists():
            os.replace(src, f"{target}{suffix}")
    moved_to = str(target.relative_to(data_dir))
    log.error("%s is unreadable (%s): moved to %s in %s; starting without it", name, reason,
              moved_to, data_dir)
    return Quarantined(name, moved_to, reason)
