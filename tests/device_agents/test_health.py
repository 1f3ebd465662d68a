"""Process figures and the heap trim: what telemetry reports, and memory given back after a burst."""

from __future__ import annotations

import threading

import pytest

from device_agents import health
from device_agents.health import ProcessStats, release_free_heap


def test_process_figures_are_plausible() -> None:
    stats = ProcessStats()
    sum(i * i for i in range(200_000))  # some CPU
    assert stats.rss_bytes() > 10_000_000
    assert stats.uptime_s() > 0
    assert stats.cpu_percent() >= 0


@pytest.mark.skipif(health._MALLOC_TRIM is None, reason="the C library has no malloc_trim")
def test_heap_freed_by_a_burst_goes_back_to_the_os() -> None:
    """Payload-sized blocks allocated on other threads (as a burst of messages is) and freed,
    while a few survivors (a queue's last entries, a cache) pin their heaps: glibc keeps the
    free pages between them until trimmed."""
    survivors: list[bytes] = []

    def burst() -> None:
        held = [bytes(600 + i % 7) for i in range(40_000)]  # ~24 MB of malloc'd blocks
        survivors.extend(held[::400] + held[-1:])
        del held

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    before = ProcessStats.rss_bytes()
    assert release_free_heap()
    after = ProcessStats.rss_bytes()
    assert len(survivors) == 4 * 101
    assert after < before - (8 << 20), f"RSS {before >> 20} -> {after >> 20} MiB"
