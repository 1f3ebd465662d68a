"""Model delivery on the device: fetch a package's missing chunks over MQTT, verify, self-test,
activate atomically, watch its health, and roll back on its own.

The protocol (docs/protocol.md): the fleet sends a `deploy` request holding the signed manifest and
the package's chunk list; the device checks the signature before anything else, answers with the
chunks it lacks, and subscribes to those chunks' retained topics `edgefleet/v1/blobs/{sha256}` a
32 at a time (a window), so the broker fans one published copy out to every device and the bulk
flow never floods the link ahead of sensor traffic. Each chunk is hash-checked and written with
fsync before it is acknowledged; the descriptor is kept in `data_dir/deliveries/`, so after a
dropped link or an agent restart only the chunks still missing are fetched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from device_agents import protocol
from device_agents.chunks import Chunk, ChunkStore
from device_agents.durable import write_atomic
from device_agents.inference import InferenceService
from device_agents.router import RequestError
from device_agents.store import ModelStore, StoreError
from device_agents.transport import Message, Transport
from runtime.errors import EdgefleetError
from runtime.model import Model
from runtime.package import Manifest, verify_manifest

log = logging.getLogger("edgefleet.delivery")

# Chunks subscribed at once (about 1 MiB): enough to fill a 100 Mbit/s link with a 20 ms RTT
# (its bandwidth-delay product is 250 KB) with the per-chunk work in between, small enough to
# bound what the bulk flow queues on the link ahead of other traffic (about 80 ms at that rate;
# sensors on a local broker never wait behind it).
WINDOW = 32
# Subscriptions change in groups of this many chunks (one SUBSCRIBE and one UNSUBSCRIBE packet
# each), not one by one: a 23 MB model is ~700 chunks, and every control packet costs the agent,
# the link and the broker a round of work.
SUBSCRIBE_STEP = 8
FLUSH_BYTES = 1 << 20  # a model file is made durable a MiB at a time (see _assemble)
SPACE_MARGIN = 8 << 20  # free space a delivery leaves to the outbox and the logs


@dataclass
class Deployment:
    """One delivery in progress, as persisted in data_dir/deliveries/{id}.json."""

    id: str
    name: str
    version: str
    manifest_b64: str
    signature_b64: str | None
    chunks: list[tuple[str, int]]
    health_window_s: float = 30.0
    max_error_rate: float = 0.2
    phase: str = "downloading"
    missing: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.chunks)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


class DeliveryManager:
    def __init__(self, data_dir: Path, store: ModelStore, chunks: ChunkStore,
                 inference: InferenceService, transport: Transport, topics: protocol.Topics,
                 publish_state: Callable[[str, dict[str, Any]], None],
                 streams_of: Callable[[str], list[str] | None],
                 on_models_changed: Callable[[], None], handled: Callable[[Message], None]) -> None:
        self.dir = data_dir / "deliveries"
        self.staging = data_dir / "staging"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store, self.chunks, self.inference = store, chunks, inference
        self.transport, self.topics = transport, topics
        self.publish_state = publish_state
        self.streams_of = streams_of
        self.on_models_changed = on_models_changed
        self.handled = handled
        self.active: dict[str, Deployment] = {}
        self._wanted: dict[str, set[str]] = {}  # chunk sha -> deployments waiting for it
        self._subscribed: set[str] = set()
        self._received: list[str] = []  # chunks stored, their subscriptions not yet dropped
        self._lock = threading.RLock()
        self._queue: queue.Queue[Message | None] = queue.Queue(maxsize=4 * WINDOW + 16)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for path in sorted(self.dir.glob("*.json")):  # resume what a restart interrupted
            try:
                dep = Deployment(**json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                log.error("unreadable delivery %s (%s): dropped", path, exc)
                path.unlink()
                continue
            dep.chunks = [tuple(c) for c in dep.chunks]  # type: ignore[misc]
            log.info("resuming delivery %s of %s %s", dep.id, dep.name, dep.version)
            self._begin(dep)

    def stop(self) -> None:
        self._queue.put(None)


    # -- the deploy request (request worker thread) ------------------------------------------

    def deploy(self, args: dict[str, Any]) -> dict[str, Any]:
        dep = _descriptor(args)
        self._index_installed()
        staging = self.staging / dep.id
        try:
            manifest = self._check_manifest(dep, staging)
        except EdgefleetError as exc:
            self._fail(dep, str(exc))
            raise RequestError(str(exc)) from exc
        entry = self.store.entry(dep.name)
        if entry.get("active") == dep.version and (self.store.path(dep.name, dep.version)
                                                   / "manifest.json").exists():
            # nothing to do (even below the floor, after a rollback); it passed its own health
            # window when it was activated
            self._state(dep, "active", 1.0, healthy=True)
            return {"deployment": dep.id, "need": [], "need_bytes": 0, "already_active": True}
        try:
            self.store.check_floor(dep.name, dep.version)  # before a byte is fetched
        except EdgefleetError as exc:
            self._fail(dep, str(exc))
            raise RequestError(str(exc)) from exc
        if manifest.sha256 != args.get("sha256", manifest.sha256):
            raise RequestError("descriptor sha256 does not match the signed manifest")
        self._check_space(dep)
        with self._lock:
            self.active[dep.id] = dep
            dep.missing = sorted({sha for sha, _ in dep.chunks if not self.chunks.has(sha)})
            write_atomic(self.dir / f"{dep.id}.json", dep.to_json().encode())
        missing = set(dep.missing)
        need_bytes = sum(size for sha, size in dict(dep.chunks).items() if sha in missing)
        self._begin(dep)
        return {"deployment": dep.id, "need": dep.missing, "need_bytes": need_bytes,
                "have_bytes": dep.total_bytes - need_bytes}

    def _check_space(self, dep: Deployment) -> None:
        """Refuse a delivery the disk cannot hold before a byte is fetched: the missing chunks,
        the assembled model file beside them, and SPACE_MARGIN for the outbox to go on."""
        need = sum(size for sha, size in dict(dep.chunks).items() if not self.chunks.has(sha))
        want = need + dep.total_bytes + SPACE_MARGIN
        free = shutil.disk_usage(self.dir).free
        if free < want:
            reason = (f"not enough free space for {dep.name} {dep.version}: it needs "
                      f"{want / 1e6:.1f} MB ({need / 1e6:.1f} MB of chunks, the "
                      f"{dep.total_bytes / 1e6:.1f} MB model, {SPACE_MARGIN / 1e6:.0f} MB kept "
                      f"free), {free / 1e6:.1f} MB are free")
            self._fail(dep, reason)
            raise RequestError(reason)

    def _index_installed(self) -> None:
        """Chunk the installed model files not indexed yet (those installed from the config), so
        their chunks count as held. Done at the first delivery, not at start: the chunker is only
        loaded into the agent when an update actually comes."""
        from device_agents.chunks import chunk_file

        for installed in self.store.active():
            for model_file in installed.path.glob("*.onnx"):
                if not self.chunks.indexed(model_file):
                    self.chunks.index_file(model_file, chunk_file(model_file))

    def _check_manifest(self, dep: Deployment, staging: Path) -> Manifest:
        """The signature is checked before a single chunk is fetched."""
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            write_atomic(staging / "manifest.json", base64.b64decode(dep.manifest_b64))
            if dep.signature_b64:
                write_atomic(staging / "manifest.sig", base64.b64decode(dep.signature_b64))
        except (binascii.Error, ValueError) as exc:
            raise RequestError(f"manifest or signature is not valid base64: {exc}") from exc
        manifest, _ = verify_manifest(staging, trusted_keys=self.store.trusted_keys,
                                      require_signed=self.store.require_signed)
        if (manifest.name, manifest.version) != (dep.name, dep.version):
            raise RequestError(f"descriptor says {dep.name} {dep.version}, the signed manifest "
                               f"says {manifest.name} {manifest.version}")
        if sum(size for _, size in dep.chunks) != manifest.size:
            raise RequestError("the chunk list does not add up to the manifest's size")
        return manifest

    def _begin(self, dep: Deployment) -> None:
        with self._lock:
            self.active[dep.id] = dep
            dep.missing = [sha for sha in dep.missing if not self.chunks.has(sha)]
            for sha in dep.missing:
                self._wanted.setdefault(sha, set()).add(dep.id)
        self._state(dep, "downloading", self._progress(dep))
        if not dep.missing:
            self._queue.put(_Complete(dep.id))  # type: ignore[arg-type]
        self._refill()

    def _refill(self) -> None:
        """Keep up to WINDOW chunk subscriptions open, topping up SUBSCRIBE_STEP at a time."""
        with self._lock:
            room = WINDOW - len(self._subscribed)
            if room <= 0:
                return
            # one more than fits tells whether the rest would fit
            todo = list(islice((sha for sha in self._wanted if sha not in self._subscribed),
                               room + 1))
            if room < SUBSCRIBE_STEP and len(todo) > room:
                return  # more room comes with the next chunks; the last few go at once
            todo = todo[:room]
            self._subscribed.update(todo)
        if todo:
            self.transport.subscribe([protocol.blob_topic(sha) for sha in todo])

    def _drop_received(self, at_least: int = 1) -> None:
        """Unsubscribe from stored chunks once `at_least` of them are waiting for it."""
        with self._lock:
            if len(self._received) < at_least:
                return
            done, self._received = self._received, []
        self.transport.unsubscribe([protocol.blob_topic(sha) for sha in done])

    # -- chunks (paho thread hands over; the worker stores) ----------------------------------

    def wants(self, topic: str) -> bool:
        return topic.startswith(protocol.BLOBS_PREFIX)

    def receive(self, msg: Message) -> None:
        if msg.oversize or protocol.blob_of(msg.topic) is None:
            log.warning("not a chunk of ours (%s, %d bytes): dropped", msg.topic[:120],
                        msg.oversize or len(msg.payload))
            self.handled(msg)
            return
        try:
            self._queue.put_nowait(msg)
        except queue.Full:  # past the window: a stranger's flood. Not acknowledged, so the
            # connection goes and the broker redelivers, rather than every later ack waiting
            log.warning("delivery queue full; chunk %s will come again", msg.topic[:120])
            self.transport.drop("the delivery queue is full")

    def loop(self, beat: Callable[[], None] = lambda: None) -> None:
        """The delivery worker (the agent runs it supervised): stores chunks, finishes
        deliveries. Until stop()."""
        while True:
            beat()
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is None:
                return
            try:
                if isinstance(item, _Complete):
                    self._finish(item.deployment)
                else:
                    self._chunk(item)
            except Exception:
                log.exception("delivery step failed")
                if isinstance(item, Message):  # it still ends, or every later ack waits for it
                    self.handled(item)

    def _chunk(self, msg: Message) -> None:
        sha = protocol.blob_of(msg.topic) or ""
        if not msg.payload:  # a cleared retained chunk: nothing to store
            self.handled(msg)
            return
        with self._lock:
            waiting = set(self._wanted.get(sha, ()))
        if not waiting:  # nobody waits for it (any more): drop its subscription if still held
            self.handled(msg)
            self._unsubscribe_unwanted()
            return
        if hashlib.sha256(msg.payload).hexdigest() != sha:  # a bogus copy: fetched again
            log.error("chunk %s does not match its hash; it will be fetched again", sha[:12])
            self.handled(msg)
            self.transport.unsubscribe([protocol.blob_topic(sha)])
            with self._lock:
                self._subscribed.discard(sha)
            self._refill()
            return
        # the right bytes: a delivery that declared another size for them has a lying list
        liars = [dep for dep_id in waiting if (dep := self.active.get(dep_id)) is not None
                 and any(s == sha and size != len(msg.payload) for s, size in dep.chunks)]
        for dep in liars:
            self._fail(dep, f"chunk {sha[:12]} is {len(msg.payload)} bytes, the descriptor "
                       f"says {dict(dep.chunks)[sha]}")
        with self._lock:
            still = bool(self._wanted.get(sha))
        if not still:
            self.handled(msg)
            self._unsubscribe_unwanted()
            return
        try:
            stored = self.chunks.put(sha, msg.payload, hashed=True)  # checked above
        except OSError as exc:  # a full or failing disk: those deliveries fail, clearly
            self.handled(msg)
            with self._lock:
                waiting_now = [self.active[d] for d in self._wanted.get(sha, ()) if d in self.active]
            for dep in waiting_now:
                self._fail(dep, f"cannot store chunk {sha[:12]}: {exc}")
            return
        if not stored:  # (checked above; a race with nothing)
            self.handled(msg)
            return
        self.handled(msg)
        finished = []
        with self._lock:
            self._received.append(sha)
            self._subscribed.discard(sha)
            for dep_id in self._wanted.pop(sha, set()):
                dep = self.active.get(dep_id)
                if dep is None:
                    continue
                dep.missing = [s for s in dep.missing if s != sha]
                if not dep.missing:
                    finished.append(dep_id)
                elif len(dep.missing) % 8 == 0:
                    self._state(dep, "downloading", self._progress(dep))
        self._drop_received(at_least=SUBSCRIBE_STEP if self._wanted else 1)
        self._refill()
        for dep_id in finished:
            self._finish(dep_id)

    def _progress(self, dep: Deployment) -> float:
        missing = set(dep.missing)
        got = sum(size for sha, size in dep.chunks if sha not in missing)
        return round(got / dep.total_bytes, 4) if dep.total_bytes else 1.0

    # -- verify, self-test, activate ---------------------------------------------------------

    def _finish(self, dep_id: str) -> None:
        dep = self.active.get(dep_id)
        if dep is None:
            return
        staging = self.staging / dep.id
        self._state(dep, "verifying", 1.0)
        try:
            manifest = self._check_manifest(dep, staging)
            self.store.check_floor(dep.name, dep.version)  # a newer one may have come meanwhile
            self._assemble(dep, staging / manifest.file)
            package = self.store.verify(staging)  # size, sha256 and signature of the whole
            model = self.inference.load(package)  # its own session: the old one keeps serving
            self._self_test(model)
        except (EdgefleetError, OSError, RequestError) as exc:
            self._fail(dep, str(exc))
            return
        self._state(dep, "staged", 1.0)
        offsets, offset = [], 0
        for sha, size in dep.chunks:
            offsets.append(Chunk(sha, offset, size))
            offset += size
        try:  # a disk that fills now: the old version stays active (state.json is written last)
            installed = self.store.install(staging, move=True, verified=package)
            shutil.rmtree(staging, ignore_errors=True)  # left when that version was there already
            self.chunks.index_file(installed.path / manifest.file, offsets, drop_loose=False)
            self.store.activate(dep.name, dep.version)
        except (EdgefleetError, OSError) as exc:
            del model  # its session goes with it; the old one keeps serving
            self._fail(dep, f"cannot install {dep.name} {dep.version}: {exc}")
            return
        self.inference.activate(model, self.streams_of(dep.name))
        self._forget(dep)
        self._state(dep, "active", 1.0)
        self.on_models_changed()
        self.chunks.drop_loose(offsets)  # after the news: the installed file holds them now
        log.info("activated %s %s", dep.name, dep.version)
        threading.Thread(target=self._guarded_watch, args=(dep, model), daemon=True,
                         name=f"edgefleet-health-{dep.name}").start()

    def _guarded_watch(self, dep: Deployment, model: Model) -> None:
        """One health window on a thread of its own (it sleeps through the window); a failure
        of the watch itself is logged with its traceback and reported in the model's state,
        never a silent end."""
        try:
            self._watch_health(dep, model)
        except Exception as exc:
            log.exception("health watch of %s %s failed", dep.name, dep.version)
            self._state(dep, "active", 1.0, error=f"health watch failed: {exc!r}")

    def _assemble(self, dep: Deployment, path: Path) -> None:
        """Write the model file from its chunks, durably, in steps of FLUSH_BYTES.

        One fsync of a whole large file holds up every other fsync on the file system for as
        long as it takes (measured: 48 ms for 23 MB here), the outbox's commits included, and
        with them every answer to a sensor. Flushed in steps, each stall stays short.
        """
        with open(path, "wb") as fh:
            unflushed = 0
            for sha, _ in dep.chunks:
                data = self.chunks.read(sha)
                fh.write(data)
                unflushed += len(data)
                if unflushed >= FLUSH_BYTES:
                    fh.flush()
                    os.fsync(fh.fileno())
                    unflushed = 0
            fh.flush()
            os.fsync(fh.fileno())

    def _self_test(self, model: Model) -> None:
        """Run the schema's sample input; outputs must be finite and of the declared shape; a
        model replacing another must take the same inputs (the streams routed to it send them)."""
        current = next((m for m in self.inference.models() if m.name == model.name), None)
        if current is not None and current.inputs != model.inputs:
            raise RequestError(f"inputs {[s.describe() for s in model.inputs]} do not fit the "
                               f"streams routed to {model.name}, which send "
                               f"{[s.describe() for s in current.inputs]}")
        outputs = model.run(model.sample_inputs())
        for spec in model.outputs:
            value = np.asarray(outputs[spec.name])
            if not np.isfinite(value).all():
                raise RequestError(f"self-test: output {spec.name} is not finite (NaN or Inf)")
            if len(value.shape) != len(spec.shape) or any(
                    isinstance(d, int) and d != v for d, v in zip(spec.shape, value.shape, strict=True)):
                raise RequestError(f"self-test: output {spec.name} has shape {value.shape}, "
                                   f"declared {spec.describe()}")

    def _watch_health(self, dep: Deployment, model: Model) -> None:
        """Roll back if the new version fails too often within its health window."""
        start = model.metrics.snapshot()
        deadline = time.monotonic() + dep.health_window_s
        while time.monotonic() < deadline:
            time.sleep(min(0.5, dep.health_window_s))
            now = model.metrics.snapshot()
            count, errors = now.count - start.count, now.errors - start.errors
            if errors >= 3 and errors > dep.max_error_rate * max(count, 1):
                reason = (f"health window: {errors} errors in {count} requests "
                          f"(limit {dep.max_error_rate:.0%})")
                self._rollback(dep, reason)
                return
        self._state(dep, "active", 1.0, healthy=True)

    def _rollback(self, dep: Deployment, reason: str) -> None:
        try:  # the previous version is loaded and verified before it is recorded as active
            before = self.store.entry(dep.name).get("previous")
            if not before:
                raise StoreError(f"model {dep.name} has no previous version to roll back to")
            old = self.inference.load(self.store.verify(self.store.path(dep.name, before)))
            previous = self.store.rollback(dep.name, before)
            self.inference.activate(old, self.streams_of(dep.name))
        except EdgefleetError as exc:
            log.error("rollback of %s failed: %s", dep.name, exc)
            self._state(dep, "failed", 1.0, error=f"{reason}; rollback failed: {exc}")
            return
        log.warning("rolled %s back to %s: %s", dep.name, previous, reason)
        self._state(dep, "rolled_back", 1.0, error=reason, active_version=previous)
        self.on_models_changed()

    def _fail(self, dep: Deployment, reason: str) -> None:
        log.warning("delivery of %s %s refused: %s", dep.name, dep.version, reason)
        self._forget(dep)
        shutil.rmtree(self.staging / dep.id, ignore_errors=True)
        with self._lock:  # its chunks no other delivery waits for go too: nothing is left
            kept = {sha for other in self.active.values() for sha, _ in other.chunks}
            self.chunks.drop_loose([Chunk(sha, 0, size) for sha, size in dep.chunks
                                    if sha not in kept])
        self._state(dep, "failed", self._progress(dep) if dep.chunks else 0.0, error=reason)

    def _forget(self, dep: Deployment) -> None:
        with self._lock:
            self.active.pop(dep.id, None)
            for sha in list(self._wanted):
                self._wanted[sha].discard(dep.id)
                if not self._wanted[sha]:
                    del self._wanted[sha]
            (self.dir / f"{dep.id}.json").unlink(missing_ok=True)
            idle = not self._wanted
        if idle:
            self._drop_received()
        self._unsubscribe_unwanted()

    def _unsubscribe_unwanted(self) -> None:
        """Give back the window slots of chunks no delivery waits for any more (a failed one's):
        held, they would keep every later delivery from subscribing at all."""
        with self._lock:
            stale = [sha for sha in self._subscribed if sha not in self._wanted]
            self._subscribed.difference_update(stale)
        if stale:
            self.transport.unsubscribe([protocol.blob_topic(sha) for sha in stale])
        self._refill()

    def _state(self, dep: Deployment, phase: str, progress: float, error: str | None = None,
               **extra: Any) -> None:
        dep.phase = phase
        self.publish_state(dep.name, {"deployment": dep.id, "version": dep.version,
                                      "phase": phase, "progress": progress, "error": error,
                                      "ts": protocol.now(), **extra})


@dataclass
class _Complete:
    deployment: str


def _descriptor(args: dict[str, Any]) -> Deployment:
    """The deployment a deploy request describes; its names are the contract's, so they are
    safe in topics (model/{name}/state) and paths (models/{name}/{version})."""
    try:
        d = protocol.parse_deploy(args)
    except protocol.ProtocolError as exc:
        raise RequestError(f"deploy needs deployment, name, version, manifest and chunks "
                           f"[[sha256, size], ...]: {exc}") from None
    return Deployment(id=d.deployment, name=d.name, version=d.version, manifest_b64=d.manifest,
                      signature_b64=d.signature, chunks=[(sha, size) for sha, size in d.chunks],
                      health_window_s=d.health_window_s, max_error_rate=d.max_error_rate)
