"""Tensor specs and the checks that stand between a request and onnxruntime.

A request that reaches `InferenceSession.run` with a wrong dtype or shape gets an opaque C++
error, or worse, a wrong answer; NaNs propagate silently. So every input is checked here first,
and the error names the input, what was expected and what came.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
import numpy as np

from runtime.errors import InputError

Dim = int | str
"""A fixed dimension (int) or a named dynamic one (str), as the manifest writes shapes."""

# onnxruntime's type strings -> numpy dtype names, for the types a CPU model can take.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}
SUPPORTED_DTYPES = frozenset(_ORT_TYPES.values())
# The finite check's dot product may overflow for huge finite inputs; the exact check then
# decides, so numpy's overflow warning from it is noise.
warnings.filterwarnings("ignore", message="overflow encountered in dot", category=RuntimeWarning,
                        module=__name__)
# Integers up to 2**mantissa bits are exact in a float of that width.
_EXACT_INT_LIMIT = {np.dtype("float16"): 2**11, np.dtype("float32"): 2**24, np.dtype("float64"): 2**53}


class TensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Name, dtype and shape of one model input or output."""

    name: str
    dtype: str
    shape: list[Dim]

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; one of {sorted(SUPPORTED_DTYPES)}")

    @classmethod
    def from_ort(cls, name: str, ort_type: str, shape: Sequence[Any]) -> TensorSpec:
        """Build from an onnxruntime NodeArg; unnamed dynamic dims become 'd{i}'."""
        dtype = _ORT_TYPES.get(ort_type)
        if dtype is None:
            raise InputError(f"tensor {name!r} has type {ort_type}, which edgefleet does not serve")
        dims: list[Dim] = [
            d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else f"d{i}")
            for i, d in enumerate(shape)
        ]
        return cls(name=name, dtype=dtype, shape=dims)

    @property
    def batch_dynamic(self) -> bool:
        """True when the first dimension is dynamic, so single samples can be batched."""
        return bool(self.shape) and not isinstance(self.shape[0], int)

    def describe(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"


class CheckedInputs(NamedTuple):
    """Arrays ready for onnxruntime, with the batch size and whether we added the batch axis."""

    arrays: dict[str, np.ndarray]
    batch: int
    added_batch: bool


# Builds a NamedTuple in C on the hottest path (its own __new__ is Python: 0.4 µs a request).
_new_tuple = tuple.__new__


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything `check` needs about one input, precomputed: it runs on every request."""

    spec: TensorSpec
    dtype: np.dtype
    rank: int
    fixed: tuple[tuple[int, int], ...]
    batch_dynamic: bool
    is_float: bool
    #: the whole shape after the batch axis, when every dimension of it is fixed
    sample_shape: tuple[int, ...] | None


class InputChecker:
    """Validates and converts request inputs against a model's input specs.

    Built once per model; `check` runs on every request, so it does the least work that keeps
    its promises (no copies when the array already fits, one reduction for the finite check).
    """

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = list(specs)
        self._plans = {
            s.name: _Plan(s, np.dtype(s.dtype), len(s.shape),
                          tuple((i, d) for i, d in enumerate(s.shape) if isinstance(d, int)),
                          s.batch_dynamic, np.dtype(s.dtype).kind == "f",
                          _sample_shape(s.shape) if s.batch_dynamic else None)
            for s in self.specs
        }
        self._single = self.specs[0].name if len(self.specs) == 1 else None
        self._single_plan = self._plans[self.specs[0].name]
        plan = self._single_plan
        #: (name, dtype, sample shape) of a single-input model whose samples have a fixed shape:
        #: an ndarray of exactly that dtype (the identical object) and shape needs no check but
        #: the NaN/Inf one. The batcher tests this itself before calling `check`, saving ~2 µs a
        #: request, which with 64 threads taking turns at the GIL is ~10% of the throughput.
        self.exact_sample: tuple[str, np.dtype, tuple[int, ...]] | None = (
            (self._single, plan.dtype, plan.sample_shape)
            if self._single is not None and plan.sample_shape is not None else None)

    def check(self, inputs: Mapping[str, Any] | Any, *, finite: bool = True) -> CheckedInputs:
        """Return arrays keyed by input name, or raise InputError naming the first problem.

        A bare array (not a mapping) is accepted for a single-input model. finite=False leaves
        the NaN/Inf check to the caller (the batcher does it once per batch).
        """
        exact = self.exact_sample
        if exact is not None and type(inputs) is np.ndarray and inputs.dtype is exact[1] \
                and inputs.shape == exact[2]:
            # the hottest case of all, the same test as the batcher's: one exact sample
            name = exact[0]
            if finite and self._single_plan.is_float and not _all_finite(inputs):
                raise self._non_finite_error(name, inputs)
            return _new_tuple(CheckedInputs, ({name: inputs[np.newaxis]}, 1, True))
        single = self._single
        if single is not None:  # the common case, without the bookkeeping below
            plan = self._single_plan
            value = inputs if type(inputs) is np.ndarray else self._as_mapping(inputs)[single]
            arr, added = self._check_one(plan, value, finite)
            return CheckedInputs({single: arr}, arr.shape[0] if plan.batch_dynamic else 1, added)
        feeds = self._as_mapping(inputs)
        arrays: dict[str, np.ndarray] = {}
        added_set: set[bool] = set()
        batches: set[int] = set()
        for name, value in feeds.items():
            plan = self._plans[name]
            arr, was_added = self._check_one(plan, value, finite)
            arrays[name] = arr
            added_set.add(was_added)
            if plan.batch_dynamic:
                batches.add(arr.shape[0])
        if len(added_set) > 1:
            raise InputError("inputs mix single samples and batches: send all of them with or "
                             "all without the batch dimension")
        if len(batches) > 1:
            raise InputError(f"inputs disagree on the batch size: {sorted(batches)}")
        batch = batches.pop() if batches else 1
        return CheckedInputs(arrays=arrays, batch=batch, added_batch=added_set.pop())

    def non_finite(self, name: str, arr: np.ndarray) -> InputError | None:
        """The NaN/Inf error for this input's array, or None when every value is finite."""
        plan = self._plans[name]
        if plan.is_float and not _all_finite(arr):
            return self._non_finite_error(name, arr)
        return None

    @staticmethod
    def _non_finite_error(name: str, arr: np.ndarray) -> InputError:
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        return InputError(f"input {name!r}: {bad} value(s) are NaN or infinite", input_name=name)

    def _as_mapping(self, inputs: Mapping[str, Any] | Any) -> Mapping[str, Any]:
        if type(inputs) is not dict and not isinstance(inputs, Mapping):
            if self._single is None:
                raise InputError(f"this model has {len(self.specs)} inputs "
                                 f"({', '.join(self._plans)}): pass them by name")
            return {self._single: inputs}
        if len(inputs) != len(self._plans) or any(k not in self._plans for k in inputs):
            unknown = [k for k in inputs if k not in self._plans]
            if unknown:
                raise InputError(f"unknown input {unknown[0]!r}; the model's inputs are "
                                 f"{', '.join(self._plans)}", input_name=str(unknown[0]))
            missing = [k for k in self._plans if k not in inputs]
            raise InputError(f"missing input {missing[0]!r} "
                             f"(expected {self._plans[missing[0]].spec.describe()})",
                             input_name=missing[0])
        return inputs

    def _check_one(self, plan: _Plan, value: Any, finite: bool) -> tuple[np.ndarray, bool]:
        spec = plan.spec
        arr = value if type(value) is np.ndarray else _to_array(spec, value)
        if arr.dtype != plan.dtype:
            arr = _safe_cast(spec, arr, plan.dtype)
        added = False
        if arr.ndim != plan.rank:
            if arr.ndim == plan.rank - 1 and plan.batch_dynamic:
                arr, added = arr[np.newaxis], True
            else:
                raise InputError(
                    f"input {spec.name!r}: expected rank {plan.rank} {spec.describe()}"
                    f"{' (or one sample without the batch axis)' if plan.batch_dynamic else ''}"
                    f", got shape {list(arr.shape)}", input_name=spec.name)
        shape = arr.shape
        if plan.sample_shape is not None and shape[1:] == plan.sample_shape:
            pass  # one tuple comparison instead of a loop over the dimensions
        else:
            self._check_dims(plan, shape)
        if finite and plan.is_float and not _all_finite(arr):
            raise self._non_finite_error(plan.spec.name, arr)
        return arr, added

    @staticmethod
    def _check_dims(plan: _Plan, shape: tuple[int, ...]) -> None:
        spec = plan.spec
        for axis, dim in plan.fixed:
            if shape[axis] != dim:
                raise InputError(f"input {spec.name!r}: expected shape {spec.describe()}, got "
                                 f"{list(shape)} (axis {axis} must be {dim})",
                                 input_name=spec.name)


def _sample_shape(shape: Sequence[Dim]) -> tuple[int, ...] | None:
    rest = shape[1:]
    return tuple(rest) if all(isinstance(d, int) for d in rest) else None  # type: ignore[arg-type]


def _all_finite(arr: np.ndarray) -> bool:
    """True when no value is NaN or infinite.

    A NaN or Inf makes the dot product of the values with themselves non-finite, and one BLAS
    call costs a fraction of numpy's reductions beside an onnxruntime call (measured: about 6 µs
    against 14 µs for `sum`, 20 µs for `isfinite().all()`; np.errstate alone would cost 3 µs).
    Squares that overflow from finite values (beyond 1.8e19 in float32) are rare; then the
    exact check decides.
    """
    flat = arr.reshape(-1)
    try:
        if math.isfinite(flat.dot(flat)):
            return True
    except (RuntimeWarning, FloatingPointError):  # warnings or errstate set to raise
        pass
    return bool(np.isfinite(arr).all())


def _to_array(spec: TensorSpec, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"input {spec.name!r}: not a rectangular array of numbers ({exc})",
                         input_name=spec.name) from None


def _safe_cast(spec: TensorSpec, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast only when no value changes meaning.

    JSON numbers arrive as int64 or float64, so float64 -> float32 is allowed (precision is
    rounded, as a float32 model would anyway) as long as nothing overflows to infinity; integers
    are allowed into floats only while they stay exact, and into narrower integers only while
    they fit. Floats are never truncated into integers.
    """
    src, name = arr.dtype, spec.name
    if src.kind not in "biuf":
        raise InputError(f"input {name!r}: expected numbers ({spec.dtype}), got "
                         f"{'ragged or mixed values' if src.kind == 'O' else src}",
                         input_name=name)
    problem: str | None = None
    if src.kind == "b":
        pass
    elif dtype.kind == "b":
        problem = "booleans are expected"
    elif src.kind == "f" and dtype.kind in "iu":
        problem = "floats would be truncated to integers"
    elif arr.size and src.kind in "iu" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            problem = f"values outside [{info.min}, {info.max}]"
    elif arr.size and src.kind in "iu" and dtype.kind == "f":
        limit = _EXACT_INT_LIMIT[dtype]
        if np.abs(arr.astype(np.float64)).max() > limit:
            problem = f"integers beyond ±{limit} cannot be held exactly"
    elif arr.size and src.kind == "f" and dtype.kind == "f" and src.itemsize > dtype.itemsize:
        finite = arr[np.isfinite(arr)]
        if finite.size and np.abs(finite).max() > np.finfo(dtype).max:
            problem = f"values overflow {dtype}"
    if problem:
        raise InputError(f"input {name!r}: expected {spec.dtype}, got {src} ({problem})",
                         input_name=name)
    return arr.astype(dtype)
