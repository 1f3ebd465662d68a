"""A disk that really fills (a tmpfs mounted by the test) under a streaming sensor: while it is
full nothing is acknowledged before it is durable; once space returns the agent carries on by
itself and every accepted message is answered."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.package import Package
from tests.device_agents.conftest import Bench
from tests.support.agent import ROOT
from tests.support.mosquitto import Mosquitto


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs",
                                            str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and a kernel that allows it here)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(mount: Path) -> Path:
    """Take every free byte of the file system."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.mosquitto_only(reason="the embedded broker keeps no session: what it sent while "
                            "the agent dropped its connection is not delivered again")
def test_a_full_disk_stalls_nothing_for_good_and_loses_nothing(
        small_disk: Path, broker: Mosquitto, signed_digits_package: Package, keys_dir: Path,
        digits_samples: Any) -> None:
    bench = Bench(small_disk, broker, signed_digits_package.path, [keys_dir / "fleet.pub"])
    try:
        events = bench.peer(subscribe=[f"{ROOT}/{bench.device_id}/event"])
        watcher, agent = bench.start_online()
        samples = digits_samples(20)
        sent: list[str] = []
        stop = threading.Event()

        def stream() -> None:
            i = 0
            while not stop.is_set():
                msg_id = f"m{i}"
                watcher.send("cam", {"id": msg_id, "data": samples[i % len(samples)][0]})
                sent.append(msg_id)
                i += 1
                time.sleep(0.02)

        sender = threading.Thread(target=stream)
        sender.start()
        try:
            time.sleep(1.5)
            filler = _fill(small_disk)
            time.sleep(4)  # full: commits fail
            filler.unlink()  # space returns
            time.sleep(2)
        finally:
            stop.set()
            sender.join()
        answered = watcher.drain("/out/cam", set(sent), timeout=60)
        assert set(sent) <= set(answered)
        assert agent.proc is not None
        assert agent.proc.poll() is None, agent.logs()[-3000:]  # it never restarted
        logs = agent.logs()
        assert "outbox write failed (database or disk is full)" in logs  # the disk really filled
        (recovered,) = events.collect("/event", 1, timeout=20)
        assert recovered["type"] == "storage_recovered"
        assert recovered["refused"] >= 1
    finally:
        bench.close()
