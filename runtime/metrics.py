"""Inference metrics: counts, errors and a latency histogram with p50/p95/p99.

A fixed log-spaced histogram (about 4% relative error from 1 µs to over an hour) costs constant memory
and a few hundred nanoseconds per observation, so it can run on every request of a
long-lived daemon, unlike a list of samples.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

_MIN_S = 1e-6
_GROWTH = 1.04  # each bucket is 4% wider than the last
_BUCKETS = 1 + math.ceil(math.log(3600 / _MIN_S) / math.log(_GROWTH))


@dataclass(frozen=True)
class MetricsSnapshot:
    count: int
    errors: int  # the model's failures (onnxruntime errors, NaN/Inf outputs): health counts these
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    rejected: int = 0  # requests refused for the sender's bad input: not the model's fault

    def as_dict(self) -> dict[str, float | int | None]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in vars(self).items()}


# Bucket i > 0 holds (_EDGES[i-1], _EDGES[i]]; bucket 0 everything up to _MIN_S, the last
# everything beyond its lower edge. One binary search finds a bucket, in C for a single value
# (bisect) and for a whole array (searchsorted) alike.
_EDGES = _MIN_S * _GROWTH ** np.arange(_BUCKETS - 1)
_EDGE_LIST = _EDGES.tolist()


def _bucket(seconds: float) -> int:
    return bisect.bisect_left(_EDGE_LIST, seconds)


class LatencyHistogram:
    """Thread-safe histogram of durations in seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * _BUCKETS
        self._n = 0
        self._sum = 0.0
        self._max = 0.0

    def observe(self, seconds: float) -> None:
        idx = _bucket(seconds)
        with self._lock:
            self._counts[idx] += 1
            self._n += 1
            self._sum += seconds
            if seconds > self._max:
                self._max = seconds

    def observe_many(self, values: list[float]) -> None:
        """Several observations under one lock, bucketed in one numpy pass (the metrics buffer
        flushes a few hundred at a time)."""
        if not values:
            return
        arr = np.asarray(values, dtype=np.float64)
        counts = np.bincount(np.searchsorted(_EDGES, arr), minlength=_BUCKETS)
        nonzero = np.flatnonzero(counts)
        with self._lock:
            for i in nonzero.tolist():
                self._counts[i] += int(counts[i])
            self._n += len(values)
            self._sum += float(arr.sum())
            self._max = max(self._max, float(arr.max()))

    @property
    def count(self) -> int:
        return self._n

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds (upper edge of its bucket, capped at the maximum seen)."""
        with self._lock:
            return self._quantile_locked(q)

    def _quantile_locked(self, q: float) -> float | None:
        if self._n == 0:
            return None
        rank = max(1, math.ceil(q * self._n))
        seen = 0
        for idx, c in enumerate(self._counts):
            seen += c
            if seen >= rank:
                upper = _MIN_S * _GROWTH**idx
                return min(upper, self._max)
        return self._max

    def stats(self) -> tuple[int, float | None, float | None, float | None, float | None, float]:
        """(count, p50, p95, p99, mean, max) in seconds, read under one lock."""
        with self._lock:
            mean = self._sum / self._n if self._n else None
            return (self._n, self._quantile_locked(0.5), self._quantile_locked(0.95),
                    self._quantile_locked(0.99), mean, self._max)


class Metrics:
    """Request count, error count and latency of one model or one agent.

    `record` only appends to a deque (atomic, a fraction of a microsecond); the histogram takes
    what is there in bulk every few hundred requests and whenever it is read.
    """

    _FLUSH_AT = 256

    def __init__(self) -> None:
        self.latency = LatencyHistogram()
        self._errors = 0
        self._rejected = 0
        self._lock = threading.Lock()
        self._recent: deque[float] = deque()

    def record(self, seconds: float) -> None:
        self._recent.append(seconds)
        if len(self._recent) >= self._FLUSH_AT:
            self._flush()

    def record_many(self, seconds: list[float]) -> None:
        self._recent.extend(seconds)
        if len(self._recent) >= self._FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        # popleft, not a swap of lists: an append racing with the flush is never lost
        recent = self._recent
        with self._lock:
            popleft = recent.popleft
            taken = [popleft() for _ in range(len(recent))]
        if taken:
            self.latency.observe_many(taken)

    def record_error(self) -> None:
        """The model failed a request (it raised, or answered NaN/Inf)."""
        with self._lock:
            self._errors += 1

    def record_rejected(self) -> None:
        """A request was refused before the model ran (wrong shape, dtype, NaN input): kept
        apart from errors, so a sender's bad input never rolls a healthy model back."""
        with self._lock:
            self._rejected += 1

    def snapshot(self) -> MetricsSnapshot:
        self._flush()
        n, p50, p95, p99, mean, mx = self.latency.stats()

        def ms(v: float | None) -> float | None:
            return None if v is None else v * 1000.0

        return MetricsSnapshot(count=n, errors=self._errors, p50_ms=ms(p50), p95_ms=ms(p95),
                               p99_ms=ms(p99), mean_ms=ms(mean), max_ms=ms(mx if n else None),
                               rejected=self._rejected)
