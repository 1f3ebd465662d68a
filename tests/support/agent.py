"""Running the real agent as a process, and real MQTT peers around it (sensor, collector)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.mosquitto import Mosquitto

ROOT = "edgefleet/v1"


def write_config(path: Path, *, device_id: str, broker_url: str, data_dir: Path,
                 package: Path | None, keys: list[Path], extra: str = "",
                 command_keys: list[Path] | None = None) -> Path:
    lines = [f'device_id = "{device_id}"', 'groups = ["test"]', f'data_dir = "{data_dir}"', "",
             "[uplink]", f'url = "{broker_url}"', "keepalive_s = 5", ""]
    if package is not None:
        lines += ["[[models]]", f'package = "{package}"', ""]
    lines += ["[security]", f"trusted_keys = {json.dumps([str(k) for k in keys])}",
              "require_signed = true"]
    if command_keys:
        lines += [f"command_keys = {json.dumps([str(k) for k in command_keys])}"]
    lines += ["", "[agent]", "telemetry_interval_s = 1", ""]
    path.write_text("\n".join(lines) + extra)
    return path


# Runs the real `edgefleet agent run` with one method of the agent's code made to raise: on its
# first call only ("once"), or on every call ("always"); or to hang on its first call ("hang").
# The fault is injected from the test side, so the product carries no hook for it.
_INJECT = """
import importlib, sys, threading
module, cls, method, mode = sys.argv[1:5]
owner = getattr(importlib.import_module(module), cls)
real = getattr(owner, method)
calls = []
def faulty(*args, **kwargs):
    calls.append(1)
    if mode == "hang" and len(calls) == 1:
        threading.Event().wait()
    if mode == "always" or (mode == "once" and len(calls) == 1):
        raise RuntimeError(f"injected fault in {cls}.{method}")
    return real(*args, **kwargs)
setattr(owner, method, faulty)
from edgefleet.cli import main
sys.argv = ["edgefleet", *sys.argv[5:]]
main()
"""


class AgentProcess:
    def __init__(self, config: Path, env: dict[str, str] | None = None,
                 inject: tuple[str, str, str, str] | None = None) -> None:
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = config.with_suffix(f".{uuid.uuid4().hex[:6]}.log")
        self.inject = inject  # (module, class, method, "once" | "always" | "hang")

    def start(self) -> AgentProcess:
        self.log = open(self.log_path, "w")  # noqa: SIM115  # closed in stop()
        run = ["agent", "run", "--config", str(self.config)]
        command = ([sys.executable, "-c", _INJECT, *self.inject, *run] if self.inject
                   else [sys.executable, "-m", "edgefleet.cli", *run])
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, env=self.env)
        return self

    def stop(self, *, kill: bool = False, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


class Peer:
    """A paho client: subscribes to a device's topics and publishes sensor messages."""

    def __init__(self, broker: Mosquitto, device_id: str, subscribe: list[str] | None = None,
                 client_id: str | None = None, clean: bool = True) -> None:
        self.device_id = device_id
        self.messages: queue.Queue[tuple[str, bytes, Any]] = queue.Queue()
        self.connected = threading.Event()
        v5 = getattr(broker, "mqtt5", True)  # the embedded broker speaks 3.1.1 only
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or
                                  f"peer-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                  clean_session=None if v5 else clean)
        topics = subscribe if subscribe is not None else [f"{ROOT}/{device_id}/#"]

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            for topic in topics:
                c.subscribe(topic, qos=1)
            self.connected.set()

        self.client.on_connect = on_connect
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, bytes(m.payload), getattr(m, "properties", None)))
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(1, 2)
        props = None
        if not clean and v5:  # a persistent session: the broker keeps what arrives while away
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
        if v5:
            self.client.connect(broker.host, broker.port, clean_start=clean, properties=props)
        else:
            self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.connected.wait(10)
        time.sleep(0.2)  # SUBACK

    def send(self, stream: str, doc: Any, qos: int = 1) -> None:
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.client.publish(f"{ROOT}/{self.device_id}/in/{stream}", payload, qos=qos)

    def collect(self, suffix: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        """The next `count` messages whose topic ends with suffix (others are kept aside)."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"got {len(out)} of {count} messages on *{suffix}")
            try:
                topic, payload, _ = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if topic.endswith(suffix):
                out.append(json.loads(payload))
        return out

    def drain(self, suffix: str, ids: set[Any], timeout: float) -> dict[Any, list[dict[str, Any]]]:
        """Collect messages on *suffix until every id in `ids` was seen; duplicates are kept."""
        seen: dict[Any, list[dict[str, Any]]] = {}
        deadline = time.monotonic() + timeout
        while not ids <= set(seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(ids - set(seen), key=str)
                raise TimeoutError(f"{len(missing)} of {len(ids)} never answered: {missing[:10]}")
            try:
                topic, payload, _ = self.messages.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if topic.endswith(suffix):
                doc = json.loads(payload)
                seen.setdefault(doc.get("id"), []).append(doc)
        return seen

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_for_status(peer: Peer, state: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for doc in peer.collect("/status", 1, timeout=deadline - time.monotonic()):
            if doc.get("state") == state:
                return doc
    raise TimeoutError(f"no {state} status")
