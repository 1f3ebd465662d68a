"""What `edgefleet compress` was asked to do, as one typed, validated object."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from compress.errors import CompressError

QuantizeMode = Literal["auto", "dynamic", "static", "fp16", "none"]
PruneMethod = Literal["magnitude", "channel"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
Metric = Literal["accuracy", "cosine", "mse"]


@dataclass(frozen=True)
class Recipe:
    source: str
    output: Path
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    weights: Path | None = None
    opset: int = 17
    prune: float = 0.0
    prune_method: PruneMethod = "magnitude"
    finetune: Path | None = None
    finetune_epochs: int = 3
    quantize: QuantizeMode = "auto"
    per_channel: bool = True
    calibration: Path | None = None
    calibration_method: CalibrationMethod = "minmax"
    eval: Path | None = None
    metric: Metric | None = None  # None: accuracy when the eval data has labels, else cosine
    tolerance: float = 0.01
    name: str | None = None
    version: str = "1"
    labels: Path | None = None
    sign_key: Path | None = None
    threads: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune <= 0.95:
            raise CompressError(f"--prune must be between 0 and 0.95, got {self.prune}")
        if self.tolerance < 0:
            raise CompressError(f"--tolerance must be >= 0, got {self.tolerance}")
        if self.threads < 1:
            raise CompressError("--threads must be >= 1")
        if self.finetune is not None and self.prune == 0:
            raise CompressError("--finetune recovers accuracy after pruning: give --prune too")

    @property
    def model_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.source.split(":")[-1]).stem if ":" in self.source else Path(self.source).stem
        return re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-.") or "model"


def parse_input_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """`[NAME=]1x3x32x32` -> (NAME or None, (1, 3, 32, 32))."""
    name, _, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise CompressError(f"--input-shape {text!r}: expected [NAME=]1x3x32x32") from None
    if not shape or any(d < 1 for d in shape):
        raise CompressError(f"--input-shape {text!r}: dimensions must be positive integers")
    return (name or None), shape
