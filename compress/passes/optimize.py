"""Shape inference and graph optimization before quantization (onnxruntime's quant_pre_process).

The result is also the float baseline every candidate is compared with: a fair baseline is the
best float model, not the raw export.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import QuantizationError


@dataclass(frozen=True)
class PreProcess:
    name: str = "preprocess"

    def run(self, src: Path, dst: Path) -> Path:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        attempts: list[dict[str, Any]] = [{}, {"skip_symbolic_shape": True}]
        last: Exception | None = None
        for extra in attempts:  # symbolic shape inference fails on some graphs; ONNX's suffices
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    quant_pre_process(str(src), str(dst), skip_optimization=False, **extra)
                return dst
            except Exception as exc:
                last = exc
        raise QuantizationError(f"shape inference / graph optimization failed: {last}")

    def describe(self) -> dict[str, Any]:
        return {"pass": self.name}
