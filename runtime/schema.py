"""Tensor specs and the checks that stand between a request and onnxruntime.

A request that reaches `InferenceSession.run` with a wrong dtype or shape gets an opaque C++
error, or worse, a wrong answer; NaNs propagate silently. So every input is checked here first,
and the error names the input, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

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
# Integers up to 2**mantissa bits are exact in a float of that width.
_EXACT_INT_LIMIT = {np.dtype("float16"): 2**11, np.dtype("float32"): 2**24, np.dtype("float64"): 2**53}


class TensorSpec(BaseModel):
    """Name, dtype and shape of one model input or output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: str
    shape: list[Dim]

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {value!r}; one of {sorted(SUPPORTED_DTYPES)}")
        return value

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


@dataclass(frozen=True)
class CheckedInputs:
    """Arrays ready for onnxruntime, with the batch size and whether we added the batch axis."""

    arrays: dict[str, np.ndarray]
    batch: int
    added_batch: bool


class InputChecker:
    """Validates and converts request inputs against a model's input specs.

    Built once per model; `check` runs on every request, so it does the least work that keeps
    its promises (no copies when the array already fits).
    """

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = list(specs)
        self._by_name = {s.name: s for s in self.specs}
        self._dtypes = {s.name: np.dtype(s.dtype) for s in self.specs}

    def check(self, inputs: Mapping[str, Any] | Any) -> CheckedInputs:
        """Return arrays keyed by input name, or raise InputError naming the first problem.

        A bare array (not a mapping) is accepted for a single-input model.
        """
        feeds = self._as_mapping(inputs)
        arrays: dict[str, np.ndarray] = {}
        added: set[bool] = set()
        batches: set[int] = set()
        for name, value in feeds.items():
            spec = self._by_name[name]
            arr, was_added = self._check_one(spec, self._dtypes[name], value)
            arrays[name] = arr
            added.add(was_added)
            if spec.batch_dynamic:
                batches.add(arr.shape[0])
        if len(added) > 1:
            raise InputError("inputs mix single samples and batches: send all of them with or "
                             "all without the batch dimension")
        if len(batches) > 1:
            raise InputError(f"inputs disagree on the batch size: {sorted(batches)}")
        batch = batches.pop() if batches else 1
        return CheckedInputs(arrays=arrays, batch=batch, added_batch=added.pop())

    def _as_mapping(self, inputs: Mapping[str, Any] | Any) -> Mapping[str, Any]:
        if not isinstance(inputs, Mapping):
            if len(self.specs) != 1:
                raise InputError(f"this model has {len(self.specs)} inputs "
                                 f"({', '.join(self._by_name)}): pass them by name")
            return {self.specs[0].name: inputs}
        unknown = [k for k in inputs if k not in self._by_name]
        if unknown:
            raise InputError(f"unknown input {unknown[0]!r}; the model's inputs are "
                             f"{', '.join(self._by_name)}", input_name=str(unknown[0]))
        missing = [k for k in self._by_name if k not in inputs]
        if missing:
            raise InputError(f"missing input {missing[0]!r} "
                             f"(expected {self._by_name[missing[0]].describe()})",
                             input_name=missing[0])
        return inputs

    def _check_one(self, spec: TensorSpec, dtype: np.dtype, value: Any) -> tuple[np.ndarray, bool]:
        arr = _to_array(spec, value)
        if arr.dtype != dtype:
            arr = _safe_cast(spec, arr, dtype)
        added = False
        rank = len(spec.shape)
        if arr.ndim == rank - 1 and spec.batch_dynamic:
            arr, added = arr[np.newaxis], True
        elif arr.ndim != rank:
            raise InputError(f"input {spec.name!r}: expected rank {rank} {spec.describe()}"
                             f"{' (or one sample without the batch axis)' if spec.batch_dynamic else ''}"
                             f", got shape {list(arr.shape)}", input_name=spec.name)
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and arr.shape[axis] != dim:
                raise InputError(f"input {spec.name!r}: expected shape {spec.describe()}, got "
                                 f"{list(arr.shape)} (axis {axis} must be {dim})",
                                 input_name=spec.name)
        if dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise InputError(f"input {spec.name!r}: {bad} value(s) are NaN or infinite",
                             input_name=spec.name)
        return arr, added


def _to_array(spec: TensorSpec, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputError(f"input {spec.name!r}: not a rectangular array of numbers ({exc})",
                             input_name=spec.name) from None
    if arr.dtype.kind not in "biuf":
        raise InputError(f"input {spec.name!r}: expected numbers ({spec.dtype}), got "
                         f"{'ragged or mixed values' if arr.dtype.kind == 'O' else arr.dtype}",
                         input_name=spec.name)
    return arr


def _safe_cast(spec: TensorSpec, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast only when no value changes meaning.

    JSON numbers arrive as int64 or float64, so float64 -> float32 is allowed (precision is
    rounded, as a float32 model would anyway) as long as nothing overflows to infinity; integers
    are allowed into floats only while they stay exact, and into narrower integers only while
    they fit. Floats are never truncated into integers.
    """
    src, name = arr.dtype, spec.name
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
