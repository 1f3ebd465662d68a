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


def image_mlp(path: Path, *, seed: int = 0, head_seed: int | None = None, hidden: int = 512,
              nan_on_real_input: bool = False, nan_always: bool = False) -> Path:
    """A digits-shaped MLP (input 'image' float32 [batch, 1, 8, 8], output 'logits' [batch, 10])
    of about 1.2 MB: big enough for chunked delivery. `head_seed` changes only the last layer
    (a head-only retrain); `nan_on_real_input` makes a model that passes a self-test on zeros
    but outputs NaN for real images (sqrt of a negative number); `nan_always` one that outputs NaN
    even on zeros."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(64, hidden)).astype(np.float32) * 0.1
    w2 = rng.normal(size=(hidden, hidden)).astype(np.float32) * 0.05
    head_rng = rng if head_seed is None else np.random.default_rng(head_seed)
    w3 = head_rng.normal(size=(hidden, 10)).astype(np.float32) * 0.05
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(w3, "W3"),
             numpy_helper.from_array(np.array([0, 64], dtype=np.int64), "flat")]
    nodes = [helper.make_node("Reshape", ["image", "flat"], ["x"]),
             helper.make_node("MatMul", ["x", "W1"], ["h1"]), helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "W2"], ["h2"]), helper.make_node("Relu", ["h2"], ["a2"])]
    if nan_on_real_input or nan_always:
        inits.append(numpy_helper.from_array(np.ones((64, 10), dtype=np.float32), "ONES"))
        inits.append(numpy_helper.from_array(np.array(-1.0 if nan_always else 1.0,
                                                      dtype=np.float32), "ONE"))
        nodes += [helper.make_node("MatMul", ["x", "ONES"], ["s"]),
                  helper.make_node("Sub", ["ONE", "s"], ["d"]),
                  helper.make_node("Sqrt", ["d"], ["logits"])]
    else:
        nodes.append(helper.make_node("MatMul", ["a2", "W3"], ["logits"]))
    graph = helper.make_graph(
        nodes, "image_mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits)
    return _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
