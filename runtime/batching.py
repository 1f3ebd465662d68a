"""Micro-batching: concurrent single requests share one onnxruntime call.

On a small CPU most of a tiny model's time is per-call overhead, so merging requests that arrive
within `max_delay_ms` of each other (up to `max_batch` samples) multiplies throughput. Each
request is checked on its own before it joins a batch, and if a batch still fails in
onnxruntime its requests are retried one by one, so one bad request never fails its batch-mates.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import ClosedError, EdgefleetError, InferenceError, OverloadedError
from runtime.model import Model
from runtime.slot import ModelSlot


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a batch run."""

    outputs: dict[str, np.ndarray]
    model: Model
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass
class _Request:
    model: Model
    arrays: dict[str, np.ndarray]
    rows: int
    squeeze: bool
    enqueued: float
    future: Future[BatchResult]

    def signature(self) -> tuple[int, object]:
        """Requests can share a run when they go to the same model with the same sample shape."""
        if not self.model.batchable:
            return id(self.model), id(self)  # runs alone
        return id(self.model), tuple((k, v.shape[1:]) for k, v in self.arrays.items())


_STOP = object()


class MicroBatcher:
    """Merges requests for the model in a slot into batches run by one worker thread."""

    def __init__(
        self,
        source: Model | ModelSlot,
        *,
        max_batch: int = 32,
        max_delay_ms: float = 2.0,
        max_queue: int = 4096,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.slot = source if isinstance(source, ModelSlot) else ModelSlot(source)
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        self._queue: queue.Queue[_Request | object] = queue.Queue(maxsize=max_queue)
        self._carry: _Request | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="edgefleet-batcher", daemon=True)
        self._worker.start()

    def submit(self, inputs: Mapping[str, Any] | Any) -> Future[BatchResult]:
        """Queue one request; its future holds a BatchResult or the request's own error."""
        future: Future[BatchResult] = Future()
        if self._closed:
            future.set_exception(ClosedError("the batcher is closed"))
            return future
        model = self.slot.current  # the request is bound to the model active now
        try:
            checked = model.check(inputs)
        except EdgefleetError as exc:
            model.metrics.record_error()
            future.set_exception(exc)
            return future
        req = _Request(model, checked.arrays, checked.batch, checked.added_batch,
                       time.perf_counter(), future)
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            future.set_exception(OverloadedError(
                f"inference queue is full ({self._queue.maxsize} requests waiting)"))
        return future

    def run(self, inputs: Mapping[str, Any] | Any, timeout: float | None = None) -> BatchResult:
        """Submit and wait: the blocking form of `submit`."""
        return self.submit(inputs).result(timeout)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float | None = None) -> None:
        """Stop intake, finish every queued request, then stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._worker.join(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            self._process(batch)

    def _collect(self) -> list[_Request] | None:
        """Block for a first request, then gather more until full or its deadline passes."""
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if first is _STOP:
            return None
        assert isinstance(first, _Request)
        batch, rows = [first], first.rows
        deadline = first.enqueued + self.max_delay_s
        while rows < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else \
                    self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # finish this batch, then stop
                break
            assert isinstance(item, _Request)
            if rows + item.rows > self.max_batch:
                self._carry = item
                break
            batch.append(item)
            rows += item.rows
        return batch

    def _process(self, batch: list[_Request]) -> None:
        groups: dict[Any, list[_Request]] = {}
        for req in batch:
            groups.setdefault(req.signature(), []).append(req)
        for group in groups.values():
            try:
                self._run_group(group)
            except InferenceError as exc:
                if len(group) == 1:
                    group[0].future.set_exception(exc)
                    continue
                for req in group:  # find the one that broke the batch; the others still succeed
                    try:
                        self._run_group([req])
                    except InferenceError as single_exc:
                        req.future.set_exception(single_exc)
            except Exception as exc:  # never let the worker die: fail this group, serve the next
                for req in group:
                    if not req.future.done():
                        req.future.set_exception(InferenceError(f"batch failed: {exc!r}"))

    def _run_group(self, group: list[_Request]) -> None:
        model = group[0].model
        started = time.perf_counter()
        if len(group) == 1:
            arrays = group[0].arrays
        else:
            arrays = {k: np.concatenate([r.arrays[k] for r in group]) for k in group[0].arrays}
        outputs = model.run_checked(arrays)
        done = time.perf_counter()
        offset = 0
        for req in group:
            if len(group) == 1:
                part = outputs
            else:
                part = {k: v[offset:offset + req.rows] for k, v in outputs.items()}
                offset += req.rows
            if req.squeeze:
                part = {k: v[0] for k, v in part.items()}
            model.metrics.record(done - req.enqueued)
            req.future.set_result(BatchResult(part, model, started - req.enqueued,
                                              done - started, len(group)))
