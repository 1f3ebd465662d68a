"""INT8 weights with float compute: what is stored, what onnxruntime makes of it at load, and
when `auto` ships it."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from compress.candidates import Candidate
from compress.errors import QuantizationError
from compress.evaluate import Quality
from compress.passes.quantize_weights import WeightQuantize, per_channel_int8, stored_int8
from compress.pipeline import _choose


def small_model(path: Path) -> Path:
    """ids -> embedding table (Gather) -> MatMul -> Gemm(transB) -> output; plus a small bias."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(100, 32)).astype(np.float32)
    w1 = rng.normal(size=(32, 64)).astype(np.float32)
    w2 = rng.normal(size=(16, 64)).astype(np.float32)  # Gemm with transB: [N, K]
    bias = rng.normal(size=(16,)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "w1"], ["h"], name="dense1"),
        helper.make_node("Gemm", ["h", "w2", "bias"], ["y"], transB=1, name="dense2"),
    ]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [nh.from_array(table, "table"), nh.from_array(w1, "w1"), nh.from_array(w2, "w2"),
         nh.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def run(path: Path, ids: np.ndarray, optimized: Path | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": ids})[0]


def test_per_channel_int8_restores_each_channel_within_half_a_step():
    w = np.random.default_rng(1).normal(size=(48, 20)).astype(np.float32)
    w[:, 3] *= 100  # one loud channel must not coarsen the others
    q, scale = per_channel_int8(w, axis=1)
    assert q.dtype == np.int8
    assert scale.shape == (1, 20)
    assert np.all(np.abs(q.astype(np.float32) * scale - w) <= scale / 2 + 1e-6)
    assert scale[0, 0] < scale[0, 3] / 50


def test_weights_are_stored_in_int8_and_folded_back_at_load(tmp_path):
    src = small_model(tmp_path / "f.onnx")
    dst = WeightQuantize().run(src, tmp_path / "q.onnx")
    graph = onnx.load(str(dst)).graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    # the three weights went to int8; the 16-value bias is too small to be worth a scale
    assert stored_int8(dst) == 3
    assert dtypes["table__int8"] == dtypes["w1__int8"] == dtypes["w2__int8"] == TensorProto.INT8
    assert dtypes["bias"] == TensorProto.FLOAT
    scales = {t.name: nh.to_array(t).shape for t in graph.initializer if t.name.endswith("scale")}
    assert scales == {"table__scale": (100, 1), "w1__scale": (1, 64), "w2__scale": (16, 1)}
    assert dst.stat().st_size < src.stat().st_size / 3
    ids = np.array([0, 5, 99, 42], dtype=np.int64)
    ref, got = run(src, ids), run(dst, ids, optimized=tmp_path / "loaded.onnx")
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.02
    # what onnxruntime runs after loading: float weights again, no Cast/Mul left of the restore
    loaded = onnx.load(str(tmp_path / "loaded.onnx")).graph
    assert not [n for n in loaded.node if n.name.endswith(("__cast", "__dequantize"))]
    large = [t for t in loaded.initializer if math.prod(t.dims) >= 1024]
    assert sorted(math.prod(t.dims) for t in large) == [16 * 64, 32 * 64, 100 * 32]
    assert all(t.data_type == TensorProto.FLOAT for t in large)


def test_excluded_nodes_keep_float_weights(tmp_path):
    src = small_model(tmp_path / "f.onnx")
    dst = WeightQuantize(exclude=("dense1",)).run(src, tmp_path / "q.onnx")
    names = {t.name for t in onnx.load(str(dst)).graph.initializer}
    assert "w1" in names
    assert "w1__int8" not in names
    assert stored_int8(dst) == 2
    assert WeightQuantize(exclude=("dense1",)).describe()["float_nodes"] == ["dense1"]


def test_a_model_without_large_weights_is_refused_clearly(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    src = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(src))
    with pytest.raises(QuantizationError, match="no weight of 1024 values or more"):
        WeightQuantize().run(src, tmp_path / "q.onnx")


def candidate(name: str, ms: float, loss: float, size: int, float_compute: bool = False
              ) -> Candidate:
    return Candidate(name, Path(f"{name}.onnx"), size=size, latency_ms=ms,
                     quality=Quality("cosine", 1 - loss, loss), origin=Path("fp32.onnx"),
                     float_compute=float_compute)


def ctx(tolerance: float = 0.01) -> SimpleNamespace:
    return SimpleNamespace(recipe=SimpleNamespace(tolerance=tolerance, quantize="auto"))


def test_auto_ships_float_compute_weights_when_nothing_is_faster():
    base = Candidate("fp32", Path("fp32.onnx"), size=4000, latency_ms=10.0,
                     quality=Quality("cosine", 1.0, 0.0))
    weights = candidate("weights-int8", 10.4, 0.004, 1000, float_compute=True)  # noisy 1.04x
    slower = candidate("dynamic-int8-pc+float24", 10.9, 0.004, 2000)
    chosen, reason = _choose(ctx(), base, [base, weights, slower])  # type: ignore[arg-type]
    assert chosen is weights
    assert "4.0x smaller" in reason
    assert "float model's speed" in reason


def test_auto_prefers_a_faster_candidate_within_tolerance():
    base = Candidate("fp32", Path("fp32.onnx"), size=4000, latency_ms=10.0,
                     quality=Quality("cosine", 1.0, 0.0))
    weights = candidate("weights-int8", 10.0, 0.004, 1000, float_compute=True)
    faster = candidate("static-int8-pc", 6.0, 0.005, 1100)
    off = candidate("dynamic-int8-pc", 5.0, 0.03, 1000)  # fastest, but over tolerance
    chosen, _ = _choose(ctx(), base, [base, weights, faster, off])  # type: ignore[arg-type]
    assert chosen is faster
    # faster only by noise (2%) and twice the size: the smaller float-compute candidate ships
    noise = candidate("dynamic-int8-pc+float24", 9.8, 0.004, 2000)
    chosen, reason = _choose(ctx(), base, [base, noise, weights])  # type: ignore[arg-type]
    assert chosen is weights
    assert "within 5% of the fastest" in reason
    over = candidate("weights-int8", 10.0, 0.02, 1000, float_compute=True)
    chosen, reason = _choose(ctx(), base, [base, over])  # type: ignore[arg-type]
    assert chosen is base
    assert "optimized float model ships" in reason
