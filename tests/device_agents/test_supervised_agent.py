"""A real agent process with a fault injected into one of its workers: the worker is restarted
and the next message is served; a worker that keeps failing ends the process with exit code 70
(the systemd unit restarts it), never a process that lives on without it."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from device_agents.agent import BEAT_S
from tests.device_agents.conftest import Bench
from tests.support.agent import ROOT, AgentProcess, wait_for_status

pytestmark = [pytest.mark.broker, pytest.mark.slow]

WORKERS = {
    "intake": ("device_agents.intake", "Intake", "loop"),
    "requests": ("device_agents.requests", "RequestWorker", "loop"),
    "publisher": ("device_agents.publisher", "Publisher", "loop"),
    "telemetry": ("device_agents.agent", "Agent", "_telemetry_loop"),
    "delivery": ("device_agents.delivery", "DeliveryManager", "loop"),
}


def _start(bench: Bench, worker: str, mode: str) -> AgentProcess:
    agent = AgentProcess(bench.config, inject=(*WORKERS[worker], mode)).start()
    bench.agents.append(agent)
    return agent


@pytest.mark.parametrize("worker", sorted(WORKERS))
def test_a_worker_that_fails_is_restarted_and_the_agent_serves_on(
        bench: Bench, worker: str, digits_samples: Any) -> None:
    watcher = bench.peer()
    agent = _start(bench, worker, "once")
    wait_for_status(watcher, "online")
    image, label = digits_samples(1)[0]
    watcher.send("cam", {"id": "after", "data": image})
    result = watcher.collect("/out/cam", 1, timeout=30)[0]
    assert (result["id"], result["label"]) == ("after", str(label))
    watcher.client.publish(f"{ROOT}/{bench.device_id}/request/ping",
                           json.dumps({"transaction": "p"}), qos=1)
    assert watcher.collect("/response/ping", 1, timeout=30)[0]["status"] == "ok"
    assert watcher.collect("/telemetry", 1, timeout=30)  # the telemetry worker beats again
    assert agent.proc is not None
    assert agent.proc.poll() is None
    logs = agent.logs()
    assert f"injected fault in {WORKERS[worker][1]}.{WORKERS[worker][2]}" in logs
    assert "Traceback" in logs
    assert f"restarting worker {worker}" in logs
    assert agent.stop() == 0


def test_a_worker_that_keeps_failing_ends_the_process_non_zero(bench: Bench) -> None:
    watcher = bench.peer()
    agent = _start(bench, "intake", "always")
    assert agent.proc is not None
    code = agent.proc.wait(60)
    assert code == 70, agent.logs()[-2000:]
    assert "worker 'intake' failed" in agent.logs()
    # the Last Will tells the fleet: the process is gone, not a zombie that looks fine
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        doc = watcher.collect("/status", 1, timeout=deadline - time.monotonic())[0]
        if doc.get("state") == "offline":
            break
    else:
        raise AssertionError("no offline status after the exit")


class NotifySocket:
    """What systemd's NOTIFY_SOCKET receives from the agent, with arrival times."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []

    def read_for(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        new: list[str] = []
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.got.append((time.monotonic(), line))
                new.append(line)
        return new

    def close(self) -> None:
        self.sock.close()


def _env(notify: NotifySocket) -> dict[str, str]:
    return {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s


def test_systemd_hears_ready_watchdog_pings_and_stopping(bench: Bench, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify")
    try:
        agent = bench.agent(env=_env(notify))
        lines = notify.read_for(4)
        assert "READY=1" in lines
        assert lines.count("WATCHDOG=1") >= 4, lines
        assert agent.stop() == 0
        assert "STOPPING=1" in notify.read_for(1)
    finally:
        notify.close()


def test_a_hung_worker_stops_the_watchdog_pings(bench: Bench, tmp_path: Path) -> None:
    """A worker that stops beating (here: the telemetry loop hangs) is a stalled agent: the pings
    stop, so systemd's WatchdogSec kills and restarts it."""
    notify = NotifySocket(tmp_path / "notify")
    try:
        agent = AgentProcess(bench.config, env=_env(notify),
                             inject=(*WORKERS["telemetry"], "hang")).start()
        bench.agents.append(agent)
        first = notify.read_for(3)
        assert "READY=1" in first
        assert "WATCHDOG=1" in first  # healthy until the heartbeat period has passed
        deadline = time.monotonic() + BEAT_S + 15
        while time.monotonic() < deadline:
            if any(line.startswith("STATUS=") and "stalled" in line for line in notify.read_for(1)):
                break
        else:
            raise AssertionError(f"no stalled status: {notify.got[-5:]}")
        assert "WATCHDOG=1" not in notify.read_for(3)  # no ping while stalled
        assert "telemetry" in agent.logs()
    finally:
        notify.close()
