"""Dynamic INT8: weights quantized ahead of time, activations at run time; MatMul and Gemm only.

Convolutions are never quantized dynamically: ConvInteger is slower than float Conv on CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import QuantizationError
from compress.passes.base import cpu_has_vnni


@dataclass(frozen=True)
class DynamicQuantize:
    per_channel: bool = True
    exclude: tuple[str, ...] = field(default_factory=tuple)
    name: str = "dynamic-int8"

    def run(self, src: Path, dst: Path) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        try:
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                             per_channel=self.per_channel, reduce_range=not cpu_has_vnni(),
                             weight_type=QuantType.QInt8, nodes_to_exclude=list(self.exclude))
        except Exception as exc:
            raise QuantizationError(f"dynamic quantization failed: {exc}") from exc
        return dst

    def describe(self) -> dict[str, Any]:
        return {"pass": self.name, "per_channel": self.per_channel, "ops": ["MatMul", "Gemm"],
                "float_nodes": list(self.exclude)}
