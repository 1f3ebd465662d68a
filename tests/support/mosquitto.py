"""A real Mosquitto broker on a free port, started and stopped by the tests.

Persistence is on, so a restart keeps retained messages and persistent sessions, as a production
broker would; `stop()` then `start()` gives the tests a broker outage on the same port.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(proc: subprocess.Popen[bytes], host: str, port: int, timeout: float, name: str,
                   logs: Callable[[], str], on_timeout: Callable[[], None]) -> None:
    """Until a broker process accepts TCP on host:port; its logs in the error if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {logs()}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    on_timeout()
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    """SIGTERM (a clean stop) or SIGKILL (a crash), then SIGKILL if it does not go in 10 s."""
    if proc.poll() is None:
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Mosquitto:
    kind = "mosquitto"
    persistent = True  # sessions and retained messages survive a restart (persistence on)
    mqtt5 = True

    def __init__(self, workdir: Path, port: int | None = None, *, listener_options: str = "",
                 allow_anonymous: bool = True, tls: bool = False) -> None:
        binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if binary is None:
            raise RuntimeError("mosquitto is not installed: apt-get install -y mosquitto "
                               "mosquitto-clients (scripts/test does this for you)")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = tls
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "mosquitto.log"
        self.conf_path = workdir / "mosquitto.conf"
        self.conf_path.write_text(
            # As root, mosquitto would drop to the 'mosquitto' user and lose access to workdir.
            f"user {getpass.getuser()}\n"
            f"listener {self.port} {self.host}\n"
            f"{listener_options}"
            f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
            # Nagle's algorithm holds a small packet until the previous one is ACKed; over a
            # link (or the emulator) that costs up to a round trip per message. Latency first.
            "set_tcp_nodelay true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(self.proc, self.host, self.port, timeout, "mosquitto", lambda: (
            (self.proc.stderr.read().decode() if self.proc and self.proc.stderr else "")
            + (self.log_path.read_text() if self.log_path.exists() else "")), self.stop)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker: SIGTERM saves its state; kill=True is a crash (SIGKILL)."""
        if self.proc is None:
            return
        stop_process(self.proc, kill=kill)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
