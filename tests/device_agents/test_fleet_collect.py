"""`edgefleet fleet collect`: results into SQLite, once each, shared between collectors, through a
real Mosquitto (and the embedded broker where it can: no shared subscriptions there)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from device_agents.config import BrokerConfig
from device_agents.fleet.collect import Collector
from edgefleet.cli import cli
from tests.device_agents.conftest import Bench
from tests.support.agent import ROOT, Peer

SHARED = pytest.mark.mosquitto_only(reason="shared subscriptions are MQTT 5")
SESSIONS = pytest.mark.mosquitto_only(reason="the embedded broker keeps nothing for a client "
                                      "that is away")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def collector(broker: Any, db: Path, device: str, **kwargs: Any) -> Collector:
    """A collector of one device's results (other tests' devices stay out), with a short session."""
    kwargs.setdefault("name", unique("c"))
    kwargs.setdefault("group", unique("g"))
    return Collector(db, BrokerConfig(url=broker.url), devices=[device], session_expiry_s=120,
                     **kwargs)


def result(seq: int, epoch: int = 1, msg_id: Any = None, stream: str = "cam") -> bytes:
    """A result as an agent publishes it (CONTRACT 5.3)."""
    now = time.time()
    return json.dumps({
        "id": f"m{seq}" if msg_id is None else msg_id, "stream": stream, "seq": seq, "epoch": epoch,
        "model": {"name": "digits", "version": "1"}, "outputs": {"probs": [[0.1] * 10]},
        "label": str(seq % 10), "score": 0.9, "top": [{"label": str(seq % 10), "score": 0.9}],
        "latency_ms": {"queue": 0.1, "inference": 0.4, "total": 0.7}, "ts_in": now, "ts_out": now,
    }).encode()


def publish(peer: Peer, device: str, payloads: list[bytes], stream: str = "cam") -> None:
    """QoS 1, each acknowledged by the broker before this returns."""
    infos = [peer.client.publish(f"{ROOT}/{device}/out/{stream}", p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(30)


def rows(db: Path, sql: str = "SELECT device, epoch, seq, id FROM results") -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_stores_every_result_of_a_real_agent_once(bench: Bench, digits_samples, tmp_path: Path  # type: ignore[no-untyped-def]
                                                  ) -> None:
    db = tmp_path / "results.db"
    with collector(bench.broker, db, bench.device_id) as c:
        sensor, _ = bench.start_online()
        samples = digits_samples(25)
        for i, (image, _) in enumerate(samples):
            sensor.send("camera0", {"id": f"img-{i}", "data": image})
        assert c.wait_for(25, timeout=60), c.stats
    stored = rows(db, "SELECT id, seq, epoch, device, stream, model_name, model_version, label, "
                      "latency_ms, payload FROM results ORDER BY seq")
    assert [r[0] for r in stored] == [f"img-{i}" for i in range(25)]  # one each, in order
    assert [r[1] for r in stored] == list(range(1, 26))
    assert {r[2:7] for r in stored} == {(1, bench.device_id, "camera0", "digits", "1")}
    correct = sum(r[7] == str(label) for r, (_, label) in zip(stored, samples, strict=True))
    assert correct >= 20  # a real model answered
    assert all(r[8] > 0 for r in stored)
    assert "outputs" in json.loads(stored[0][9])  # the whole result is kept
    assert c.stats.duplicates == 0
    assert c.stats.rejects == 0


@SHARED
def test_two_collectors_in_a_share_group_split_the_load(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # One database file for both: SQLite serialises their commits (WAL, busy timeout) and
    # UNIQUE(device, epoch, seq) holds across them, so a result redelivered to the other
    # collector is still stored once.
    db, device, group, n = tmp_path / "shared.db", unique("dev"), unique("g"), 600
    peer = Peer(broker, device, subscribe=[])
    with collector(broker, db, device, group=group, name="a") as a, \
            collector(broker, db, device, group=group, name="b") as b:
        publish(peer, device, [result(seq) for seq in range(1, n + 1)])
        deadline = time.monotonic() + 30
        while a.stats.stored + b.stats.stored < n and time.monotonic() < deadline:
            time.sleep(0.05)
    peer.close()
    assert a.stats.stored > 0
    assert b.stats.stored > 0  # both got a share
    assert a.stats.stored + b.stats.stored == n
    assert a.stats.duplicates + b.stats.duplicates == 0
    stored = rows(db)
    assert len(stored) == n
    assert {r[2] for r in stored} == set(range(1, n + 1))


@SHARED
def test_a_collector_down_for_a_while_misses_nothing(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Its persistent session keeps its share while it is away; at the restart (same name) it
    # gets what was published meanwhile, and acknowledged rows are not delivered twice.
    device, group = unique("dev"), unique("g")
    peer = Peer(broker, device, subscribe=[])
    with collector(broker, tmp_path / "a.db", device, group=group, name="a"):
        b = collector(broker, tmp_path / "b.db", device, group=group, name="b").start()
        publish(peer, device, [result(seq) for seq in range(1, 101)])
        b.wait_for(1, timeout=10)
        b.stop()
        publish(peer, device, [result(seq) for seq in range(101, 301)])
        with collector(broker, tmp_path / "b.db", device, group=group, name="b") as b2:
            deadline = time.monotonic() + 30
            while (len(rows(tmp_path / "a.db")) + len(rows(tmp_path / "b.db")) < 300
                   and time.monotonic() < deadline):
                time.sleep(0.1)
    peer.close()
    seqs = [r[2] for r in rows(tmp_path / "a.db") + rows(tmp_path / "b.db")]
    assert sorted(seqs) == list(range(1, 301))  # every one, once, across both files
    assert b2.stats.stored > 0  # the restarted collector got what was kept for it


def test_duplicates_are_stored_once_and_counted(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db, device = tmp_path / "results.db", unique("dev")
    peer = Peer(broker, device, subscribe=[])
    with collector(broker, db, device) as c:
        payloads = [result(seq) for seq in range(1, 11)]
        payloads += [result(3), result(7), result(7)]  # redelivered by an agent after a reconnect
        payloads += [result(5, msg_id="other")]  # same (device, epoch, seq): the same result
        payloads += [result(5, epoch=2)]  # a new epoch (the agent restarted): a new result
        publish(peer, device, payloads)
        deadline = time.monotonic() + 20
        while c.stats.handled < len(payloads) and time.monotonic() < deadline:
            time.sleep(0.05)
    peer.close()
    assert (c.stats.stored, c.stats.duplicates, c.stats.rejects) == (11, 4, 0)
    stored = rows(db)
    assert len(stored) == 11
    assert (device, 1, 5, "m5") in stored  # the first one wins


def test_malformed_payloads_are_counted_and_kept_aside(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db, device = tmp_path / "results.db", unique("dev")
    peer = Peer(broker, device, subscribe=[])
    bad = [b"not json", b"[1, 2, 3]", b'{"seq": 1, "id": "no epoch"}', b'{"epoch": "1", "seq": 2}',
           b"\xff\xfe\x00", b'{"epoch": -1, "seq": 3}', b"",
           result(4, msg_id=2**80),  # ids are strings or 64-bit integers (CONTRACT 5.3)
           result(5, msg_id={"nested": [1]})]
    with collector(broker, db, device) as c:
        publish(peer, device, [result(1), *bad])
        publish(peer, device, [result(2, msg_id=2)])
        publish(peer, device, [result(3)], stream="other")
        deadline = time.monotonic() + 20
        while c.stats.handled < len(bad) + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    peer.close()
    assert (c.stats.stored, c.stats.rejects) == (3, len(bad))  # good ones before and after
    assert rows(db, "SELECT seq, id, stream FROM results ORDER BY seq") == [
        (1, "m1", "cam"), (2, 2, "cam"), (3, "m3", "other")]
    rejects = rows(db, "SELECT reason, size, payload FROM rejects")
    assert len(rejects) == len(bad)
    reasons = " | ".join(r[0] for r in rejects)
    assert "not valid JSON" in reasons
    assert "missing required field `epoch`" in reasons
    assert "at `$.id`" in reasons
    assert rejects[0][1:] == (8, b"not json")


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["fleet", "collect", *args])


@SESSIONS
def test_cli_collects_count_results_and_prints_json(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db, device, name = tmp_path / "results.db", unique("dev"), unique("cli")
    common = ["--db", str(db), "--broker", broker.url, "--device", device, "--name", name]
    # a first run makes the persistent session; what is published while the collector is
    # stopped waits in it for the next run
    first = invoke(*common, "--duration", "0.5")
    assert first.exit_code == 0, first.output
    peer = Peer(broker, device, subscribe=[])
    publish(peer, device, [result(seq) for seq in range(1, 31)] + [result(4)])
    peer.close()
    out = invoke(*common, "--count", "30", "--duration", "30", "--json")
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert summary["stored"] == 30
    assert summary["reached"] is True
    assert summary["client_id"] == f"edgefleet-collect-{name}"
    assert "30 stored" in out.stderr
    assert len(rows(db)) == 30


def test_sigterm_commits_what_arrived_and_exits_0(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db, device = tmp_path / "results.db", unique("dev")
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet.cli", "fleet", "collect", "--db",
                             str(db), "--broker", broker.url, "--device", device, "--name",
                             unique("term"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    proc.stderr.readline()  # the first progress line: connected and subscribed
    peer = Peer(broker, device, subscribe=[])
    publish(peer, device, [result(seq) for seq in range(1, 21)])
    peer.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(rows(db)) < 20:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out)["stored"] == 20
    assert "20 stored" in err
    assert "Traceback" not in err


def test_cli_exits_1_when_count_is_not_reached(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = invoke("--db", str(tmp_path / "r.db"), "--broker", broker.url, "--device",
                 unique("dev"), "--count", "5", "--duration", "0.5")
    assert out.exit_code == 1
    assert "stored 0 of --count 5 results" in out.stderr


@pytest.mark.parametrize(("db", "extra", "message"), [
    ("missing-dir/r.db", [], "directory"),
    (".", [], "is a directory"),
    ("not-a-db.txt", [], "cannot use"),
    ("r.db", ["--group", "a/b"], "--group 'a/b' must match"),
    ("r.db", ["--broker", "mqtt://127.0.0.1:1", "--connect-timeout", "0.5"],
     "cannot connect to the broker at mqtt://127.0.0.1:1"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, db: str, extra: list[str],
                                        message: str) -> None:
    (tmp_path / "not-a-db.txt").write_text("this is not SQLite, " * 100)
    args = ["--db", str(tmp_path / db), "--broker", "mqtt://127.0.0.1:9", *extra]
    out = invoke(*args)
    assert out.exit_code == 2, out.output
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.output
