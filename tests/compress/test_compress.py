"""`edgefleet compress` on real models and real data: every source, mode and report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgefleet.cli import cli
from runtime import Model, load_package
from runtime.signing import load_public_key


def compress(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["compress", *args, "--json"])


def report(result) -> dict:  # type: ignore[no-untyped-def,type-arg]
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ops(pkg: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(pkg / "model.onnx")).graph.node}


def accuracy(pkg: Path, data: Path) -> float:
    npz = np.load(data)
    out = Model(pkg).run(npz["input"])
    return float((next(iter(out.values())).argmax(1) == npz["labels"]).mean())


def test_static_int8_package_with_reports(tmp_path, cdata, keys_dir):
    out = tmp_path / "pkg"
    doc = report(compress(str(cdata["cnn_onnx"]), "--output", str(out), "--quantize", "static",
                          "--calibration", str(cdata["calib"]), "--eval", str(cdata["test"]),
                          "--labels", str(cdata["labels"]), "--sign-key",
                          str(keys_dir / "fleet.key"), "--name", "digits", "--version", "3"))
    names = [c["name"] for c in doc["candidates"]]
    assert names == ["fp32", "static-int8-pc"]
    assert doc["chosen"] == "static-int8-pc"
    assert "QuantizeLinear" in ops(out)
    pkg = load_package(out, trusted_keys=[load_public_key(keys_dir / "fleet.pub")],
                       require_signed=True)
    m = pkg.manifest
    assert (m.name, m.version, m.labels) == ("digits", "3", [str(i) for i in range(10)])
    assert m.compression["steps"][-1]["pass"] == "static-int8-qdq"
    assert m.metrics["package"]["quality"]["metric"] == "accuracy"
    # (a 17 kB model: Q/DQ bookkeeping is a large share; the benchmark measures a real-sized one)
    assert m.metrics["baseline"]["size"] > m.metrics["package"]["size"] * 1.5
    assert (out / "report.md").read_text().startswith("# digits v3")
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_json = json.loads((out / "report.json").read_text())
    assert report_json["chosen"] == "static-int8-pc"
    assert report_json["machine"]["cores"] == os.cpu_count()  # latencies hold for this CPU
    assert report_json["machine"]["cpu"]
    assert "VNNI" in (out / "report.md").read_text()
    # the package's own measurement is true: accuracy within the tolerance of the float model
    assert accuracy(out, cdata["test"]) >= doc["candidates"][0]["quality"]["value"] - 0.01


def test_auto_ships_only_what_is_faster_and_within_tolerance(tmp_path, cdata):
    doc = report(compress(str(cdata["cnn_onnx"]), "--output", str(tmp_path / "p"),
                          "--calibration", str(cdata["calib"]), "--eval", str(cdata["test"])))
    base = doc["candidates"][0]
    chosen = next(c for c in doc["candidates"] if c["chosen"])
    assert {"static-int8-pc", "static-int8-pt"} <= {c["name"] for c in doc["candidates"]}
    assert "weights-int8" in {c["name"] for c in doc["candidates"]}
    assert chosen["within_tolerance"]
    # a float-compute candidate runs the float graph: its speed is the float model's
    assert chosen["latency_ms"] <= base["latency_ms"] or chosen["float_compute"]
    if chosen["name"] == "fp32":
        assert "optimized float model ships" in doc["reason"]


def test_dynamic_quantizes_matmuls_never_convolutions(tmp_path, cdata, factories):
    mlp = report(compress(f"{factories}:mlp", "--weights", str(cdata["mlp_weights"]),
                          "--input-shape", "1x1x8x8", "--output", str(tmp_path / "mlp"),
                          "--quantize", "dynamic", "--eval", str(cdata["test"])))
    assert mlp["export"]["method"] == "dynamo"
    assert mlp["export"]["max_abs_diff"] < 1e-3
    assert ops(tmp_path / "mlp") & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    report(compress(str(cdata["cnn_onnx"]), "--output", str(tmp_path / "cnn"), "--quantize",
                    "dynamic", "--eval", str(cdata["test"])))
    assert "ConvInteger" not in ops(tmp_path / "cnn")


def test_fp16_keeps_float32_inputs_and_outputs(tmp_path, cdata):
    report(compress(str(cdata["cnn_onnx"]), "--output", str(tmp_path / "p"), "--quantize",
                    "fp16", "--eval", str(cdata["test"]), "--tolerance", "0.02"))
    model = Model(tmp_path / "p")
    assert model.inputs[0].dtype == "float32"
    assert model.outputs[0].dtype == "float32"
    graph = onnx.load(str(tmp_path / "p" / "model.onnx")).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)


def test_torchscript_source(tmp_path, cdata):
    doc = report(compress(str(cdata["cnn_ts"]), "--input-shape", "1x1x8x8", "--output",
                          str(tmp_path / "p"), "--quantize", "none", "--eval", str(cdata["test"])))
    assert doc["chosen"] == "fp32"
    assert accuracy(tmp_path / "p", cdata["test"]) > 0.85


def prune_cnn(tmp_path, cdata, factories, method: str, epochs: int) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """The digits CNN from its factory, pruned 50% with `method`, fine-tuned, not quantized."""
    return report(compress(f"{factories}:cnn", "--weights", str(cdata["cnn_weights"]),
                           "--input-shape", "1x1x8x8", "--output", str(tmp_path / "p"),
                           "--prune", "0.5", "--prune-method", method, "--finetune",
                           str(cdata["train"]), "--finetune-epochs", str(epochs), "--quantize",
                           "none", "--eval", str(cdata["test"])))


def test_magnitude_pruning_buys_sparsity_and_transfer_size(tmp_path, cdata, factories):
    doc = prune_cnn(tmp_path, cdata, factories, "magnitude", 2)
    base, pruned = doc["candidates"][0], doc["candidates"][1]
    assert pruned["name"] == "magnitude50-fp32"
    assert pruned["steps"][0]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert pruned["transfer_size"] < 0.8 * base["transfer_size"]
    assert pruned["quality"]["loss"] <= 0.03  # fine-tuned


def test_channel_pruning_makes_the_graph_smaller(tmp_path, cdata, factories):
    doc = prune_cnn(tmp_path, cdata, factories, "channel", 3)
    base, pruned = doc["candidates"][0], doc["candidates"][1]
    assert pruned["name"] == "channel50-fp32"
    assert pruned["size"] < 0.7 * base["size"]
    assert pruned["steps"][0]["parameters"] < 0.6 * base_parameters(cdata)
    assert pruned["quality"]["loss"] <= 0.03
    assert doc["chosen"] == "channel50-fp32"
    assert Model(tmp_path / "p").inputs[0].shape == ["batch", 1, 8, 8]


def base_parameters(cdata) -> int:  # type: ignore[no-untyped-def]
    import torch

    return sum(t.numel() for t in torch.load(str(cdata["cnn_weights"])).values())
