"""The run id (CONTRACT 5.3): made once per data dir, carried by every result, part of the
collector's unique key, so a box whose data dir was wiped is not taken for its earlier life."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from device_agents import durable
from device_agents.fleet import results_db
from tests.device_agents.conftest import Bench
from tests.support.agent import wait_for_status


def test_write_atomic_replaces_whole_files_with_their_mode_and_leaves_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    durable.write_atomic(path, b"old")
    durable.write_atomic(path, b"new", 0o640)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o640

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        durable.write_atomic(path, b"newer")
    assert path.read_bytes() == b"new"  # a failed write leaves the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_schema_1_results_file_is_rebuilt_with_its_rows(tmp_path: Path) -> None:
    db_path = tmp_path / "old.db"
    old = results_db.SCHEMA.replace(
        "    run TEXT NOT NULL DEFAULT '', -- the device's data_dir id ('' from agents that send "
        "none)\n", "").replace("UNIQUE (device, run, epoch, seq)", "UNIQUE (device, epoch, seq)")
    assert "run TEXT" not in old
    with sqlite3.connect(db_path) as db:
        db.executescript(old)
        db.execute("PRAGMA user_version=1")
        db.execute("INSERT INTO results VALUES ('d','cam',1,1,'m1',NULL,NULL,NULL,NULL,NULL,NULL,"
                   "NULL,0,'{}')")
    store = results_db.ResultStore(db_path)
    try:
        topic = "edgefleet/v1/d/out/cam"
        again = json.dumps({"seq": 1, "epoch": 1, "run": "r2"}).encode()
        outcome = store.write([(topic, again), (topic, again)], 1.0)
        assert (outcome.stored, outcome.duplicates) == (1, 1)  # a new run: stored once
    finally:
        store.close()
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
        assert db.execute("SELECT run, epoch, seq, id FROM results ORDER BY run").fetchall() == [
            ("", 1, 1, "m1"), ("r2", 1, 1, None)]


def test_a_wiped_data_dir_gets_a_new_run_and_the_collector_keeps_both_lives(
        bench: Bench, digits_samples) -> None:  # type: ignore[no-untyped-def]
    db = bench.tmp / "results.db"
    collect = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.cli", "fleet", "collect", "--db", str(db), "--device",
         bench.device_id, "--count", "7", "--duration", "120", "--json", "--broker",
         bench.broker.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = []
    try:
        for life in range(2):
            watcher = bench.peer()
            agent = bench.agent()
            wait_for_status(watcher, "online")
            for i, (image, _) in enumerate(digits_samples(3)):
                watcher.send("cam", {"id": f"life{life}-{i}", "data": image})
            results = watcher.collect("/out/cam", 3)
            assert {r["epoch"] for r in results} == {1}  # a new data dir starts at epoch 1
            runs.append({r["run"] for r in results})
            assert agent.stop() == 0
            if life == 0:  # the same run after a restart, a new one after a wipe
                again = bench.agent()
                wait_for_status(watcher, "online")
                watcher.send("cam", {"id": "restart", "data": digits_samples(1)[0][0]})
                restarted = watcher.collect("/out/cam", 1)[0]
                assert (restarted["run"], restarted["epoch"]) == (next(iter(runs[0])), 2)
                assert again.stop() == 0
                shutil.rmtree(bench.data_dir)
        out, err = collect.communicate(timeout=120)
    finally:
        if collect.poll() is None:
            collect.kill()
    assert collect.returncode == 0, out + err
    assert len(runs[0]) == len(runs[1]) == 1
    assert runs[0] != runs[1]
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT run, epoch, id FROM results ORDER BY id").fetchall()
    assert len(stored) == 7, stored  # both lives (epoch 1) and the restart (epoch 2)
    assert {row[0] for row in stored} == runs[0] | runs[1]
    assert sum(1 for row in stored if row[1] == 1) == 6
