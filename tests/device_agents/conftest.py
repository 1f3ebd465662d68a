"""Fixtures for agent tests: a config per test, the agent as a real process, MQTT peers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.package import Package
from tests.support.agent import AgentProcess, Peer, wait_for_status, write_config
from tests.support.mosquitto import Mosquitto


class Bench:
    """One device under test: its config, its agent processes and a peer watching its topics."""

    def __init__(self, tmp: Path, broker: Mosquitto, package: Path, keys: list[Path]) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        self.device_id = f"dev-{uuid.uuid4().hex[:8]}"
        self.package = package
        self.keys = keys
        self.data_dir = tmp / "data"
        self.agents: list[AgentProcess] = []
        self.peers: list[Peer] = []
        self.config = self.write()

    def write(self, *, broker_url: str | None = None, extra: str = "",
              package: Path | bool | None = True, command_keys: list[Path] | None = None) -> Path:
        pkg = self.package if package is True else (package or None)
        self.config = write_config(self.tmp / "agent.toml", device_id=self.device_id,
                                   broker_url=broker_url or self.broker.url,
                                   data_dir=self.data_dir, package=pkg, keys=self.keys,
                                   extra=extra, command_keys=command_keys)
        return self.config

    def agent(self, env: dict[str, str] | None = None) -> AgentProcess:
        proc = AgentProcess(self.config, env).start()
        self.agents.append(proc)
        return proc

    def uplink_through(self, link: Any, *, local_sensors: bool = False) -> None:
        """Point the agent's uplink at a link emulator; sensors on the broker directly if asked."""
        host, port = link.address
        self.write(broker_url=f"mqtt://{host}:{port}",
                   extra=f'\n[sensors]\nurl = "{self.broker.url}"\n' if local_sensors else "")

    def start_online(self) -> tuple[Peer, AgentProcess]:
        """A peer watching the device, and the agent started and seen online by it."""
        watcher = self.peer()
        agent = self.agent()
        wait_for_status(watcher, "online")
        return watcher, agent

    def peer(self, **kwargs: Any) -> Peer:
        peer = Peer(self.broker, self.device_id, **kwargs)
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        for proc in self.agents:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop(kill=True)
        for peer in self.peers:
            peer.close()


@pytest.fixture
def bench(tmp_path: Path, broker: Mosquitto, signed_digits_package: Package,
          keys_dir: Path) -> Iterator[Bench]:
    b = Bench(tmp_path, broker, signed_digits_package.path, [keys_dir / "fleet.pub"])
    yield b
    b.close()


@pytest.fixture
def digits_samples(digits_split: Any) -> Callable[[int], list[tuple[list[Any], int]]]:
    """Real test images of scikit-learn's digits as JSON-ready nested lists, with labels."""

    def take(n: int) -> list[tuple[list[Any], int]]:
        x, y = digits_split.x_test, digits_split.y_test
        return [(x[i % len(x)].tolist(), int(y[i % len(y)])) for i in range(n)]

    return take
