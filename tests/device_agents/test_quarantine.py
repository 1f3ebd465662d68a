"""Unreadable files in the data dir: moved to quarantine/, the agent starts without them, serves
and reports (log, telemetry, event). No crash loop."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agents.quarantine import check_data_dir
from tests.device_agents.conftest import Bench
from tests.support.agent import ROOT, wait_for_status


def _sqlite_file(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
        db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(2000)])


@pytest.mark.parametrize(("name", "damage", "reason"), [
    ("models/state.json", lambda p: p.write_text('{"digits": {"active": "1", "prev'), "not JSON"),
    ("chunks/index.json", lambda p: p.write_bytes(b""), "not JSON"),
    ("state.json", lambda p: p.write_text("[1, 2]"), "not a JSON object"),
    ("deliveries/d-1.json", lambda p: p.write_bytes(b"\xff\xfe garbage"), "not JSON"),
    ("outbox.db", lambda p: p.write_bytes(b"this is not a database" * 100), "SQLite"),
    ("commands.db", lambda p: p.write_bytes(p.read_bytes()[:3000]), "SQLite"),  # truncated
])
def test_each_bad_file_is_moved_aside_with_its_reason(tmp_path: Path, name: str, damage: object,
                                                      reason: str) -> None:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".db"):
        _sqlite_file(path)
    else:
        path.write_text("{}")
    assert check_data_dir(tmp_path) == []  # a good file stays
    damage(path)  # type: ignore[operator]
    (moved,) = check_data_dir(tmp_path)
    assert moved.path == name
    assert reason in moved.reason, moved.reason
    assert not path.exists()
    assert (tmp_path / moved.moved_to).exists()  # kept, not deleted
    assert check_data_dir(tmp_path) == []


def test_the_agent_starts_serves_and_reports_with_every_file_corrupt(
        bench: Bench, digits_samples) -> None:  # type: ignore[no-untyped-def]
    watcher, agent = bench.start_online()
    watcher.send("cam", {"id": "before", "data": digits_samples(1)[0][0]})
    watcher.collect("/out/cam", 1)
    assert agent.stop() == 0
    data = bench.data_dir
    (data / "outbox.db").write_bytes(b"\x00garbage" * 512)
    for suffix in ("-wal", "-shm"):
        (data / f"outbox.db{suffix}").unlink(missing_ok=True)
    (data / "models" / "state.json").write_text('{"digits": ')
    (data / "state.json").write_text("")
    (data / "chunks").mkdir(exist_ok=True)
    (data / "chunks" / "index.json").write_text("")

    events_peer = bench.peer(subscribe=[f"{ROOT}/{bench.device_id}/event"])
    agent = bench.agent()
    wait_for_status(watcher, "online")
    watcher.send("cam", {"id": "after", "data": digits_samples(1)[0][0]})
    result = watcher.collect("/out/cam", 1)[0]
    assert result["id"] == "after"
    try:
        events = events_peer.collect("/event", 4, timeout=20)
    except TimeoutError:
        raise AssertionError(agent.logs()[-4000:]) from None
    quarantined = {e["file"] for e in events if e["type"] == "quarantined"}
    assert quarantined == {"outbox.db", "models/state.json", "state.json", "chunks/index.json"}
    tele = watcher.collect("/telemetry", 1, timeout=10)[-1]
    assert tele["faults"]["quarantined"] == 4
    assert "moved to quarantine/" in agent.logs()
    kept = sorted(p.name.split(".")[0] for p in (data / "quarantine").iterdir())
    assert {"outbox", "models_state", "state", "chunks_index"} <= set(kept)
    assert json.loads((data / "state.json").read_text())["epoch"] == 1  # started over, new run
    assert agent.stop() == 0


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), name=st.sampled_from(
    ["state.json", "models/state.json", "chunks/index.json", "outbox.db", "commands.db"]))
def test_any_bytes_in_an_owned_file_are_kept_or_moved_never_raised(
        tmp_path: Path, data: bytes, name: str) -> None:
    root = tmp_path / f"case-{abs(hash((data, name)))}"
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    moved = check_data_dir(root)
    assert path.exists() == (moved == [])
    assert all((root / m.moved_to).exists() for m in moved)
