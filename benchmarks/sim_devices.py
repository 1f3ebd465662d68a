"""Simulated devices for the fleet benchmarks: many per process, each speaking the agent's
delivery protocol (docs/protocol.md) through the agent's own Transport, without its model store,
onnxruntime or disk, so that 50 of them fit beside a broker on a small machine.

Each device has its own MQTT connection and client id, a retained birth with its groups, and
answers `request/deploy` as device_agents/delivery.py does: the signature is checked before the
answer; the answer lists the chunks it lacks; it subscribes to their retained topics a window at
a time; each chunk is hash-checked; the assembled file is checked against the signed manifest's
size and SHA-256; the phases downloading -> verifying -> staged -> active (then active with
"healthy": true) go out retained on `model/{name}/state`. Chunks are kept in memory: what is
measured is the protocol and the broker's fan-out, not a device's disk or model load.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from device_agents import protocol
from device_agents.config import BrokerConfig
from device_agents.transport import Message, Transport
from runtime.signing import PublicKey, load_public_key

AGENT = "edgefleet-agent/sim"


class RefusedError(Exception):
    """A deploy request the device will not honour; the message goes back to the fleet."""


@dataclass
class Stats:
    """What one device saw of one deployment, in wall-clock time (comparable across processes
    on one machine). Deployment "" holds what no deployment was waiting for."""

    device: str
    deployment: str = ""
    requested_at: float = 0.0
    answered_at: float = 0.0
    first_chunk_at: float = 0.0
    complete_at: float = 0.0
    active_at: float = 0.0
    chunks: int = 0
    chunk_bytes: int = 0  # chunk payloads that arrived for it
    unwanted_bytes: int = 0  # arrived but not (or no longer) wanted: a duplicate
    bad_chunks: int = 0
    phase: str = "idle"
    error: str | None = None


@dataclass
class Delivery:
    deployment: str
    name: str
    version: str
    sha256: str
    size: int
    chunks: list[tuple[str, int]]
    health_window_s: float
    missing: set[str] = field(default_factory=set)
    stats: Stats = field(default_factory=lambda: Stats(""))

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.chunks)

    def progress(self) -> float:
        got = sum(size for sha, size in self.chunks if sha not in self.missing)
        return round(got / self.total_bytes, 4) if self.total_bytes else 1.0


class SimDevice:
    """One device: its connection, the chunks it holds, its deliveries in progress. All its
    work runs on the process's worker thread (`handle`); paho's thread only hands over."""

    def __init__(self, name: str, broker: BrokerConfig, groups: list[str],
                 keys: list[PublicKey], window: int, inbox: queue.Queue[tuple[SimDevice, Message]]
                 ) -> None:
        self.name, self.groups, self.keys, self.window = name, groups, keys, window
        self.topics = protocol.Topics(name)
        self.stats: dict[str, Stats] = {"": Stats(name)}  # by deployment
        self.held: dict[str, bytes] = {}
        self.models: dict[str, dict[str, str]] = {}
        self.active: dict[str, Delivery] = {}
        self.wanted: dict[str, set[str]] = {}  # chunk sha -> deployments waiting for it
        self.subscribed: set[str] = set()
        self.births = 0
        self.complete: list[Delivery] = []  # held in full at the request: finished after the answer
        self.transport = Transport(
            broker, name, subscriptions=[self.topics.requests],
            will=(self.topics.status, protocol.offline(1)),
            on_connect=lambda present: self.publish_birth(),
            on_message=lambda msg: inbox.put((self, msg)),
            on_published=self._on_published)
        self._unacked: set[int] = set()
        self._acked = threading.Condition()

    def _on_published(self, mid: int) -> None:
        with self._acked:
            self._unacked.discard(mid)
            self._acked.notify_all()

    def publish(self, topic: str, payload: bytes, retain: bool = False,
                properties: dict[str, Any] | None = None) -> None:
        mid = self.transport.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if mid is not None:
            with self._acked:
                self._unacked.add(mid)

    def flush(self, timeout: float) -> bool:
        with self._acked:
            return self._acked.wait_for(lambda: not self._unacked, timeout)

    def publish_birth(self) -> None:
        self.publish(self.topics.status, protocol.birth(1, AGENT, self.groups,
                                                        list(self.models.values())), retain=True)
        self.births += 1  # after its mid is held: flush() then waits for its PUBACK

    # -- the worker thread -------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        command = self.topics.command_of(msg.topic)
        if command is not None:
            self._request(command, msg)
        elif msg.topic.startswith(protocol.BLOBS_PREFIX):
            self._chunk(msg.topic[len(protocol.BLOBS_PREFIX):], msg.payload)

    def _request(self, command: str, msg: Message) -> None:
        transaction = None
        try:
            args = json.loads(msg.payload)
            transaction = args.get("transaction")
            if command == "ping":
                data: Any = {"pong": True, "epoch": 1, "ts": protocol.now()}
            elif command == "deploy":
                data = self._deploy(args)
            else:
                raise RefusedError(f"unknown command {command!r}; known: deploy, ping")
            reply = protocol.response(transaction, "ok", data)
        except (RefusedError, ValueError, AttributeError) as exc:
            reply = protocol.response(transaction, "error", None, str(exc))
        props = {"CorrelationData": msg.correlation_data} if msg.correlation_data else None
        self.publish(msg.response_topic or self.topics.response(command), reply,
                     properties=props)
        while self.complete:  # the agent verifies on its worker, after answering
            self._finish(self.complete.pop())

    def _deploy(self, args: dict[str, Any]) -> dict[str, Any]:
        requested_at = time.time()
        dep = self._check(args)
        dep.stats = self.stats[dep.deployment] = Stats(self.name, dep.deployment, requested_at)
        if self.models.get(dep.name, {}).get("version") == dep.version:
            self._state(dep, "active", 1.0)
            return {"deployment": dep.deployment, "need": [], "need_bytes": 0,
                    "already_active": True}
        dep.missing = {sha for sha, _ in dep.chunks if sha not in self.held}
        self.active[dep.deployment] = dep
        for sha in dep.missing:
            self.wanted.setdefault(sha, set()).add(dep.deployment)
        need_bytes = sum(size for sha, size in dict(dep.chunks).items() if sha in dep.missing)
        self._state(dep, "downloading", dep.progress())
        if not dep.missing:
            self.complete.append(dep)
        self._refill()
        dep.stats.answered_at = time.time()
        return {"deployment": dep.deployment, "need": sorted(dep.missing),
                "need_bytes": need_bytes, "have_bytes": dep.total_bytes - need_bytes}

    def _check(self, args: dict[str, Any]) -> Delivery:
        """The descriptor and the signed manifest, before a single chunk is fetched."""
        try:
            chunks = [(str(sha), int(size)) for sha, size in args["chunks"]]
            raw = base64.b64decode(args["manifest"], validate=True)
            signature = base64.b64decode(args["signature"]) if args.get("signature") else None
            deployment, name, version = str(args["deployment"]), str(args["name"]), str(args["version"])
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise RefusedError(f"deploy needs deployment, name, version, manifest and chunks "
                          f"[[sha256, size], ...]: {exc!r}") from exc
        if signature is None:
            raise RefusedError("package is not signed and signed packages are required")
        if not any(key.verifies(signature, raw) for key in self.keys):
            raise RefusedError("signature does not match the manifest, or its key is not trusted")
        manifest = json.loads(raw)
        if (manifest.get("name"), manifest.get("version")) != (name, version):
            raise RefusedError(f"descriptor says {name} {version}, the signed manifest says "
                          f"{manifest.get('name')} {manifest.get('version')}")
        if sum(size for _, size in chunks) != manifest.get("size"):
            raise RefusedError("the chunk list does not add up to the manifest's size")
        if args.get("sha256", manifest["sha256"]) != manifest["sha256"]:
            raise RefusedError("descriptor sha256 does not match the signed manifest")
        return Delivery(deployment, name, version, manifest["sha256"], manifest["size"], chunks,
                        float(args.get("health_window_s", 30.0)))

    def _refill(self) -> None:
        """Keep `window` chunk subscriptions open, as the agent does."""
        todo = [sha for sha in self.wanted if sha not in self.subscribed]
        todo = todo[:max(0, self.window - len(self.subscribed))]
        if todo:
            self.subscribed.update(todo)
            self.transport.subscribe([protocol.blob_topic(sha) for sha in todo])

    def _chunk(self, sha: str, payload: bytes) -> None:
        if not payload:  # a cleared retained chunk
            return
        waiting = self.wanted.get(sha)
        if waiting is None:
            self.stats[""].chunks += 1
            self.stats[""].unwanted_bytes += len(payload)
            return
        deps = [dep for dep_id in waiting if (dep := self.active.get(dep_id)) is not None]
        for dep in deps:
            dep.stats.first_chunk_at = dep.stats.first_chunk_at or time.time()
            dep.stats.chunks += 1
            dep.stats.chunk_bytes += len(payload)
        self.transport.unsubscribe([protocol.blob_topic(sha)])
        self.subscribed.discard(sha)
        if hashlib.sha256(payload).hexdigest() != sha:
            for dep in deps:
                dep.stats.bad_chunks += 1  # subscribed again by _refill: fetched again
            self._refill()
            return
        self.held[sha] = payload
        del self.wanted[sha]
        for dep in deps:
            dep.missing.discard(sha)
            if not dep.missing:
                self._finish(dep)
            elif len(dep.missing) % 8 == 0:
                self._state(dep, "downloading", dep.progress())
        self._refill()

    def _finish(self, dep: Delivery) -> None:
        dep.stats.complete_at = time.time()
        self._state(dep, "verifying", 1.0)
        data = b"".join(self.held[sha] for sha, _ in dep.chunks)
        self.active.pop(dep.deployment, None)
        if len(data) != dep.size or hashlib.sha256(data).hexdigest() != dep.sha256:
            self._state(dep, "failed", 1.0, error="assembled file does not match the signed "
                        "manifest's size and sha256")
            return
        self._state(dep, "staged", 1.0)
        self.models[dep.name] = {"name": dep.name, "version": dep.version, "sha256": dep.sha256}
        self._state(dep, "active", 1.0)
        dep.stats.active_at = time.time()
        self.publish_birth()
        if dep.health_window_s > 0:  # nothing is served here: the window passes quietly
            threading.Timer(dep.health_window_s, self._state,
                            args=(dep, "active", 1.0), kwargs={"healthy": True}).start()
        else:
            self._state(dep, "active", 1.0, healthy=True)

    def _state(self, dep: Delivery, phase: str, progress: float, error: str | None = None,
               **extra: Any) -> None:
        dep.stats.phase, dep.stats.error = phase, error
        self.publish(self.topics.model_state(dep.name), protocol.encode({
            "deployment": dep.deployment, "version": dep.version, "phase": phase,
            "progress": progress, "error": error, "ts": protocol.now(), **extra}), retain=True)


def run_devices(url: str, names: list[str], groups: list[list[str]], key_paths: list[str],
                window: int, ready: Any, stop: Any, out: Any) -> None:
    """A process playing `names` devices (groups[i] for names[i]): all online with their births
    acknowledged -> `ready`; on `stop`, each device's Stats go to `out` (one list) and it says
    offline on a clean shutdown, as the agent does."""
    broker = BrokerConfig(url=url, session_expiry_s=0)
    keys = [load_public_key(Path(p)) for p in key_paths]
    inbox: queue.Queue[tuple[SimDevice, Message]] = queue.Queue()
    devices = [SimDevice(n, broker, g, keys, window, inbox) for n, g in zip(names, groups, strict=True)]

    def work() -> None:
        while (item := inbox.get()) is not None:
            device, msg = item
            try:
                device.handle(msg)
            except Exception as exc:  # a broken step is a figure, not a crash
                device.stats[""].error = f"{msg.topic}: {exc!r}"

    worker = threading.Thread(target=work, name="sim-worker", daemon=True)
    worker.start()
    for device in devices:
        device.transport.start()
    # The birth is published from on_connect, after the SUBSCRIBE to request/+ on the same
    # connection: its PUBACK means the broker has the subscription too.
    deadline = time.monotonic() + 60
    for device in devices:
        while not (device.births and device.flush(0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{device.name} did not come online")
            time.sleep(0.01)
    ready.set()
    stop.wait()
    out.put([asdict(st) for d in devices for st in d.stats.values()])
    for device in devices:
        device.publish(device.topics.status, protocol.offline(1), retain=True)
    for device in devices:
        device.flush(5)
        device.transport.stop(2)
    inbox.put(None)  # type: ignore[arg-type]


class SimFleet:
    """Simulated devices spread over a few processes (names dealt out in turn), from the
    benchmark's side: start them, then stop them and collect what each one saw."""

    def __init__(self, url: str, groups: dict[str, list[str]], public_key: Path,
                 processes: int = 2) -> None:
        from device_agents.delivery import WINDOW  # here: the devices' processes stay light

        spawn = mp.get_context("spawn")
        self.stop_event, self.out = spawn.Event(), spawn.Queue()
        names = list(groups)
        self.procs, self.ready = [], []
        for i in range(processes):
            part = names[i::processes]
            ready = spawn.Event()
            self.procs.append(spawn.Process(target=run_devices, args=(
                url, part, [groups[n] for n in part], [str(public_key)], WINDOW, ready,
                self.stop_event, self.out)))
            self.ready.append(ready)

    def start(self, timeout: float = 120) -> None:
        for proc in self.procs:
            proc.start()
        for ready in self.ready:
            if not ready.wait(timeout):
                raise TimeoutError("the simulated devices did not come online")

    @property
    def pids(self) -> dict[str, int]:
        return {f"sims{i}": p.pid or 0 for i, p in enumerate(self.procs)}

    def stop(self) -> list[dict[str, Any]]:
        """What each device saw of each deployment (Stats, as dicts)."""
        self.stop_event.set()
        stats = [s for _ in self.procs for s in self.out.get(timeout=60)]
        for proc in self.procs:
            proc.join(15)
        return stats

    def kill(self) -> None:
        """After a failure: nothing of ours left running."""
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
