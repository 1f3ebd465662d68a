"""The agent's answers to sensor messages: a result from a finished inference request, or the
error code for its failure. Payload shapes are CONTRACT 5.3; protocol.py encodes them."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from device_agents import protocol
from runtime.batching import BatchResult
from runtime.errors import InputError, OverloadedError


def error_code(error: BaseException) -> str:
    """The `error` topic's code for an inference request's failure."""
    if isinstance(error, InputError):
        return protocol.BAD_INPUT
    if isinstance(error, OverloadedError):
        return protocol.OVERLOADED
    return protocol.MODEL_ERROR


def non_finite(result: BatchResult) -> bool:
    """Whether the model answered NaN or Inf: its failure, counted against its health."""
    return not all(np.isfinite(v).all() for v in result.outputs.values())


def result_payload(result: BatchResult, *, msg_id: Any, stream: str, seq: int, epoch: int,
                   ts_in: float, run: str = "") -> bytes:
    """The result message of one answered sensor message."""
    model = result.model
    doc: dict[str, Any] = {
        "id": msg_id, "stream": stream, "seq": seq, "epoch": epoch, "run": run,
        "model": {"name": model.name, "version": model.version},
        "outputs": {k: v.tolist() for k, v in result.outputs.items()},
    }
    scored = model.classify(result.outputs)
    if scored:
        best = scored[0]
        doc["label"], doc["score"] = best.label, round(best.score, 6)
        doc["top"] = [{"label": lab, "score": round(s, 6)} for lab, s in best.top]
    now = time.time()
    doc["latency_ms"] = {"queue": round(result.queue_s * 1000, 3),
                         "inference": round(result.inference_s * 1000, 3),
                         "total": round((now - ts_in) * 1000, 3)}
    doc["ts_in"], doc["ts_out"] = round(ts_in, 6), round(now, 6)
    return protocol.encode(doc)
