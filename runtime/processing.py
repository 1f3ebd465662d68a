"""Pre- and post-processing declared in a package's manifest.

Keeping these in the manifest (not in sensor code) means a sensor sends raw readings and every
device applies exactly the normalization the model was trained with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec
import numpy as np

PostprocessKind = Literal["none", "softmax", "sigmoid"]


class Normalize(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """x -> (x * scale - mean) / std, with mean and std per channel or scalar.

    `scale` is applied first (e.g. 1/255 for 8-bit pixels); `channel_axis` is the axis of the
    batched input that per-channel mean/std lists run along.
    """

    scale: float = 1.0
    mean: float | list[float] = 0.0
    std: float | list[float] = 1.0
    channel_axis: int = 1

    def __post_init__(self) -> None:
        stds = self.std if isinstance(self.std, list) else [self.std]
        if any(s == 0 for s in stds):
            raise ValueError("std must not be zero")
        if isinstance(self.mean, list) and isinstance(self.std, list) and \
                len(self.mean) != len(self.std):
            raise ValueError("mean and std lists must have the same length")


class Preprocessor:
    """Applies each input's Normalize as one fused multiply-add: x * a + b."""

    def __init__(self, spec: Mapping[str, Normalize] | None, ranks: Mapping[str, int]) -> None:
        self._ops: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, norm in (spec or {}).items():
            rank = ranks[name]
            mean = np.asarray(norm.mean, dtype=np.float32)
            std = np.asarray(norm.std, dtype=np.float32)
            a, b = np.broadcast_arrays(np.float32(norm.scale) / std, -mean / std)
            if a.ndim:
                shape = [1] * rank
                shape[norm.channel_axis] = a.size
                a, b = a.reshape(shape), b.reshape(shape)
            self._ops[name] = (a.astype(np.float32), b.astype(np.float32))

    def __bool__(self) -> bool:
        return bool(self._ops)

    def apply(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, (a, b) in self._ops.items():
            x = arrays[name]
            arrays[name] = (x * a + b).astype(x.dtype, copy=False)
        return arrays


@dataclass(frozen=True)
class Scored:
    """One sample's classification: the best label and the top-k list."""

    label: str
    score: float
    top: list[tuple[str, float]]


def postprocess(kind: PostprocessKind, scores: np.ndarray) -> np.ndarray:
    """Turn the first output's logits into probabilities along the last axis."""
    if kind == "softmax":
        shifted = scores - scores.max(axis=-1, keepdims=True)
        exp = np.exp(shifted)
        out: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
        return out
    if kind == "sigmoid":
        sig: np.ndarray = 1.0 / (1.0 + np.exp(-scores))
        return sig
    return scores


def top_k(scores: np.ndarray, labels: Sequence[str], k: int) -> list[Scored]:
    """Best k labels per row of a (batch, classes) array; ties keep the lower class index."""
    if scores.ndim == 1:
        scores = scores[np.newaxis]
    flat = scores.reshape(scores.shape[0], -1)
    k = max(1, min(k, flat.shape[1]))
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    result = []
    for row, idx in zip(flat, order, strict=True):
        top = [(labels[i] if i < len(labels) else str(i), float(row[i])) for i in idx]
        result.append(Scored(label=top[0][0], score=top[0][1], top=top))
    return result
