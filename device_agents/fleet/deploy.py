"""`edgefleet fleet deploy`: deliver a package to devices over MQTT and wait for the outcome.

Each device gets the signed manifest and the chunk list; it answers with the chunks it lacks; the
union of those is published once, retained, on `edgefleet/v1/blobs/{sha256}`, so the broker fans
it out and a device that drops off resumes from what it holds. Canary devices go first; the rest
follow only when every canary is active and healthy. Retained chunks are cleared at the end.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agents import protocol
from device_agents.chunks import Chunk, chunk_bytes
from device_agents.fleet.client import FleetClient, FleetError
from runtime.package import load_package

log = logging.getLogger("edgefleet.deploy")

TERMINAL = {"failed", "rolled_back"}


@dataclass
class Outcome:
    device: str
    phase: str = "pending"
    progress: float = 0.0
    error: str | None = None
    healthy: bool = False
    need_bytes: int = 0
    seconds: float = 0.0
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def ok(self) -> bool:
        return self.phase == "active"

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "phase": self.phase, "ok": self.ok, "healthy": self.healthy,
                "progress": self.progress, "need_bytes": self.need_bytes,
                "seconds": round(self.seconds, 2), "error": self.error}


@dataclass
class Plan:
    package: Path
    name: str
    version: str
    descriptor: dict[str, Any]
    chunks: list[Chunk]
    data: bytes

    @property
    def total_bytes(self) -> int:
        return len(self.data)


def plan(package_dir: Path, health_window_s: float, max_error_rate: float) -> Plan:
    """Read and check the package, chunk its model file, build the deploy request."""
    pkg = load_package(package_dir)  # hash checked here; the device checks the signature
    data = pkg.model_path.read_bytes()
    chunks = chunk_bytes(data)
    sig = package_dir / "manifest.sig"
    # a name of the contract (at most 64 characters) whatever the lengths of name and version
    deployment = f"{pkg.manifest.name}-{pkg.manifest.version}"[:55] + f"-{uuid.uuid4().hex[:8]}"
    descriptor = {
        "deployment": deployment, "name": pkg.manifest.name, "version": pkg.manifest.version,
        "manifest": base64.b64encode(pkg.manifest_bytes).decode(),
        "signature": base64.b64encode(sig.read_bytes()).decode() if sig.exists() else None,
        "sha256": pkg.manifest.sha256, "size": pkg.manifest.size,
        "chunks": [[c.sha256, c.size] for c in chunks],
        "health_window_s": health_window_s, "max_error_rate": max_error_rate,
    }
    return Plan(package_dir, pkg.manifest.name, pkg.manifest.version, descriptor, chunks, data)


def deploy(client: FleetClient, the_plan: Plan, devices: list[str], *, canary: int = 0,
           timeout: float = 600.0, wait_healthy: bool = True,
           on_update: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Deliver to canaries first, then to the rest; returns one Outcome per device."""
    outcomes = {d: Outcome(d) for d in devices}
    waves = [devices[:canary], devices[canary:]] if 0 < canary < len(devices) else [devices]
    by_sha = {c.sha256: c for c in the_plan.chunks}
    published: set[str] = set()
    deployment = the_plan.descriptor["deployment"]

    def on_state(where: protocol.DeviceTopic, payload: bytes) -> None:
        out = outcomes.get(where.device)
        if out is not None and apply_state(out, payload, deployment, wait_healthy) \
                and on_update is not None:
            on_update(out)

    for device in devices:
        client.listen(protocol.Topics(device).model_state(the_plan.name), "model", on_state,
                      device=device, name=the_plan.name)
    try:
        for i, wave in enumerate(waves):
            started = time.monotonic()
            answers = client.request_many(wave, "deploy", the_plan.descriptor, timeout=30)
            for device in wave:
                _start(client, the_plan, outcomes[device], answers[device], by_sha, published,
                       on_update)
            if not client.flush(120):
                raise FleetError("the broker did not acknowledge the chunks within 120 s")
            deadline = started + timeout
            for device in wave:
                out = outcomes[device]
                if not out.done.wait(max(0.0, deadline - time.monotonic())):
                    out.error = out.error or f"no outcome within {timeout:g} s (last phase {out.phase})"
                    if out.phase == "active":
                        out.error = "active, but its health window did not end in time"
                out.seconds = time.monotonic() - started
            if i == 0 and len(waves) > 1 and not all(outcomes[d].ok for d in wave):
                for device in waves[1]:
                    outcomes[device].phase = "skipped"
                    outcomes[device].error = "not attempted: a canary device failed"
                break
    finally:
        for sha in published:  # clear the retained chunks: the broker need not keep them
            client.publish(protocol.blob_topic(sha), b"", retain=True)
        client.flush(30)
    return [outcomes[d] for d in devices]


def apply_state(out: Outcome, payload: bytes, deployment: str, wait_healthy: bool) -> bool:
    """Update `out` from one `model/{name}/state` message; True when it was about `deployment`.
    A state that breaks the contract is logged and ignored (a stale retained one may linger
    from anyone); never raises."""
    try:
        state = protocol.parse_model_state(payload)
    except protocol.ProtocolError as exc:
        log.warning("ignoring a model state of %s: %s", out.device, exc)
        return False
    if state.deployment != deployment:
        return False
    out.phase, out.progress, out.error, out.healthy = (state.phase, state.progress or 0.0,
                                                       state.error, state.healthy)
    if out.phase in TERMINAL or (out.phase == "active" and (out.healthy or not wait_healthy)):
        out.done.set()
    return True


def needs(data: Any, by_sha: dict[str, Chunk]) -> tuple[list[Chunk], int]:
    """The chunks of ours a device asks for in its deploy response (`{"need": [sha256, ...],
    "need_bytes": N}`), and N; what is not one of our chunks is no request."""
    if not isinstance(data, dict):
        return [], 0
    need, need_bytes = data.get("need"), data.get("need_bytes")
    shas = [sha for sha in need if isinstance(sha, str)] if isinstance(need, list) else []
    chunks = [by_sha[sha] for sha in dict.fromkeys(shas) if sha in by_sha]
    if isinstance(need_bytes, int) and not isinstance(need_bytes, bool) and need_bytes >= 0:
        return chunks, need_bytes
    return chunks, sum(c.size for c in chunks)


def _start(client: FleetClient, the_plan: Plan, out: Outcome,
           response: protocol.Response | FleetError, by_sha: dict[str, Chunk],
           published: set[str], on_update: Callable[[Outcome], None] | None) -> None:
    """Act on one device's answer to the deploy request: publish the chunks it lacks that no
    other device asked for first (one retained copy serves them all)."""
    if isinstance(response, FleetError):
        out.phase, out.error = "failed", str(response)
        out.done.set()
        return
    if response.status != "ok":
        out.phase, out.error = "failed", str(response.error)
        out.done.set()
        if on_update is not None:
            on_update(out)
        return
    chunks, out.need_bytes = needs(response.data, by_sha)
    for chunk in chunks:
        sha = chunk.sha256
        if sha in published:
            continue
        client.publish(protocol.blob_topic(sha),
                       the_plan.data[chunk.offset:chunk.offset + chunk.size], retain=True)
        published.add(sha)


def resolve_targets(client: FleetClient, devices: tuple[str, ...], group: str | None, *,
                    on_skip: Callable[[str, str], None] | None = None) -> list[str]:
    """The devices given, or every device whose retained status announces `group`. A status
    that cannot be read is skipped: `on_skip(device or topic, reason)`, by default a warning in
    the log; every other device is a target as usual."""
    if devices:
        for device in devices:
            try:
                protocol.check_name(device, "--device")
            except protocol.ProtocolError as exc:
                raise FleetError(str(exc)) from None
        return list(dict.fromkeys(devices))
    scan = client.statuses()
    for who, reason in sorted(scan.problems.items()):
        if on_skip is not None:
            on_skip(who, reason)
        else:
            log.warning("skipping %s: its status breaks the contract: %s", who, reason)
    found = sorted(d for d, s in scan.statuses.items() if group in s.groups)
    if not found:
        raise FleetError(f"no device has announced group {group!r} (seen: "
                         f"{', '.join(sorted(scan.statuses)) or 'none'})")
    return found
