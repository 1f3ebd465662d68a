"""Quality and latency of candidate models, measured on this machine.

Quality is compared with the float baseline on the same data: accuracy (top-1 against labels),
cosine (per sample, against the baseline's outputs; the minimum counts) or mse. Latency is the
median of warm single-sample runs with the same thread count, measured side by side in
alternating rounds so that a noisy neighbour slows every candidate alike.
"""

from __future__ import annotations

import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.data import Dataset
from compress.recipe import Metric

EVAL_BATCH = 64


@dataclass(frozen=True)
class Quality:
    metric: Metric
    value: float  # accuracy (0..1), min cosine, or mse
    loss: float  # against the baseline: accuracy drop, 1 - min cosine, or mse
    mean_cosine: float | None = None

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"metric": self.metric, "value": round(self.value, 6),
                               "loss": round(self.loss, 6)}
        if self.mean_cosine is not None:
            doc["mean_cosine"] = round(self.mean_cosine, 6)
        return doc


def file_sizes(path: Path) -> tuple[int, int]:
    """(bytes on disk, bytes to send compressed): zeros from pruning show in the second."""
    data = path.read_bytes()
    return len(data), len(zlib.compress(data, 6))


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    from runtime.model import SessionConfig

    config = SessionConfig(threads=threads, auto_threads=False)
    return ort.InferenceSession(str(path), sess_options=config.session_options(),
                                providers=["CPUExecutionProvider"])


def outputs(path: Path, data: Dataset, threads: int) -> np.ndarray:
    """The first output over the whole data set, run in batches."""
    sess = session(path, threads)
    name = sess.get_outputs()[0].name
    parts = [sess.run([name], data.batch(i, i + EVAL_BATCH))[0] for i in range(0, len(data), EVAL_BATCH)]
    return np.concatenate(parts)


def quality(metric: Metric, got: np.ndarray, baseline: np.ndarray, labels: np.ndarray | None,
            baseline_value: float | None = None) -> Quality:
    if metric == "accuracy":
        if labels is None:
            raise ValueError("accuracy needs labels")
        acc = float((got.reshape(len(got), -1).argmax(1) == labels).mean())
        base = baseline_value if baseline_value is not None else float(
            (baseline.reshape(len(baseline), -1).argmax(1) == labels).mean())
        return Quality("accuracy", acc, base - acc)
    a = got.reshape(len(got), -1).astype(np.float64)
    b = baseline.reshape(len(baseline), -1).astype(np.float64)
    if metric == "cosine":
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30), 1.0)
        return Quality("cosine", float(cos.min()), 1.0 - float(cos.min()), float(cos.mean()))
    mse = float(((a - b) ** 2).mean())
    return Quality("mse", mse, mse)


def latencies(paths: dict[str, Path], sample: dict[str, np.ndarray], threads: int, *,
              calls: int = 40, rounds: int = 5,
              on_round: Callable[[], None] | None = None) -> dict[str, float]:
    """Median ms per warm single-sample run of each model, measured in alternating rounds."""
    sessions = {name: session(path, threads) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for sess in sessions.values():
        for _ in range(5):
            sess.run(None, sample)
    names = list(sessions)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            run = sessions[name].run
            for _ in range(calls):
                t0 = time.perf_counter()
                run(None, sample)
                times[name].append(time.perf_counter() - t0)
        if on_round:
            on_round()
    return {name: statistics.median(v) * 1000 for name, v in times.items()}


def calls_for(ms_per_call: float) -> int:
    """Enough calls per round for a stable median, without spending minutes on big models."""
    return int(min(200, max(10, 200 / max(ms_per_call, 0.05))))
