"""Static INT8 in QDQ format: activation ranges calibrated on data, weights per channel or per tensor.

QDQ keeps the float graph readable and lets onnxruntime fuse Q/DQ pairs into integer kernels;
`exclude` leaves named nodes in float (the accuracy-aware fallback uses it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.data import Dataset
from compress.errors import QuantizationError
from compress.passes.base import cpu_has_vnni
from compress.recipe import CalibrationMethod

CALIBRATION_BATCH = 16
MAX_CALIBRATION_SAMPLES = 512


@dataclass(frozen=True)
class StaticQuantize:
    data: Dataset
    per_channel: bool = True
    method: CalibrationMethod = "minmax"
    exclude: tuple[str, ...] = field(default_factory=tuple)
    name: str = "static-int8-qdq"

    def run(self, src: Path, dst: Path) -> Path:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        data = self.data

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self._batches: Iterator[dict[str, np.ndarray]] = iter(_batches(data))

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self._batches, None)

        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        try:
            quantize_static(
                str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                per_channel=self.per_channel, reduce_range=not cpu_has_vnni(),
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=methods[self.method], nodes_to_exclude=list(self.exclude),
                extra_options={"CalibMovingAverage": self.method == "minmax"})
        except Exception as exc:
            raise QuantizationError(f"static quantization failed: {exc}") from exc
        return dst

    def describe(self) -> dict[str, Any]:
        return {"pass": self.name, "per_channel": self.per_channel, "calibration": self.method,
                "calibration_samples": min(len(self.data), MAX_CALIBRATION_SAMPLES),
                "float_nodes": list(self.exclude)}


def _batches(data: Dataset) -> Iterator[dict[str, np.ndarray]]:
    n = min(len(data), MAX_CALIBRATION_SAMPLES)
    for start in range(0, n, CALIBRATION_BATCH):
        yield data.batch(start, min(n, start + CALIBRATION_BATCH))
