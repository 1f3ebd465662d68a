"""What every pass shares: a name for the report and `run(src, dst)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Pass(Protocol):
    """One step from an ONNX file to another; `describe` goes into the manifest and report."""

    name: str

    def run(self, src: Path, dst: Path) -> Path: ...

    def describe(self) -> dict[str, Any]: ...


def cpu_has_vnni() -> bool:
    """Without VNNI, u8s8 integer kernels can saturate; weights then use a reduced 7-bit range."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags
