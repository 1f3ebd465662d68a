"""`Model` on real models: same answers as bare onnxruntime, manifest processing, clear load errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort
import pytest

from compress.examples.digits import normalize
from runtime.errors import InferenceError, ModelLoadError, SignatureError
from runtime.model import Model, SessionConfig
from runtime.package import write_package
from runtime.signing import load_public_key
from tests.support.onnx_models import reshape_model, two_input_model


def test_package_model_matches_bare_onnxruntime(digits_package: Path, digits_split):
    model = Model(digits_package)
    x = digits_split.x_test[:16]
    bare = ort.InferenceSession(str(digits_package / "model.onnx"))
    logits = bare.run(None, {"image": normalize(x)})[0]  # our preprocessing, done by hand
    probs = model.run({"image": x})["logits"]  # raw pixels in, softmax out
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_digits_accuracy_and_labels(digits_package: Path, digits_split):
    model = Model(digits_package)
    probs = model.run(digits_split.x_test)["logits"]
    accuracy = float((probs.argmax(1) == digits_split.y_test).mean())
    assert accuracy > 0.9
    scored = model.classify(model.run(digits_split.x_test[0]))  # one sample, no batch axis
    assert scored is not None
    assert len(scored) == 1
    assert scored[0].label == str(probs[0].argmax())
    assert scored[0].score == pytest.approx(float(probs[0].max()), rel=1e-6)
    assert len(scored[0].top) == 3
    assert scored[0].top[0][1] >= scored[0].top[1][1] >= scored[0].top[2][1]


def test_schema_is_exposed(digits_package: Path):
    model = Model(digits_package)
    assert (model.name, model.version) == ("digits", "1")
    assert msgspec.to_builtins(model.inputs) == [
        {"name": "image", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert model.outputs[0].name == "logits"
    assert model.labels == [str(i) for i in range(10)]


def test_bare_onnx_file_loads(tmp_path: Path):
    model = Model(two_input_model(tmp_path / "two.onnx"))
    out = model.run({"a": [1.0, 2.0, 3.0], "b": [1, 1, 1], "n": [5]})
    np.testing.assert_array_equal(out["out"], [2.0, 3.0, 4.0])
    assert out["count"].tolist() == [10]
    assert model.name == "two"
    assert model.classify(out) is None


def test_session_options_follow_config(digits_package: Path):
    config = SessionConfig(threads=1, spinning=False, memory_arena=False, optimization="basic")
    options = config.session_options()
    assert options.intra_op_num_threads == 1
    assert not options.enable_cpu_mem_arena
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert Model(digits_package, config=config).run(np.zeros((1, 8, 8)))["logits"].shape == (10,)


def test_signature_checked_when_loading(digits_package: Path, other_keys_dir: Path):
    wrong = [load_public_key(other_keys_dir / "fleet.pub")]
    with pytest.raises(SignatureError):
        Model(digits_package, trusted_keys=wrong, require_signed=True)


def test_file_that_is_not_onnx(tmp_path: Path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model at all" * 10)
    with pytest.raises(ModelLoadError, match=r"onnxruntime cannot load .*bad\.onnx"):
        Model(bad)


def test_manifest_that_lies_about_the_model(tmp_path: Path, digits_onnx: Path):
    pkg = write_package(tmp_path / "p", digits_onnx, name="digits")
    path = pkg.path / "manifest.json"
    doc = json.loads(path.read_text())
    doc["inputs"][0]["shape"] = ["batch", 1, 28, 28]
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match=r"declares input 'image' as float32\[batch,1,28,28\]"):
        Model(pkg.path)


def test_failure_inside_onnxruntime_becomes_inference_error(tmp_path: Path):
    model = Model(reshape_model(tmp_path / "reshape.onnx"), warmup_batches=())
    ok = model.run({"x": np.ones((2, 6)), "shape": [3, 4]})
    assert ok["y"].shape == (3, 4)
    with pytest.raises(InferenceError, match="model reshape v0 failed"):
        model.run({"x": np.ones((2, 6)), "shape": [5, 5]})
    assert model.metrics.snapshot().errors == 1


def test_metrics_count_requests(digits_package: Path):
    model = Model(digits_package)
    for _ in range(20):
        model.run(np.zeros((1, 8, 8)))
    snap = model.metrics.snapshot()
    assert snap.count == 20
    assert snap.p50_ms is not None
    assert snap.p99_ms is not None
    assert 0 < snap.p50_ms <= snap.p99_ms


def test_manifest_processing_equals_processing_inside_the_graph(tmp_path: Path, digits_split):
    """The runtime's numpy normalization + softmax must give what the same ops give in onnxruntime."""
    from compress.examples import digits

    net = digits.build_cnn(width=4)
    digits.train(net, digits_split, epochs=1)
    plain = digits.export_onnx(net, tmp_path / "plain.onnx")
    embedded = digits.export_onnx(net, tmp_path / "embedded.onnx", embed_processing=True)
    declared = write_package(tmp_path / "declared", plain, name="d", preprocess=digits.preprocess(),
                             postprocess="softmax")
    inside = write_package(tmp_path / "inside", embedded, name="d")
    x = digits_split.x_test[:32]
    np.testing.assert_allclose(Model(declared.path).run(x)["logits"],
                               Model(inside.path).run(x)["logits"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spinning", [False, True])
def test_idle_model_burns_no_cpu(tmp_path: Path, spinning: bool):
    """On a small box, threads must not spin between requests (measured as process CPU time)."""
    import torch

    from compress.examples import digits

    torch.manual_seed(0)
    wide = digits.export_onnx(digits.build_cnn(width=32, size=16), tmp_path / "w.onnx", size=16)
    model = Model(wide, config=SessionConfig(threads=2, spinning=spinning, auto_threads=False))
    for _ in range(20):
        model.run(np.zeros((1, 16, 16), np.float32))
    before = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - before < 0.02
