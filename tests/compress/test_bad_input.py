"""Every bad input to `edgefleet compress` ends with exit code 2 and one clear line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgefleet.cli import cli


def fails(*args: str, match: str) -> None:
    result = CliRunner().invoke(cli, ["compress", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    assert match in lines[0], lines[0]


@pytest.fixture
def onnx_args(cdata, tmp_path):  # type: ignore[no-untyped-def]
    return [str(cdata["cnn_onnx"]), "--output", str(tmp_path / "out")]


def test_missing_data_file(onnx_args, tmp_path):
    fails(*onnx_args, "--eval", str(tmp_path / "nope.npz"), match="does not exist")


def test_data_with_wrong_input_names(onnx_args, tmp_path):
    np.savez(tmp_path / "d.npz", a=np.zeros((4, 1, 8, 8), np.float32), b=np.zeros((4, 3)))
    fails(*onnx_args, "--eval", str(tmp_path / "d.npz"), match="missing 'image'")


def test_data_with_wrong_shape(onnx_args, tmp_path):
    np.savez(tmp_path / "d.npz", image=np.zeros((4, 1, 7, 7), np.float32))
    fails(*onnx_args, "--calibration", str(tmp_path / "d.npz"),
          match="expected shape float32[batch,1,8,8]")


def test_data_with_wrong_dtype(onnx_args, tmp_path):
    np.savez(tmp_path / "d.npz", image=np.full((4, 1, 8, 8), "x"))
    fails(*onnx_args, "--eval", str(tmp_path / "d.npz"), match="expected numbers")


def test_data_that_is_not_npz(onnx_args, tmp_path):
    (tmp_path / "d.npz").write_text("not numpy")
    fails(*onnx_args, "--eval", str(tmp_path / "d.npz"), match="not a readable .npz")


def test_labels_that_do_not_fit(onnx_args, tmp_path):
    np.savez(tmp_path / "d.npz", image=np.zeros((4, 1, 8, 8), np.float32), labels=np.zeros(3))
    fails(*onnx_args, "--eval", str(tmp_path / "d.npz"), match="labels must be 4 integer")


@pytest.mark.parametrize(("source", "match"), [
    ("no_such_module:make", "cannot import no_such_module:make"),
    ("factories:nothing_here", "cannot import factories:nothing_here"),
    ("factories:broken", "factories:broken() failed: ValueError: no such checkpoint"),
    ("factories:not_a_module", "returned int, not a torch.nn.Module"),
])
def test_factories_that_do_not_work(tmp_path, factories, source, match):
    fails(source, "--input-shape", "1x1x8x8", "--output", str(tmp_path / "o"), match=match)


def test_weights_that_do_not_fit(tmp_path, cdata, factories):
    fails("factories:mlp", "--weights", str(cdata["cnn_weights"]), "--input-shape", "1x1x8x8",
          "--output", str(tmp_path / "o"), match="do not fit the model")


def test_torch_source_without_input_shape(tmp_path, cdata):
    fails(str(cdata["cnn_ts"]), "--output", str(tmp_path / "o"), match="needs --input-shape")


def test_bad_input_shape_text(tmp_path, cdata):
    fails(str(cdata["cnn_ts"]), "--input-shape", "1x1xeight", "--output", str(tmp_path / "o"),
          match="expected [NAME=]1x3x32x32")


def test_unsupported_operator(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("NoSuchOperator", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    fails(str(tmp_path / "bad.onnx"), "--output", str(tmp_path / "o"),
          match="not a valid ONNX model")


def test_pruning_an_onnx_source(onnx_args):
    fails(*onnx_args, "--prune", "0.5", match="pruning works on PyTorch sources")


def test_static_without_calibration_data(onnx_args):
    fails(*onnx_args, "--quantize", "static", match="needs calibration data")


def test_tolerance_that_cannot_be_met(onnx_args, cdata):
    fails(*onnx_args, "--quantize", "static", "--calibration", str(cdata["calib"]),
          "--metric", "cosine", "--tolerance", "0", match="over the tolerance 0.0")


def test_auto_with_an_impossible_tolerance_ships_float_and_says_so(tmp_path, cdata):
    result = CliRunner().invoke(cli, [
        "compress", str(cdata["cnn_onnx"]), "--output", str(tmp_path / "o"), "--calibration",
        str(cdata["calib"]), "--metric", "cosine", "--tolerance", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert '"chosen": "fp32"' in result.stdout
    assert "optimized float model" in result.stdout


def test_control_flow_model_that_cannot_be_quantized(tmp_path):
    """An If whose branch holds the MatMul: onnxruntime does not quantize inside control flow.
    Asked for explicitly, that is an error; under auto, a reported fallback to float."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4])])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        "flow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[w, helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "flow.onnx"))
    fails(str(tmp_path / "flow.onnx"), "--output", str(tmp_path / "o"), "--quantize", "dynamic",
          match="quantized nothing")
    result = CliRunner().invoke(cli, ["compress", str(tmp_path / "flow.onnx"), "--output",
                                      str(tmp_path / "auto"), "--json"])
    assert result.exit_code == 0, result.output
    assert '"chosen": "fp32"' in result.stdout
    assert "quantized nothing" in result.stdout


def test_onnx_newer_than_onnxruntime_reads(tmp_path, cdata):
    model = onnx.load(str(cdata["cnn_onnx"]))
    model.ir_version = 99
    onnx.save(model, str(tmp_path / "new.onnx"))
    fails(str(tmp_path / "new.onnx"), "--output", str(tmp_path / "o"), match="ir_version 99 is higher")
