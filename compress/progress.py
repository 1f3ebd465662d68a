"""How the pipeline tells its caller what it is doing: the CLI draws progress bars, tests stay quiet."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def stage(self, text: str) -> None: ...

    def start(self, task: str, total: int) -> None: ...

    def advance(self, task: str, amount: int = 1) -> None: ...

    def finish(self, task: str) -> None: ...


class Quiet:
    """A reporter that says nothing (library use, tests, --json)."""

    def stage(self, text: str) -> None:
        pass

    def start(self, task: str, total: int) -> None:
        pass

    def advance(self, task: str, amount: int = 1) -> None:
        pass

    def finish(self, task: str) -> None:
        pass
