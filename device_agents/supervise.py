"""Supervised threads and the systemd handshake: a worker that dies is logged and restarted, one that
keeps dying takes the process down (exit 70) and one that hangs stops the watchdog pings, so systemd
restarts the unit either way instead of leaving a daemon that is up but no longer serving.

Who runs what:

    worker threads    `edgefleet-{name}`, one per `Supervisor.spawn`; a fresh thread per restart
    paho's thread     ours only through callbacks wrapped by `Supervisor.guard`
    watchdog thread   `edgefleet-watchdog`: asks `healthy()` every period, pings only when it holds

No third-party dependency: sd_notify is one datagram on the socket named by NOTIFY_SOCKET.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

log = logging.getLogger("edgefleet.supervise")

EXIT_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: an internal error, not a bad config (2) or a clean stop (0)

P = ParamSpec("P")
R = TypeVar("R")


def exit_process(reason: str) -> None:
    """The default `on_fatal`: flush the logs, then leave at once with EX_SOFTWARE.

    `os._exit`, not `sys.exit`: the latter only ends the calling thread when called from a worker,
    and a graceful shutdown from a broken state can hang on the very worker that broke. Nothing
    durable is lost: the outbox commits before it publishes, and the broker still holds every QoS 1
    message not acknowledged yet.
    """
    _flush_logs()
    os._exit(EXIT_SOFTWARE)


def _flush_logs() -> None:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):  # placeholders have no handlers
            with contextlib.suppress(Exception):  # a broken handler must not keep us alive
                handler.flush()
    for stream in (sys.stderr, sys.stdout):
        with contextlib.suppress(Exception):
            stream.flush()


@dataclass(frozen=True)
class _Policy:
    restart: bool
    max_restarts: int
    window_s: float
    heartbeat_s: float | None
    oneshot: bool
    backoff_s: float
    max_backoff_s: float


class Worker:
    """One supervised loop: its current thread, its recent failures and its last heartbeat."""

    def __init__(self, supervisor: Supervisor, name: str, target: Callable[[], None],
                 policy: _Policy) -> None:
        self.name = name
        self.restarts = 0  # for telemetry: how often this worker was brought back
        self._sup = supervisor
        self._target = target
        self._policy = policy
        self._lock = threading.Lock()
        self._failures: deque[float] = deque()  # monotonic times, only those inside the window
        self._thread: threading.Thread | None = None
        self._restarting = False
        self._finished = False  # a one-shot worker that returned, or any worker once stopping
        self._last_beat = time.monotonic()

    def beat(self) -> None:
        """Say the loop is still turning (a float store: no lock, cheap enough for every turn)."""
        self._last_beat = time.monotonic()

    def problem(self, now: float) -> str | None:
        """Why this worker is not healthy, or None when it is (running, restarting or done)."""
        with self._lock:
            if self._finished or self._restarting:
                return None
            thread = self._thread
        if thread is None or not thread.is_alive():
            return f"worker {self.name!r} is not running"
        heartbeat_s = self._policy.heartbeat_s
        silent_s = now - self._last_beat
        if heartbeat_s is not None and silent_s > heartbeat_s:
            # no running figure in the text: the watchdog logs a problem once, not at every check
            return f"worker {self.name!r} stalled: no beat in over {heartbeat_s:g} s"
        return None

    def _start(self) -> None:
        self._last_beat = time.monotonic()  # each run gets a full heartbeat period to get going
        thread = threading.Thread(target=self._run, name=f"edgefleet-{self.name}", daemon=True)
        with self._lock:
            self._thread = thread
        thread.start()
        with self._lock:
            self._restarting = False

    def _run(self) -> None:
        try:
            self._target()
        except (SystemExit, KeyboardInterrupt) as exc:
            # sys.exit() on a thread ends only that thread; honour the intent for the whole process
            if not self._sup.stopping:
                self._sup.fatal(f"worker {self.name!r} raised {exc!r}")
            return
        except BaseException as exc:
            if self._sup.stopping:
                log.exception("worker %s failed while stopping", self.name)
                return
            log.exception("worker %s failed", self.name)
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if self._policy.oneshot or self._sup.stopping:
                with self._lock:
                    self._finished = True
                return
            log.error("worker %s returned while the agent is running; its loop must not end", self.name)
            reason = "returned unexpectedly"
        # outside the except block, so the backoff does not hold the traceback and its frames
        self._failed(reason)

    def _failed(self, reason: str) -> None:
        policy = self._policy
        now = time.monotonic()
        with self._lock:
            self._failures.append(now)
            while self._failures and now - self._failures[0] > policy.window_s:
                self._failures.popleft()
            count = len(self._failures)
            again = policy.restart and count <= policy.max_restarts
            if again:
                self._restarting = True
                self.restarts += 1
        if not again:
            self._sup.fatal(f"worker {self.name!r} failed ({reason})" if not policy.restart else
                            f"worker {self.name!r} failed {count} times in {policy.window_s:g} s "
                            f"(last: {reason})")
            return
        # consecutive failures double the wait; the window forgets old ones, which resets it
        delay = min(policy.max_backoff_s, policy.backoff_s * 2 ** (count - 1))
        log.warning("restarting worker %s in %.2f s (failure %d of %d allowed in %g s)",
                    self.name, delay, count, policy.max_restarts, policy.window_s)
        if self._sup.wait_stopping(delay):
            with self._lock:
                self._restarting = False
                self._finished = True
            return
        self._start()


class Supervisor:
    """Owns the agent's worker threads: restarts the ones that fail, gives up loudly on the ones that
    keep failing, and answers `healthy()` for the watchdog."""

    def __init__(self, name: str, on_fatal: Callable[[str], None] | None = None) -> None:
        self.name = name
        self._on_fatal = on_fatal or exit_process
        self._workers: dict[str, Worker] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._fatal_reason: str | None = None
        self._callback_errors: Counter[str] = Counter()

    def spawn(self, name: str, target: Callable[[], None], *, restart: bool = True,
              max_restarts: int = 5, window_s: float = 60.0, heartbeat_s: float | None = None,
              oneshot: bool = False, backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> Worker:
        """Run `target` on the daemon thread `edgefleet-{name}`, under supervision.

        A failure is an exception or, unless `oneshot`, a return while not stopping. It is restarted
        after a backoff (`backoff_s` doubling to `max_backoff_s`) while `restart` holds and it has
        failed at most `max_restarts` times in `window_s`; otherwise the supervisor goes `fatal`.
        With `heartbeat_s`, the target must call `beat` that often or count as stalled.
        """
        if max_restarts < 0 or window_s <= 0 or backoff_s < 0 or (heartbeat_s is not None
                                                                  and heartbeat_s <= 0):
            raise ValueError("max_restarts, backoff_s must be >= 0; window_s, heartbeat_s > 0")
        policy = _Policy(restart, max_restarts, window_s, heartbeat_s, oneshot, backoff_s, max_backoff_s)
        worker = Worker(self, name, target, policy)
        with self._lock:
            if name in self._workers:
                raise ValueError(f"a worker named {name!r} is already supervised by {self.name}")
            self._workers[name] = worker
        worker._start()
        return worker

    def join(self, name: str, timeout: float | None = None) -> None:
        """Wait for the worker `name` to end (after `stop()`), at most `timeout` seconds."""
        worker = self._workers.get(name)
        thread = worker._thread if worker is not None else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def beat(self, name: str) -> None:
        """Heartbeat of the worker `name` (KeyError for a name never spawned: a wiring bug)."""
        self._workers[name].beat()

    def guard(self, name: str, fn: Callable[P, R]) -> Callable[P, R | None]:
        """Wrap a callback that runs on a thread we do not own (paho's network thread): an exception
        is logged with its traceback and counted, and the call returns None. Letting it through
        would end paho's loop, and with it the connection, for one bad message."""

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R | None:
            try:
                return fn(*args, **kwargs)
            except Exception:
                with self._lock:
                    self._callback_errors[name] += 1
                log.exception("callback %s failed; carrying on", name)
                return None

        return guarded

    def callback_errors(self) -> dict[str, int]:
        """How many times each guarded callback raised, for telemetry."""
        with self._lock:
            return dict(self._callback_errors)

    def healthy(self) -> tuple[bool, list[str]]:
        """Whether every worker is running (or restarting, or a one-shot that is done) and beating
        in time; with the problems, one line each. While stopping, workers ending is no problem."""
        with self._lock:
            workers = list(self._workers.values())
            fatal = self._fatal_reason
        problems = [f"fatal: {fatal}"] if fatal is not None else []
        if not self.stopping:
            now = time.monotonic()
            problems += [p for w in workers if (p := w.problem(now)) is not None]
        return not problems, problems

    def fatal(self, reason: str) -> None:
        """Give up on the process: log at critical and call `on_fatal` (once; later calls log only).
        `healthy()` stays false from now on, so the watchdog stops pinging even if `on_fatal`
        returns."""
        with self._lock:
            first = self._fatal_reason is None
            if first:
                self._fatal_reason = reason
        log.critical("%s gives up: %s", self.name, reason)
        if first:
            self._on_fatal(reason)

    def stop(self) -> None:
        """Mark the supervisor as stopping: workers may end now, and none is restarted."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_stopping(self, timeout: float | None = None) -> bool:
        """Sleep until `stop()` or `timeout`; True if stopping. A worker loop may pace itself with it."""
        return self._stopping.wait(timeout)


class SystemdNotifier:
    """sd_notify(3) without libsystemd: states sent as datagrams to NOTIFY_SOCKET; a no-op returning
    False when the process was not started by systemd (a shell, a test, a container)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if env is None else env  # os.environ: read at each call

    def notify(self, state: str) -> bool:
        """Send `state` (e.g. "READY=1"); True when the datagram went out."""
        address = self._env.get("NOTIFY_SOCKET", "")
        if not address:
            return False
        if address[0] == "@":
            address = "\0" + address[1:]  # an abstract socket: no file, a leading NUL byte
        elif address[0] != "/":
            log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract socket; not notifying",
                        address)
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(state.encode(), address)
        except OSError as exc:
            log.warning("cannot notify systemd (%s): %s", state.split("=", 1)[0], exc)
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """The one line `systemctl status` shows for the unit."""
        return self.notify("STATUS=" + text.replace("\n", " "))

    def watchdog_interval(self) -> float | None:
        """How often to ping, in seconds: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises;
        None when no watchdog is set or it is meant for another process (WATCHDOG_PID)."""
        pid = self._env.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return None
        try:
            usec = int(self._env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 2e6 if usec > 0 else None


class Watchdog:
    """The thread `edgefleet-watchdog`: every period it asks the supervisor (and `extra_check`, for
    what is not a worker: the broker link, the outbox) and pings systemd only if all is well. A
    stuck or dead worker therefore ends in a WatchdogSec kill and a restart, not a zombie daemon."""

    def __init__(self, supervisor: Supervisor, notifier: SystemdNotifier, *,
                 extra_check: Callable[[], list[str]] | None = None, period_s: float | None = None,
                 fallback_period_s: float = 10.0) -> None:
        self.supervisor = supervisor
        self.notifier = notifier
        self.extra_check = extra_check
        # without a systemd watchdog the checks still run, so problems reach the log
        self.period_s = period_s or notifier.watchdog_interval() or fallback_period_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgefleet-watchdog", daemon=True)
        self._last_problems: list[str] = []

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def ready(self) -> None:
        """Tell systemd the agent is up (READY=1, once): call it when serving, before the broker
        link if the agent must serve offline, or a dead uplink at boot becomes a restart loop."""
        if not self._ready.is_set():
            self._ready.set()
            self.notifier.ready()

    def stop(self, timeout: float = 5.0) -> None:
        """End the pings, then STOPPING=1: from here on TimeoutStopSec, not the watchdog, applies."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.notifier.stopping()

    def check(self) -> list[str]:
        """Everything wrong right now: the supervisor's problems and the extra check's."""
        problems = self.supervisor.healthy()[1]
        if self.extra_check is not None:
            try:
                problems += self.extra_check()
            except Exception as exc:
                log.exception("health check failed")
                problems.append(f"health check failed: {type(exc).__name__}: {exc}")
        return problems

    def _loop(self) -> None:
        while True:
            problems = self.check()
            if problems != self._last_problems:
                if problems:
                    log.error("unhealthy, withholding the watchdog ping: %s", "; ".join(problems))
                    self.notifier.status("unhealthy: " + "; ".join(problems))
                else:
                    log.warning("healthy again, watchdog pings resume")
                    self.notifier.status("healthy")
                self._last_problems = problems
            if not problems:
                self.notifier.watchdog()
            if self._stop.wait(self.period_s):
                return
