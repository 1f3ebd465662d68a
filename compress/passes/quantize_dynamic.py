"""Dynamic INT8: weights quantized ahead of time, activations at run time.

Only MatMul/Gemm with a constant weight are quantized (two run-time quantizations of activation
x activation products, as in attention, cost more than they save), plus Gather (embedding
tables, often the largest tensor of a language model). Convolutions never: ConvInteger is slower
than float Conv on CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import QuantizationError
from compress.passes.base import cpu_has_vnni

OPS = ("MatMul", "Gemm", "Gather")


def activation_products(path: Path) -> list[str]:
    """MatMul nodes whose inputs are both computed at run time (no initializer)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and n.name and not any(i in weights for i in n.input)]


@dataclass(frozen=True)
class DynamicQuantize:
    per_channel: bool = True
    exclude: tuple[str, ...] = field(default_factory=tuple)
    name: str = "dynamic-int8"

    def run(self, src: Path, dst: Path) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        exclude = [*self.exclude, *activation_products(src)]
        try:
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(OPS),
                             per_channel=self.per_channel, reduce_range=not cpu_has_vnni(),
                             weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
        except Exception as exc:
            raise QuantizationError(f"dynamic quantization failed: {exc}") from exc
        return dst

    def describe(self) -> dict[str, Any]:
        return {"pass": self.name, "per_channel": self.per_channel, "ops": list(OPS),
                "float_nodes": list(self.exclude)}
