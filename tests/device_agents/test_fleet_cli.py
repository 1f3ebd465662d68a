"""`edgefleet fleet status | call | rollback` against a real agent, and their errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.device_agents.conftest import Bench


def fleet(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet.cli", "fleet", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_status_call_and_rollback_against_a_real_agent(bench: Bench) -> None:
    bench.start_online()
    out = fleet("status", "--json", "--wait", "2.5", "--broker", bench.broker.url)
    assert out.returncode == 0, out.stderr
    rows = {r["device"]: r for r in json.loads(out.stdout)}
    row = rows[bench.device_id]
    assert row["state"] == "online"
    assert row["models"] == ["digits:1"]
    assert row["groups"] == ["test"]
    assert row["outbox_depth"] is not None  # telemetry arrived (every second in this config)
    table = fleet("status", "--broker", bench.broker.url, "--wait", "1")
    assert bench.device_id in table.stdout
    ping = fleet("call", bench.device_id, "ping", "--broker", bench.broker.url)
    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout)["data"]["pong"] is True
    rollback = fleet("rollback", "--device", bench.device_id, "--model", "digits",
                     "--broker", bench.broker.url)
    assert rollback.returncode == 1
    assert "no previous version" in json.loads(rollback.stdout)["error"]


@pytest.mark.parametrize(("args", "message"), [
    (["call", "nobody-here", "ping", "--timeout", "1"], "nobody-here did not answer ping"),
    (["deploy", "."], "give --device ID (repeatable) or --group G"),
    (["call", "x", "ping", "--arg", "novalue"], "--arg 'novalue' is not k=v"),
    (["status", "--broker", "http://nope"], "must look like mqtt://host:port"),
])
def test_fleet_errors_are_one_line(broker, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    if "--broker" not in args:
        args = [*args, "--broker", broker.url]
    out = fleet(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_broker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = fleet("status", "--broker", "mqtt://127.0.0.1:1", timeout=60)
    assert out.returncode == 2
    assert "cannot connect to the broker" in out.stderr
