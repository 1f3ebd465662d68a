"""Candidates: the float baseline and each compressed variant, with what was measured of them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.evaluate import Quality


@dataclass
class Candidate:
    name: str
    path: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0
    transfer_size: int = 0
    latency_ms: float = math.nan
    quality: Quality | None = None
    note: str = ""
    #: the float model this candidate was quantized from (the pruned one when pruning)
    origin: Path | None = None
    #: stores weights in INT8 but runs the float graph once loaded: the float model's speed
    float_compute: bool = False

    def within(self, tolerance: float) -> bool:
        return self.quality is not None and self.quality.loss <= tolerance + 1e-12

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "steps": self.steps, "size": self.size,
            "transfer_size": self.transfer_size,
            "latency_ms": None if math.isnan(self.latency_ms) else round(self.latency_ms, 4),
            "quality": self.quality.as_dict() if self.quality else None, "note": self.note,
            "float_compute": self.float_compute,
        }
