"""What every benchmark shares: the machine description, the results file and the summary table."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    import numpy

    from compress.passes.base import machine as cpu

    return {**cpu(), "python": platform.python_version(), "numpy": numpy.__version__}


@dataclass
class Target:
    """One figure's target: `figure op limit` (op is '<=' or '>=')."""

    figure: str
    op: str
    limit: float

    def met(self, figures: dict[str, Any]) -> bool:
        value = figures.get(self.figure)
        if not isinstance(value, int | float):
            return False
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def text(self) -> str:
        return f"{self.op} {self.limit:g}"


@dataclass
class Report:
    name: str
    params: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)

    def write(self) -> Path:
        verdicts = {t.figure: t.met(self.figures) for t in self.targets}
        doc = {
            "name": self.name, "machine": machine(), "params": self.params,
            "figures": self.figures,
            "targets": {t.figure: {"target": t.text(), "met": verdicts[t.figure]}
                        for t in self.targets},
            "pass": all(verdicts.values()),
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.name}.json"
        path.write_text(json.dumps(doc, indent=2) + "\n")
        self._print(verdicts)
        print(f"\nwrote {path}  pass={doc['pass']}")
        return path

    def _print(self, verdicts: dict[str, bool]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=self.name, title_justify="left")
        for col in ("figure", "value", "target", "met"):
            table.add_column(col)
        by_figure = {t.figure: t for t in self.targets}
        for key, value in self.figures.items():
            target = by_figure.get(key)
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            table.add_row(key, shown, target.text() if target else "",
                          ("yes" if verdicts[key] else "NO") if target else "")
        Console().print(table)


def timed_calls(fn: Callable[[], Any], n: int) -> list[float]:
    """Per-call wall times in seconds."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved_medians(fns: dict[str, Callable[[], Any]], calls: int,
                        rounds: int) -> dict[str, float]:
    """Median per-call time of each function, measured in alternating rounds so that a noisy
    neighbour on a shared machine slows all of them alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name] += timed_calls(fns[name], calls)
    return {k: statistics.median(v) for k, v in samples.items()}
