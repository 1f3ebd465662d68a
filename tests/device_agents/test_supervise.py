"""Supervised workers and the systemd handshake, with real threads and a real NOTIFY_SOCKET: a worker
that fails comes back, one that keeps failing takes the process down, one that hangs stops the
watchdog pings."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device_agents.supervise import EXIT_SOFTWARE, Supervisor, SystemdNotifier, Watchdog

REPO = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], object], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


class NotifySocket:
    """The service manager's end: a datagram socket that collects what the notifier sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def wait_for(self, prefix: str, timeout: float = 2.0) -> list[str]:
        """Every state received up to and including the first starting with `prefix`."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while not (seen and seen[-1].startswith(prefix)):
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                seen.append(self.sock.recv(4096).decode())
            except TimeoutError:
                raise AssertionError(f"no {prefix!r} in time; got {seen}") from None
        return seen

    def during(self, seconds: float) -> list[str]:
        """Every state received in the next `seconds`."""
        seen: list[str] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                seen.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        return seen


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    if request.param == "abstract" and not sys.platform.startswith("linux"):
        pytest.skip("abstract sockets are Linux only")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if request.param == "path":
            address = str(tmp_path / "notify.sock")
            sock.bind(address)
        else:
            name = f"edgefleet-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            address = "@" + name
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield NotifySocket(sock)


@pytest.fixture
def fatal_reasons() -> list[str]:
    return []


@pytest.fixture
def supervisor(fatal_reasons: list[str]) -> Iterator[Supervisor]:
    sup = Supervisor("test-agent", on_fatal=fatal_reasons.append)
    yield sup
    sup.stop()


def test_a_worker_that_raises_is_logged_and_restarted_on_a_fresh_thread(
        supervisor: Supervisor, fatal_reasons: list[str], caplog: pytest.LogCaptureFixture) -> None:
    runs: list[threading.Thread] = []

    def flaky() -> None:
        runs.append(threading.current_thread())
        if len(runs) == 1:
            raise ValueError("first run fails")
        supervisor.wait_stopping()

    worker = supervisor.spawn("flaky", flaky, backoff_s=0.01)
    wait_until(lambda: len(runs) == 2)

    assert runs[0] is not runs[1]
    assert [t.name for t in runs] == ["edgefleet-flaky", "edgefleet-flaky"]
    assert worker.restarts == 1
    failed = [r for r in caplog.records if r.name == "edgefleet.supervise" and r.exc_info]
    assert "flaky" in failed[0].getMessage()
    assert "ValueError: first run fails" in caplog.text  # the traceback, not just the message
    wait_until(lambda: supervisor.healthy()[0])
    assert fatal_reasons == []


def test_a_worker_that_keeps_failing_goes_fatal_naming_it(
        supervisor: Supervisor, fatal_reasons: list[str], caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def doomed() -> None:
        calls.append(1)
        raise OSError("disk gone")

    supervisor.spawn("doomed", doomed, max_restarts=2, backoff_s=0.01)
    wait_until(lambda: fatal_reasons)

    assert len(calls) == 3  # the first run and two restarts
    assert len(fatal_reasons) == 1
    assert "'doomed'" in fatal_reasons[0]
    assert "disk gone" in fatal_reasons[0]
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)
    ok, problems = supervisor.healthy()
    assert not ok
    assert problems[0].startswith("fatal: worker 'doomed'")


def test_backoff_doubles_between_restarts(supervisor: Supervisor, fatal_reasons: list[str]) -> None:
    starts: list[float] = []

    def doomed() -> None:
        starts.append(time.monotonic())
        raise OSError("again")

    supervisor.spawn("doomed", doomed, max_restarts=4, backoff_s=0.02, max_backoff_s=0.04)
    wait_until(lambda: fatal_reasons)

    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.02
    assert gaps[1] >= 0.04  # doubled
    assert gaps[3] < 0.16  # capped at 0.04 (uncapped it would be 0.16), with room for a busy machine


@pytest.mark.parametrize("restart", [True, False])
def test_a_worker_that_returns_unexpectedly_is_a_failure(
        supervisor: Supervisor, fatal_reasons: list[str], restart: bool) -> None:
    runs: list[int] = []

    def quits() -> None:
        runs.append(1)

    worker = supervisor.spawn("quits", quits, restart=restart, max_restarts=1, backoff_s=0.01)
    wait_until(lambda: fatal_reasons)

    assert "'quits'" in fatal_reasons[0]
    assert "returned unexpectedly" in fatal_reasons[0]
    assert len(runs) == (2 if restart else 1)
    assert worker.restarts == (1 if restart else 0)


def test_a_worker_that_raises_without_restart_goes_fatal_at_once(
        supervisor: Supervisor, fatal_reasons: list[str]) -> None:
    def broken() -> None:
        raise KeyError("no such model")

    supervisor.spawn("broken", broken, restart=False)
    wait_until(lambda: fatal_reasons)
    assert fatal_reasons == ["worker 'broken' failed (KeyError: 'no such model')"]


def test_a_worker_calling_exit_ends_the_process_not_just_its_thread(
        supervisor: Supervisor, fatal_reasons: list[str]) -> None:
    supervisor.spawn("exits", lambda: sys.exit(3))
    wait_until(lambda: fatal_reasons)
    assert fatal_reasons == ["worker 'exits' raised SystemExit(3)"]


def test_one_shot_workers_and_workers_ending_on_stop_are_fine(
        supervisor: Supervisor, fatal_reasons: list[str]) -> None:
    done = threading.Event()
    supervisor.spawn("sync-once", done.set, oneshot=True)
    ended = threading.Event()

    def loop() -> None:
        supervisor.wait_stopping()
        ended.set()

    supervisor.spawn("loop", loop)
    assert done.wait(2)
    wait_until(lambda: supervisor.healthy()[0])

    supervisor.stop()
    assert ended.wait(2)
    time.sleep(0.05)
    assert supervisor.healthy() == (True, [])
    assert fatal_reasons == []


def test_a_worker_that_stops_beating_is_unhealthy(supervisor: Supervisor) -> None:
    stuck = threading.Event()

    def loop() -> None:
        while not supervisor.wait_stopping(0.01):
            if not stuck.is_set():
                supervisor.beat("loop")

    supervisor.spawn("loop", loop, heartbeat_s=0.25)
    time.sleep(0.3)
    assert supervisor.healthy() == (True, [])  # alive and beating past its heartbeat period

    stuck.set()  # still alive, no longer turning: a hang, not a crash
    wait_until(lambda: not supervisor.healthy()[0])
    assert supervisor.healthy()[1] == ["worker 'loop' stalled: no beat in over 0.25 s"]

    stuck.clear()
    wait_until(lambda: supervisor.healthy()[0])


def test_a_worker_name_is_supervised_once(supervisor: Supervisor) -> None:
    supervisor.spawn("loop", supervisor.wait_stopping)
    with pytest.raises(ValueError, match="already supervised"):
        supervisor.spawn("loop", supervisor.wait_stopping)


def test_guard_swallows_logs_and_counts(supervisor: Supervisor,
                                        caplog: pytest.LogCaptureFixture) -> None:
    def on_message(payload: bytes) -> int:
        if not payload:
            raise ValueError("empty payload")
        return len(payload)

    guarded = supervisor.guard("on_message", on_message)
    results: list[int | None] = []
    foreign = threading.Thread(target=lambda: results.extend([guarded(b""), guarded(b"abc")]))
    foreign.start()  # a thread we do not own, like paho's network loop
    foreign.join(2)

    assert results == [None, 3]
    assert guarded.__name__ == "on_message"
    assert supervisor.callback_errors() == {"on_message": 1}
    assert "callback on_message failed" in caplog.text
    assert "ValueError: empty payload" in caplog.text


def test_notifier_sends_each_state_to_the_socket(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier()

    assert notifier.ready()
    assert notifier.status("serving\n2 models")
    assert notifier.watchdog()
    assert notifier.stopping()

    assert notify_socket.during(0.1) == ["READY=1", "STATUS=serving 2 models", "WATCHDOG=1", "STOPPING=1"]


def test_notifier_without_a_reachable_socket_does_nothing(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not SystemdNotifier().ready()
    assert not SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")}).ready()
    assert not SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:999"}).ready()


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # meant for another
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(env: dict[str, str], expected: float | None) -> None:
    assert SystemdNotifier(env).watchdog_interval() == expected


def test_watchdog_withholds_pings_while_a_worker_is_stalled(
        supervisor: Supervisor, notify_socket: NotifySocket, caplog: pytest.LogCaptureFixture) -> None:
    stuck = threading.Event()

    def loop() -> None:
        while not supervisor.wait_stopping(0.01):
            if not stuck.is_set():
                supervisor.beat("loop")

    supervisor.spawn("loop", loop, heartbeat_s=0.25)
    dog = Watchdog(supervisor, SystemdNotifier(), period_s=0.02)
    dog.ready()
    dog.start()
    dog.ready()  # READY=1 goes out once

    assert notify_socket.wait_for("WATCHDOG=1")[0] == "READY=1"

    stuck.set()
    notify_socket.wait_for("STATUS=unhealthy: worker 'loop' stalled")
    assert "WATCHDOG=1" not in notify_socket.during(0.2)  # ten periods, not one ping

    stuck.clear()
    assert notify_socket.wait_for("WATCHDOG=1")[-2:] == ["STATUS=healthy", "WATCHDOG=1"]

    supervisor.stop()
    dog.stop()
    assert notify_socket.during(0.1)[-1:] == ["STOPPING=1"]
    assert "READY=1" not in notify_socket.during(0.05)
    withheld = [r for r in caplog.records if "withholding the watchdog ping" in r.getMessage()]
    assert len(withheld) == 1  # logged once per change, not at every check


def test_watchdog_counts_the_extra_check_and_survives_its_failure(supervisor: Supervisor) -> None:
    link: list[str] = ["uplink: not connected for 120 s"]
    assert Watchdog(supervisor, SystemdNotifier({}), extra_check=lambda: link).check() == link

    def broken() -> list[str]:
        raise OSError("outbox unreadable")

    problems = Watchdog(supervisor, SystemdNotifier({}), extra_check=broken).check()
    assert problems == ["health check failed: OSError: outbox unreadable"]


SCRIPT = """
import logging, time
from device_agents.supervise import Supervisor

logging.basicConfig(level=logging.INFO)

def intake():
    raise ValueError("sensor table is gone")

Supervisor("agent").spawn("intake", intake, max_restarts=2, backoff_s=0.01)
time.sleep(30)  # the main thread idles, as the agent's does; only the worker can end the process
"""


def test_a_process_whose_worker_keeps_failing_exits_70() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=20, check=False)

    assert proc.returncode == EXIT_SOFTWARE == 70
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: sensor table is gone" in proc.stderr
    assert "CRITICAL:edgefleet.supervise:agent gives up: worker 'intake' failed 3 times" in proc.stderr
