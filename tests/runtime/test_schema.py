"""Input checks: every wrong input is refused with a message naming the input, the expectation
and what came; every right one is converted without surprises."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import InputError
from runtime.schema import InputChecker, TensorSpec

IMAGE = TensorSpec(name="image", dtype="float32", shape=["batch", 1, 8, 8])


def checker(*specs: TensorSpec) -> InputChecker:
    return InputChecker(list(specs) or [IMAGE])


def test_batch_axis_is_added_to_a_single_sample():
    out = checker().check({"image": np.zeros((1, 8, 8), np.float32)})
    assert out.added_batch
    assert out.batch == 1
    assert out.arrays["image"].shape == (1, 1, 8, 8)


def test_batched_input_passes_without_copy():
    x = np.zeros((5, 1, 8, 8), np.float32)
    out = checker().check(x)  # a bare array is fine for a single-input model
    assert out.arrays["image"] is x
    assert out.batch == 5
    assert not out.added_batch


def test_json_lists_become_float32():
    nested = np.arange(64).reshape(1, 8, 8).tolist()  # ints, as JSON decodes them
    out = checker().check({"image": nested})
    assert out.arrays["image"].dtype == np.float32
    np.testing.assert_array_equal(out.arrays["image"][0, 0], np.arange(64).reshape(8, 8))
    floats = (np.arange(64, dtype=np.float64) / 7).reshape(1, 8, 8).tolist()
    assert checker().check({"image": floats}).arrays["image"].dtype == np.float32


@pytest.mark.parametrize(("value", "message"), [
    (np.zeros((1, 8, 9), np.float32), r"input 'image': expected shape .*axis 3 must be 8"),
    (np.zeros((8, 8), np.float32), r"input 'image': expected rank 4"),
    (np.zeros((2, 2, 1, 8, 8), np.float32), r"expected rank 4 .*got shape \[2, 2, 1, 8, 8\]"),
    (np.full((1, 8, 8), np.nan, np.float32), r"input 'image': 64 value\(s\) are NaN or infinite"),
    (np.full((1, 8, 8), np.nan), r"input 'image': 64 value\(s\) are NaN or infinite"),
    (np.array([[[np.inf] * 8] * 8]), r"1?\d* ?value\(s\) are NaN or infinite"),
    ([[1, 2], [3]], r"input 'image': .*(rectangular|ragged)"),
    ([["a"] * 8] * 8, r"input 'image': expected numbers \(float32\)"),
    (np.full((1, 8, 8), 1e300), r"expected float32, got float64 \(values overflow float32\)"),
    (np.full((1, 8, 8), 2**30, np.int64), r"integers beyond ±16777216"),
])
def test_bad_values_are_refused_with_the_reason(value, message: str):
    with pytest.raises(InputError, match=message) as info:
        checker().check({"image": value})
    assert info.value.input_name == "image"


def test_unknown_and_missing_inputs_are_named():
    with pytest.raises(InputError, match=r"unknown input 'img'; the model's inputs are image"):
        checker().check({"img": np.zeros((1, 8, 8))})
    spec_b = TensorSpec(name="b", dtype="int64", shape=["batch", 1])
    with pytest.raises(InputError, match=r"missing input 'b' \(expected int64\[batch,1\]\)"):
        checker(IMAGE, spec_b).check({"image": np.zeros((1, 8, 8))})
    with pytest.raises(InputError, match="this model has 2 inputs"):
        checker(IMAGE, spec_b).check(np.zeros((1, 8, 8)))


def test_integer_inputs_refuse_truncation_and_overflow():
    count = TensorSpec(name="n", dtype="int32", shape=["batch", 1])
    assert checker(count).check({"n": [[3]]}).arrays["n"].dtype == np.int32
    with pytest.raises(InputError, match="floats would be truncated"):
        checker(count).check({"n": [[3.5]]})
    with pytest.raises(InputError, match=r"values outside \[-2147483648, 2147483647\]"):
        checker(count).check({"n": [[2**40]]})
    assert checker(count).check({"n": np.array([[True]])}).arrays["n"].dtype == np.int32


def test_inputs_must_agree_on_batch_and_on_batching():
    a = TensorSpec(name="a", dtype="float32", shape=["N", 3])
    b = TensorSpec(name="b", dtype="float32", shape=["N", 3])
    with pytest.raises(InputError, match="disagree on the batch size"):
        checker(a, b).check({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))})
    with pytest.raises(InputError, match="mix single samples and batches"):
        checker(a, b).check({"a": np.zeros(3), "b": np.zeros((1, 3))})


def test_fixed_batch_models_take_no_extra_axis():
    fixed = TensorSpec(name="x", dtype="float32", shape=[1, 4])
    with pytest.raises(InputError, match="expected rank 2"):
        checker(fixed).check({"x": np.zeros(4)})
    assert checker(fixed).check({"x": np.zeros((1, 4))}).batch == 1


def test_spec_from_onnxruntime_names_anonymous_dims():
    spec = TensorSpec.from_ort("x", "tensor(float)", [None, 3, "h"])
    assert spec.shape == ["d0", 3, "h"]
    with pytest.raises(InputError, match="does not serve"):
        TensorSpec.from_ort("s", "tensor(string)", [1])


@pytest.mark.filterwarnings("ignore:overflow encountered in dot")  # pytest resets our filter
def test_huge_but_finite_values_pass_the_finite_check():
    # squares overflow float32 here: the cheap check is inconclusive and the exact one decides
    out = checker().check({"image": np.full((1, 8, 8), 1e30, np.float32)})
    assert out.arrays["image"].max() == np.float32(1e30)
    x = np.full((1, 8, 8), 1e30, np.float32)
    x[0, 3, 3] = np.inf
    with pytest.raises(InputError, match="1 value"):
        checker().check({"image": x})


def test_huge_values_print_no_warning_in_a_plain_process():
    import subprocess
    import sys

    code = ("import numpy as np\nfrom runtime.schema import InputChecker, TensorSpec\n"
            "c = InputChecker([TensorSpec(name='x', dtype='float32', shape=['N', 4])])\n"
            "c.check({'x': np.full((1, 4), 1e30, np.float32)})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr == ""
