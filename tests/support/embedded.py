"""The embedded broker (`edgefleet broker`, amqtt) as a real process, with Mosquitto's test API.

It runs the command a user runs, in its own process, so a test can stop it for an outage and a
slow broker never shares the GIL with the code under test. amqtt keeps state in memory: a restart
loses retained messages and sessions (the tests that need them to survive say so).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.mosquitto import free_port, stop_process, wait_listening


class EmbeddedBrokerProcess:
    kind = "amqtt"
    persistent = False  # sessions and retained messages do not survive a restart
    mqtt5 = False

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.tls = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "broker.log"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        if self.running:
            return
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "broker", "--host", self.host, "--port",
             str(self.port)], stdout=log, stderr=log)
        log.close()
        wait_listening(self.proc, self.host, self.port, timeout, "edgefleet broker",
                       self.log_path.read_text, self.stop)

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, kill=kill)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
