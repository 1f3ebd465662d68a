"""The latency histogram's percentiles stay within its bucket precision of the exact ones."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from runtime.metrics import LatencyHistogram, Metrics


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_quantiles_within_four_percent(q: float):
    rng = np.random.default_rng(1)
    samples = rng.lognormal(mean=np.log(0.002), sigma=0.8, size=20_000)  # ~2 ms, long tail
    hist = LatencyHistogram()
    for s in samples:
        hist.observe(float(s))
    exact = float(np.quantile(samples, q))
    got = hist.quantile(q)
    assert got is not None
    assert exact <= got * 1.0001
    assert got <= exact * 1.04 + 1e-9


def test_snapshot_in_milliseconds_and_errors():
    metrics = Metrics()
    assert metrics.snapshot().p50_ms is None
    for ms in (1, 2, 3, 4, 100):
        metrics.record(ms / 1000)
    metrics.record_error()
    metrics.record_rejected()
    metrics.record_rejected()
    snap = metrics.snapshot()
    assert snap.count == 5
    assert snap.errors == 1
    assert snap.rejected == 2
    assert snap.p50_ms == pytest.approx(3, rel=0.04)
    assert snap.max_ms == pytest.approx(100)
    assert snap.p99_ms == pytest.approx(100)
    assert set(snap.as_dict()) == {"count", "errors", "p50_ms", "p95_ms", "p99_ms", "mean_ms",
                                   "max_ms", "rejected"}


def test_concurrent_observations_are_all_counted():
    hist = LatencyHistogram()

    def work() -> None:
        for _ in range(5000):
            hist.observe(0.001)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert hist.count == 40_000


def test_metrics_from_many_threads_lose_nothing():
    metrics = Metrics()

    def work() -> None:
        for i in range(3000):
            metrics.record(0.001 + i * 1e-7)
        metrics.record_many([0.002] * 100)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert metrics.snapshot().count == 6 * 3100


def test_bulk_and_single_observations_fill_the_same_buckets():
    """observe_many (searchsorted over the edges) and observe (bisect) agree, edges included."""
    from runtime.metrics import _EDGES

    rng = np.random.default_rng(2)
    values = [*rng.lognormal(np.log(0.002), 3.0, 5000), 0.0, 1e-9, *_EDGES[:50:7],
              float(_EDGES[-1]) * 10]
    one, bulk = LatencyHistogram(), LatencyHistogram()
    for v in values:
        one.observe(float(v))
    bulk.observe_many([float(v) for v in values])
    assert one._counts == bulk._counts
    n, p50, p95, p99, mean, mx = one.stats()
    assert (n, p50, p95, p99, mx) == tuple(bulk.stats()[i] for i in (0, 1, 2, 3, 5))
    assert mean == pytest.approx(bulk.stats()[4], rel=1e-12)  # sums in another order
