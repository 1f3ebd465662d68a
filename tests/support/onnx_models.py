"""Tiny ONNX models written with onnx.helper: fast, exact, and no training needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear_model(path: Path, in_dim: int = 4, out_dim: int = 3, seed: int = 0,
                 batch: str | int = "N") -> Path:
    """y = x @ W + b, input 'x' float32 [batch, in_dim], output 'y' float32 [batch, out_dim]."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(in_dim, out_dim)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(out_dim,)).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_dim])],
        initializer=[w, b],
    )
    return _save(graph, path)


def two_input_model(path: Path) -> Path:
    """out = a + b (float32 [N, 3]) and count = n * 2 (int64 [N, 1]): two inputs of two dtypes."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["out"]),
         helper.make_node("Add", ["n", "n"], ["count"])],
        "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("n", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("count", TensorProto.INT64, ["N", 1])],
    )
    return _save(graph, path)


def reshape_model(path: Path) -> Path:
    """Reshapes x [N, 6] by a runtime 'shape' input: a request with an impossible shape passes
    the schema checks but fails inside onnxruntime, as a real model error would."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r", "c"])],
    )
    return _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
