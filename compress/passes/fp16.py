"""Float16 weights and compute, float32 inputs and outputs (callers keep sending float32)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import QuantizationError


@dataclass(frozen=True)
class Float16:
    name: str = "fp16"

    def run(self, src: Path, dst: Path) -> Path:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        try:
            model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
            onnx.save(model, str(dst))
        except Exception as exc:
            raise QuantizationError(f"fp16 conversion failed: {exc}") from exc
        return dst

    def describe(self) -> dict[str, Any]:
        return {"pass": self.name, "io": "float32"}
