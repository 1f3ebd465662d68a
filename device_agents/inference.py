"""Streams to models: which model answers a stream, and the micro-batcher in front of each.

Each model name has a ModelSlot, so a new version is swapped in atomically while requests in
flight finish on the old one; each slot has one MicroBatcher (runtime.batching).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from device_agents.config import RuntimeConfig
from runtime.batching import MicroBatcher
from runtime.model import Model, SessionConfig
from runtime.package import Package
from runtime.slot import ModelSlot


class InferenceService:
    def __init__(self, runtime: RuntimeConfig, max_queue: int) -> None:
        self.runtime = runtime
        self.max_queue = max_queue
        self.slots: dict[str, ModelSlot] = {}
        self.batchers: dict[str, MicroBatcher] = {}
        self.routes: dict[str, str] = {}  # stream -> model name
        self.default: str | None = None  # answers streams no model lists
        self._lock = threading.Lock()

    def load(self, package: Package) -> Model:
        """Open a package as a Model with the configured session settings (warm-up included)."""
        return Model(package, config=SessionConfig(threads=self.runtime.threads),
                     warmup_batches=(self.runtime.max_batch,))

    def activate(self, model: Model, streams: list[str] | None = None) -> Model | None:
        """Serve `model` under its name (replacing the version in service); returns the old one."""
        with self._lock:
            name = model.name
            for stream in streams or ():
                self.routes[stream] = name
            if streams is None and (self.default is None or self.default == name):
                self.default = name
            if name in self.slots:
                return self.slots[name].swap(model)
            self.slots[name] = ModelSlot(model)
            self.batchers[name] = MicroBatcher(self.slots[name], max_batch=self.runtime.max_batch,
                                               max_delay_ms=self.runtime.max_delay_ms,
                                               max_queue=self.max_queue)
            return None

    def route(self, stream: str) -> MicroBatcher | None:
        name = self.routes.get(stream, self.default)
        return None if name is None else self.batchers.get(name)

    def models(self) -> list[Model]:
        return [slot.current for slot in self.slots.values() if not slot.empty]

    def models_summary(self) -> list[dict[str, str]]:
        return [{"name": m.name, "version": m.version, "sha256": m.sha256} for m in self.models()]

    def metrics(self) -> Mapping[str, float | int | None]:
        """count, errors (the models' failures) and rejected (bad input) over every model;
        p50/p99 of the busiest one."""
        snaps = [m.metrics.snapshot() for m in self.models()]
        if not snaps:
            return {"count": 0, "errors": 0, "rejected": 0, "p50_ms": None, "p99_ms": None}
        busiest = max(snaps, key=lambda s: s.count)
        return {"count": sum(s.count for s in snaps), "errors": sum(s.errors for s in snaps),
                "rejected": sum(s.rejected for s in snaps),
                "p50_ms": busiest.p50_ms, "p99_ms": busiest.p99_ms}

    def close(self) -> None:
        """Finish every queued request, then stop the batchers."""
        for batcher in self.batchers.values():
            batcher.close()
