"""INT8 weights, float compute: a quarter of the size at the float model's speed and nearly its accuracy.

Where the CPU has no fast integer path (AVX2 without VNNI), INT8 kernels run a transformer no
faster than float, and quantizing its activations costs accuracy (outlier channels). Storing only
the weights in INT8 still cuts the file, the download and the flash it takes by about 4x.

Each large weight (a MatMul/Gemm matrix, a Conv kernel, an embedding table read by Gather) is
stored as symmetric INT8 with one float scale per output channel (per row for tables) and
restored by `Cast` and `Mul`. onnxruntime folds those two constant nodes when a session loads,
so the model then runs the float graph. onnxruntime's own quantizers write `DequantizeLinear`
instead, which it keeps in the graph for its QDQ kernels: measured 2.2x slower on all-MiniLM-L6-v2
here. Its folding can only be switched on for a whole session ("session.disable_quant_qdq"), and
that would slow every static QDQ package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import QuantizationError

OPS = ("MatMul", "Gemm", "Gather", "Conv")
MIN_ELEMENTS = 1024  # smaller tensors save little and their scales cost a larger share
NAME = "weights-int8"


@dataclass(frozen=True)
class WeightQuantize:
    #: nodes whose weights stay float (the accuracy-aware fallback fills this)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    name: str = NAME

    def run(self, src: Path, dst: Path) -> Path:
        import onnx

        model = onnx.load(str(src))
        quantized = quantize_weights(model.graph, set(self.exclude))
        if not quantized:
            raise QuantizationError(f"{NAME}: no weight of {MIN_ELEMENTS} values or more is read "
                                    f"by {', '.join(OPS)}")
        onnx.save(model, str(dst))
        return dst

    def describe(self) -> dict[str, Any]:
        return {"pass": self.name, "per_channel": True, "ops": list(OPS),
                "compute": "float: onnxruntime folds the dequantization when the model loads",
                "float_nodes": list(self.exclude)}


def channel_axis(node: Any, position: int) -> int | None:
    """The axis that holds output channels of the weight at input `position`, or None when the
    node does not read a weight there."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "MatMul" and position == 1:
        return -1
    if node.op_type == "Gemm" and position == 1:
        return 0 if "transB" in attrs and attrs["transB"].i else 1
    if node.op_type == "Conv" and position == 1:
        return 0
    if node.op_type == "Gather" and position == 0 and ("axis" not in attrs or attrs["axis"].i == 0):
        return 0  # one scale per table row (per token)
    return None


def quantize_weights(graph: Any, exclude: set[str]) -> int:
    """Replace eligible float initializers of `graph` in place; returns how many were replaced."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    uses: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, position))
    graph_inputs = {i.name for i in graph.input}
    restore: list[Any] = []
    count = 0
    for tensor in list(graph.initializer):
        readers = uses.get(tensor.name, [])
        if (tensor.data_type != TensorProto.FLOAT or tensor.name in graph_inputs or not readers
                or any(node.name in exclude for node, _ in readers)):
            continue
        axes = {channel_axis(node, position) for node, position in readers}
        if len(axes) != 1 or None in axes:
            continue  # read as something other than a weight, or along different axes
        weights = nh.to_array(tensor)
        if weights.ndim < 2 or weights.size < MIN_ELEMENTS or not np.isfinite(weights).all():
            continue
        q, scale = per_channel_int8(weights, axes.pop() % weights.ndim)  # type: ignore[operator]
        name = tensor.name
        graph.initializer.remove(tensor)
        graph.initializer.extend([nh.from_array(q, f"{name}__int8"),
                                  nh.from_array(scale, f"{name}__scale")])
        restore += [
            helper.make_node("Cast", [f"{name}__int8"], [f"{name}__float"], to=TensorProto.FLOAT,
                             name=f"{name}__cast"),
            helper.make_node("Mul", [f"{name}__float", f"{name}__scale"], [name],
                             name=f"{name}__dequantize"),
        ]
        count += 1
    for node in reversed(restore):  # before every reader: the graph stays topologically sorted
        graph.node.insert(0, node)
    return count


def per_channel_int8(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 in [-127, 127] with one scale per index of `axis` (kept as a broadcastable
    shape, so `q * scale` restores the weights)."""
    others = tuple(i for i in range(weights.ndim) if i != axis)
    amax = np.abs(weights).max(axis=others, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(weights / scale), -127, 127).astype(np.int8)
    return q, scale


def stored_int8(path: Path) -> int:
    """How many weights of the model at `path` are stored by this pass."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(1 for node in graph.node
               if node.op_type == "Cast" and node.name.endswith("__cast")
               and node.input[0].endswith("__int8"))
