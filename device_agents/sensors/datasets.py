"""Where simulated sensor samples come from: real digits scans, a sine signal, or any `.npz` file.

A `Dataset` is an array of samples (first axis) with optional true labels, so the simulator can
score the agent's answers. Labels are kept as strings because that is how results carry them.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_agents.errors import DeviceAgentError

BUILTIN = ("digits", "sine")
LABEL_KEYS = ("y", "labels")  # `labels` is what `edgefleet compress --eval` files use


class DatasetError(DeviceAgentError):
    """A dataset cannot be loaded: unknown name, missing or malformed file, missing library."""


@dataclass(frozen=True)
class Dataset:
    """Samples along the first axis of `x`; `labels[i]` (a string) is the truth for `x[i]`."""

    name: str
    x: np.ndarray
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.x.ndim < 1 or len(self.x) == 0:
            raise DatasetError(f"dataset {self.name}: no samples")
        if self.labels is not None and len(self.labels) != len(self.x):
            raise DatasetError(f"dataset {self.name}: {len(self.labels)} labels for "
                               f"{len(self.x)} samples")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def sample(self, i: int) -> tuple[np.ndarray, str | None]:
        """The i-th sample, cycling: a run may send more messages than the dataset holds."""
        j = i % len(self.x)
        return self.x[j], None if self.labels is None else self.labels[j]


def load_dataset(spec: str, *, window: int = 32, noise: float = 0.0, seed: int = 0) -> Dataset:
    """`digits`, `sine` (window and noise apply), or the path of a `.npz` file."""
    if spec == "digits":
        return digits()
    if spec == "sine":
        return sine(window=window, noise=noise, seed=seed)
    path = Path(spec)
    if path.suffix.lower() == ".npz" or path.is_file():
        return from_npz(path)
    raise DatasetError(f"unknown dataset {spec!r}: use digits, sine or the path of a .npz file")


def digits() -> Dataset:
    """scikit-learn's digits test split, exactly the one the example models are scored on.

    The split comes from `compress.examples.digits` (numpy and scikit-learn only at size 8) so
    that the accuracy a sensor measures is comparable with the one in the package's report.
    """
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise DatasetError("the digits dataset needs scikit-learn: "
                           "pip install 'edgefleet[compress]'") from None
    from compress.examples.digits import load_digits_split

    split = load_digits_split()
    return Dataset("digits", np.ascontiguousarray(split.x_test, dtype=np.float32),
                   tuple(str(int(v)) for v in split.y_test))


def sine(*, window: int = 32, noise: float = 0.0, seed: int = 0, period: int = 64,
         windows: int = 256) -> Dataset:
    """Windows of `window` float32 samples sliding along one sine (period in samples), plus
    Gaussian noise of standard deviation `noise`; no labels. The windows hop one sample, so
    cycling through them plays a continuous signal."""
    if window < 1:
        raise DatasetError(f"--window must be at least 1, got {window}")
    if noise < 0:
        raise DatasetError(f"--noise must be 0 or more, got {noise}")
    t = np.arange(windows)[:, None] + np.arange(window)[None, :]
    x = np.sin(2 * np.pi * t / period)
    if noise:
        x = x + np.random.default_rng(seed).normal(0.0, noise, size=x.shape)
    return Dataset("sine", x.astype(np.float32))


def from_npz(path: Path) -> Dataset:
    """Samples in array `x` (else the first array that is not labels), labels in `y` or
    `labels` when present."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (a dataset is digits, sine or a .npz file)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # allow_pickle=False: a pickled object array is refused, never executed
        raise DatasetError(f"{path}: not a readable .npz of numeric arrays ({exc})") from None
    if not isinstance(arrays, dict) or not arrays:
        raise DatasetError(f"{path}: holds no arrays")
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    x_key = "x" if "x" in arrays else next((k for k in arrays if k not in LABEL_KEYS), None)
    if x_key is None:
        raise DatasetError(f"{path}: no sample array (expected 'x', or any array besides "
                           f"{' / '.join(LABEL_KEYS)})")
    x = arrays[x_key]
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: array {x_key!r} has dtype {x.dtype}; samples must be numbers")
    if x.ndim < 1 or len(x) == 0:
        raise DatasetError(f"{path}: array {x_key!r} holds no samples (shape {x.shape})")
    labels = None
    if label_key is not None:
        y = arrays[label_key]
        if y.ndim != 1 or len(y) != len(x):
            raise DatasetError(f"{path}: {label_key!r} has shape {y.shape}, expected "
                               f"({len(x)},): one label per sample of {x_key!r}")
        labels = tuple(_label(v) for v in y.tolist())
    return Dataset(path.name, x, labels)


def _label(value: object) -> str:
    """Class 3 saved as 3.0 still compares equal to the agent's label "3"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)
