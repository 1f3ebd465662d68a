"""What the agent reports about itself: process figures for telemetry, read from /proc."""

from __future__ import annotations

import os
import resource
import time


class ProcessStats:
    """RSS and CPU percent since the previous call (CPU time over wall time, all cores)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._last_wall = self.started
        self._last_cpu = self._cpu()

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the peak is the best we have
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    def cpu_percent(self) -> float:
        wall, cpu = time.monotonic(), self._cpu()
        span = wall - self._last_wall
        percent = 100.0 * (cpu - self._last_cpu) / span if span > 0 else 0.0
        self._last_wall, self._last_cpu = wall, cpu
        return round(percent, 1)
