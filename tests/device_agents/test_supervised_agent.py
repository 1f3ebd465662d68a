"""A real agent process with a fault injected into one of its workers: the worker is restarted
and the next message is served; a worker that keeps failing ends the process with exit code 70
(the systemd unit restarts it), never a process that lives on without it."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

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
