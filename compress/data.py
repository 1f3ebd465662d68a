"""Data files for calibration, evaluation and fine-tuning: `.npz` with one array per model input
(named as the input; a single-input model takes any one name) and an optional `labels` array."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.errors import DataError
from runtime.schema import TensorSpec


@dataclass(frozen=True)
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[start:stop] for k, v in self.inputs.items()}


def load_npz(path: Path, specs: list[TensorSpec], *, role: str) -> Dataset:
    """Load and check a data file against the model's inputs; errors name the file and input."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise DataError(f"{role} data {path} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{role} data {path} is not a readable .npz file: {exc}") from None
    labels = arrays.pop("labels", None)
    if not arrays:
        raise DataError(f"{role} data {path} holds no input arrays (only labels)")
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{role} data {path} has arrays {sorted(arrays)}, the model needs "
                        f"{names} (missing {missing[0]!r})")
    inputs = {s.name: _fit(arrays[s.name], s, path, role) for s in specs}
    sizes = {len(a) for a in inputs.values()}
    if len(sizes) != 1:
        raise DataError(f"{role} data {path}: inputs have different sample counts {sorted(sizes)}")
    n = sizes.pop()
    if n == 0:
        raise DataError(f"{role} data {path} has no samples")
    if labels is not None and (labels.ndim != 1 or len(labels) != n
                               or labels.dtype.kind not in "iu"):
        raise DataError(f"{role} data {path}: labels must be {n} integer class indices, got "
                        f"{labels.dtype} with shape {list(labels.shape)}")
    return Dataset(inputs=inputs, labels=labels, source=str(path))


def _fit(arr: np.ndarray, spec: TensorSpec, path: Path, role: str) -> np.ndarray:
    where = f"{role} data {path}, input {spec.name!r}"
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{where}: expected numbers ({spec.dtype}), got {arr.dtype}")
    if arr.ndim != len(spec.shape):
        raise DataError(f"{where}: expected shape {spec.describe()} (a batch of samples), got "
                        f"{list(arr.shape)}")
    for axis, dim in enumerate(spec.shape):
        if axis and isinstance(dim, int) and arr.shape[axis] != dim:
            raise DataError(f"{where}: expected shape {spec.describe()}, got {list(arr.shape)}")
    target = np.dtype(spec.dtype)
    if arr.dtype != target:
        if arr.dtype.kind == "f" and target.kind in "iu":
            raise DataError(f"{where}: expected {spec.dtype}, got {arr.dtype}")
        arr = arr.astype(target)
    if target.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{where}: contains NaN or infinite values")
    return arr
