"""What every pass shares: a name for the report and `run(src, dst)`; and the CPU facts that
quantization and the report depend on."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Protocol


class Pass(Protocol):
    """One step from an ONNX file to another; `describe` goes into the manifest and report."""

    name: str

    def run(self, src: Path, dst: Path) -> Path: ...

    def describe(self) -> dict[str, Any]: ...


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo, read once ({} where there is none, as off Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0].splitlines()
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines) if v}


def cpu_has_vnni() -> bool:
    """Without VNNI, u8s8 integer kernels can saturate; weights then use a reduced 7-bit range."""
    flags = _cpuinfo().get("flags", "").split()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def machine() -> dict[str, Any]:
    """The CPU that latencies were measured on. They hold for that CPU only: INT8 kernels, for
    one, run no faster than float on CPUs without a fast INT8 path (VNNI)."""
    import os
    import platform

    import onnxruntime

    flags = _cpuinfo().get("flags", "").split()
    return {"cpu": _cpuinfo().get("model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "avx2": "avx2" in flags, "avx512_vnni": cpu_has_vnni()}
