"""`edgefleet demo --quick` runs end to end over MQTT: trains, compresses, starts the embedded broker
and an agent, streams the digits test split, deploys version 2 mid-stream, loses nothing, and
leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.mosquitto import Mosquitto


def _run_demo(tmp_path: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    proc = subprocess.run([sys.executable, "-m", "edgefleet", "demo", "--quick", "--json",
                           "--workdir", str(tmp_path), *extra], capture_output=True, text=True,
                          timeout=420, env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary: dict = json.loads(proc.stdout)  # type: ignore[type-arg]
    return summary


def _check(summary: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    stream, update = summary["stream"], summary["update"]
    assert stream["lost"] == 0
    assert stream["errors"] == 0
    assert stream["sent"] == stream["answered"] == stream["count"] > 0
    assert update["ok"], update
    assert update["healthy"], update
    assert update["sent_bytes"] > 0
    assert set(stream["answered_by_version"]) == {"1", "2"}, "the update did not land mid-stream"
    assert min(stream["accuracy_by_version"].values()) > 0.8
    assert stream["latency_ms"]["p50"] > 0
    assert (tmp_path / "digits-v2" / "manifest.sig").exists()
    assert set(summary["compression"]) == {"1", "2"}


def _no_process_left(tmp_path: Path) -> None:
    """Nothing the demo started still runs: no process has the workdir on its command line."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in out


@pytest.mark.slow
def test_demo_quick_end_to_end_with_the_embedded_broker(tmp_path: Path):
    summary = _run_demo(tmp_path)
    assert summary["broker"].startswith("embedded")
    _check(summary, tmp_path)
    _no_process_left(tmp_path)


@pytest.mark.slow
def test_demo_quick_against_mosquitto(tmp_path: Path, mosquitto: Mosquitto):
    mosquitto.start()
    summary = _run_demo(tmp_path, "--broker", mosquitto.url)
    assert summary["broker"] == "external"
    _check(summary, tmp_path)
    _no_process_left(tmp_path)


@pytest.mark.slow
def test_ctrl_c_mid_stream_stops_every_process(tmp_path: Path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "demo", "--quick",
                             "--workdir", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        seen.append(line)
        if "demo-box online" in line:
            break
        assert time.monotonic() < deadline, "".join(seen[-20:])
    time.sleep(2)  # the stream has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped the agent" in out, out[-2000:]
    assert "stopped the broker" in out, out[-2000:]
    _no_process_left(tmp_path)
