"""Micro-batching: concurrent single requests share one onnxruntime call.

On a small CPU most of a small model's time is per-call overhead, so merging requests that arrive
within `max_delay_ms` of each other (up to `max_batch` samples) multiplies throughput. Each
request's names, dtypes and shapes are checked before it joins a batch; the NaN/Inf check runs
once on the whole batch and, when it fires, finds the culprits. If onnxruntime still fails a
batch, its requests are retried one by one, so one bad request never fails its batch-mates.

Per-request bookkeeping is kept to a few Python operations (a deque, one object that is queue
entry, latch and future), because at tens of thousands of requests a second that, not the
model, is the limit: with 64 producer threads each Python call on the path is paid again in GIL
hand-offs (one object instead of two measured 1.06x the throughput).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from runtime.errors import ClosedError, EdgefleetError, InferenceError, OverloadedError
from runtime.model import Model
from runtime.schema import _new_tuple
from runtime.slot import ModelSlot

log = logging.getLogger("edgefleet.runtime")


class BatchResult(NamedTuple):
    """One request's share of a batch run (a NamedTuple: one is built per request)."""

    outputs: dict[str, np.ndarray]
    model: Model
    queue_s: float
    inference_s: float
    batch_size: int


class Pending:
    """One submitted request: its inputs while it waits, then its outcome, exactly once.

    The same object is the queue entry, the latch (a bare lock, no condition variable) and the
    future, so a request costs one object beside its lock and its result: at tens of thousands of
    requests a second, each Python object and call on the path shows. Callbacks run on the batcher's thread
    and must be quick.
    """

    __slots__ = ("_arrays", "_callbacks", "_enqueued", "_error", "_latch", "_model", "_result",
                 "_rows", "_squeeze", "_woken")

    def __init__(self, model: Model, arrays: dict[str, np.ndarray], rows: int,
                 squeeze: bool) -> None:
        """A request for `model`: every field is set here at once, and the arrival time taken,
        since each extra statement on this path costs throughput."""
        self._latch = latch = threading.Lock()
        latch.acquire()
        self._result: BatchResult | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Pending], None]] | None = None
        self._woken = False
        self._model = model
        self._arrays = arrays
        self._rows = rows
        self._squeeze = squeeze
        self._enqueued = time.perf_counter()

    @classmethod
    def failed(cls, error: BaseException) -> Pending:
        """A request refused before it was queued: done at once with `error`."""
        pending = cls.__new__(cls)  # never queued: it needs no model, inputs or arrival time
        pending._latch = latch = threading.Lock()
        latch.acquire()
        pending._callbacks = None
        pending._woken = False
        pending._finish(None, error)
        return pending

    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def result(self, timeout: float | None = None) -> BatchResult:
        """Wait for the outcome; raise the request's own error if it failed."""
        if self._result is None and self._error is None:
            if not self._latch.acquire(True, -1 if timeout is None else timeout):
                raise TimeoutError(f"no result within {timeout} s")
            self._latch.release()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except TimeoutError:
            raise
        except BaseException as exc:  # handing the error back is the point
            return exc
        return None

    def add_done_callback(self, fn: Callable[[Pending], None]) -> None:
        """Call fn(self) once done: on the batcher's thread, or at once here if already done."""
        with _CALLBACK_LOCK:
            if not self._woken:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self, result: BatchResult | None, error: BaseException | None) -> None:
        self._result, self._error = result, error
        _wake_all([self])


# A batch also closes when no request has come for this fraction of max_delay: traffic that
# thin brings no batch-mates worth the wait, so a lone request is not held for the full
# max_delay (measured on the agent at 700 messages/s: time in the queue p50 2.0 -> 1.0 ms). 64
# threads calling at once submit far more densely than that and still fill their batches (the
# same throughput, interleaved in one process: medians 30.0k and 30.0k requests/s).
LULL_FRACTION = 0.25

_CALLBACK_LOCK = threading.Lock()  # registration vs completion of callbacks; held for nanoseconds


def _wake_all(done: list[Pending]) -> None:
    """Release the callers of requests whose outcome is set, then run their callbacks; the
    callback lock is taken once for the lot, not once a request."""
    callbacks = []
    with _CALLBACK_LOCK:
        for pending in done:
            pending._woken = True
            if pending._callbacks is not None:
                callbacks.append((pending, pending._callbacks))
                pending._callbacks = None
    for pending in done:
        pending._latch.release()
    for pending, fns in callbacks:
        for fn in fns:
            try:  # one callback's failure must not cost the others of the batch their answers
                fn(pending)
            except Exception:
                log.exception("a request's done callback failed")


def _nothing() -> None:
    pass


def _batch_result(part: dict[str, np.ndarray], model: Model, queue_s: float, inference_s: float,
                  size: int) -> BatchResult:
    return _new_tuple(BatchResult, (part, model, queue_s, inference_s, size))


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
        self._lull_s = self.max_delay_s * LULL_FRACTION
        self.max_queue = max_queue
        self._items: deque[Pending] = deque()
        self._queued_rows = 0
        self._multi_row = 0  # queued requests of other than one row (see _take)
        self._lock = threading.Lock()  # entered directly on the hot path (Condition's is Python)
        self._cond = threading.Condition(self._lock)
        self._wake_at: int | None = None  # rows queued at which a waiting worker wants a notify
        self._ready: list[Pending] = []  # results set, waiters not yet woken (see _wake_ready)
        self._ran = False
        self._flush = False  # set by flush(): close the batch being gathered now
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="edgefleet-batcher", daemon=True)
        self._worker.start()

    def submit(self, inputs: Mapping[str, Any] | Any, *, wake: bool = True) -> Pending:
        """Queue one request; its Pending holds a BatchResult or the request's own error.

        wake=False: the caller will run the queue itself (`run_queued`) once it stops
        submitting, so the worker is woken only by a full batch, not by a first request.
        """
        model = self.slot._model  # the request is bound to the model active now
        if model is not None and (exact := model.exact_sample) is not None \
                and type(inputs) is np.ndarray and inputs.dtype is exact[1] \
                and inputs.shape == exact[2]:
            # the hottest case: one sample of exactly the model's dtype and shape (the NaN/Inf
            # check runs once on the whole batch); InputChecker.check's own first test, made
            # here without the call
            pending = Pending(model, {exact[0]: inputs[np.newaxis]}, 1, True)
        else:
            try:
                model = self.slot.current
                arrays, rows, squeeze = model.check(inputs, finite=False)
            except EdgefleetError as exc:
                if model is not None:
                    model.metrics.record_rejected()
                return Pending.failed(exc)
            pending = Pending(model, arrays, rows, squeeze)
        with self._lock:
            if self._closed:
                error: EdgefleetError | None = ClosedError("the batcher is closed")
            elif len(self._items) >= self.max_queue:
                error = OverloadedError(f"inference queue is full ({self.max_queue} waiting)")
            else:
                error = None
                self._items.append(pending)
                rows = pending._rows
                self._queued_rows += rows
                if rows != 1:
                    self._multi_row += 1
                # Wake the worker only when it has something to do: a first request, or a full
                # batch. Waking it on every request costs a thread switch each (measured: it
                # halved throughput with 64 producers).
                wake_at = self._wake_at
                if wake_at is not None and self._queued_rows >= (
                        wake_at if wake else self.max_batch):
                    self._cond.notify()
        if error is not None:
            pending._finish(None, error)
        return pending

    def run(self, inputs: Mapping[str, Any] | Any, timeout: float | None = None) -> BatchResult:
        """Submit and wait: the blocking form of `submit`."""
        return self.submit(inputs).result(timeout)

    @property
    def pending(self) -> int:
        return len(self._items)

    def flush(self) -> None:
        """Run what is queued without waiting for batch-mates: the caller knows no more are
        coming now (its own input queue is empty). A caller that feeds the batcher from a queue
        gets batches as large as its backlog and no added latency when traffic is light."""
        with self._lock:
            if not self._items:
                return
            self._flush = True
            if self._wake_at is not None:  # the worker is waiting for more
                self._cond.notify()

    def run_queued(self) -> None:
        """Run one batch of what is queued now, on the caller's thread, callbacks included.

        For a caller that feeds the batcher from a queue of its own: when that queue runs dry no
        batch-mates are coming, and running the batch here saves handing it to the worker
        thread and back (two thread switches per batch; on a busy 2-core box each switch waits
        for a CPU). The worker still runs batches that fill up meanwhile.
        """
        with self._lock:
            batch = self._take()
        if batch:
            ready: list[Pending] = []
            self._process(batch, ready, _nothing)
            _wake_all(ready)

    def close(self, timeout: float | None = None) -> None:
        """Stop intake, finish every queued request, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if not batch:
                self._wake_ready()
                return
            self._ran = False
            self._process(batch, self._ready, self._before_run)
            if not self._ran:  # no onnxruntime call woke the waiters of earlier batches: do it now
                self._wake_ready()

    def _before_run(self) -> None:
        """The worker is about to let go of the GIL for onnxruntime: wake the ready callers."""
        self._wake_ready()
        self._ran = True

    def _wake_ready(self) -> None:
        """Wake the callers whose results are ready.

        Called just before the worker lets go of the GIL for a while (onnxruntime, or waiting for
        requests), not as each result is set: a caller woken while the worker still holds the GIL
        only goes back to sleep waiting for it, one more thread switch per request.
        """
        if self._ready:  # emptied in place: the batch being run appends to this very list
            ready = self._ready.copy()
            self._ready.clear()
            _wake_all(ready)

    def _collect(self) -> list[Pending]:
        """Wait for a first request, then for more until max_batch rows, its deadline, a lull, or
        a flush."""
        items = self._items
        with self._cond:
            while True:
                while not items:
                    if self._closed:
                        return []
                    self._wake_at = 1
                    self._wake_ready()
                    self._cond.wait()
                deadline = items[0]._enqueued + self.max_delay_s
                lull = self._lull_s
                while (items and not self._closed and self._queued_rows < self.max_batch
                       and not self._flush):
                    # the last request's arrival, read off the queue: submit does no extra work
                    remaining = min(deadline, items[-1]._enqueued + lull) - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wake_at = self.max_batch
                    self._wake_ready()
                    self._cond.wait(remaining)
                self._wake_at = None
                self._flush = False
                batch = self._take()
                if batch:  # else a caller ran the queue (run_queued) while this waited
                    return batch

    def _take(self) -> list[Pending]:
        """Up to max_batch rows off the queue (none if it is empty); under the lock."""
        items = self._items
        if not items:
            return []
        if not self._multi_row:  # every queued request is one row: no rows to add up
            n = min(len(items), self.max_batch)
            if n == 1:
                batch = [items.popleft()]
            else:
                popleft = items.popleft
                batch = [popleft() for _ in range(n)]
            self._queued_rows -= n
            return batch
        batch = [items.popleft()]
        rows = batch[0]._rows
        while items and rows + items[0]._rows <= self.max_batch:
            req = items.popleft()
            batch.append(req)
            rows += req._rows
        self._queued_rows -= rows
        self._multi_row -= sum(req._rows != 1 for req in batch)
        return batch

    def _process(self, batch: list[Pending], ready: list[Pending],
                 before_run: Callable[[], None]) -> None:
        """Run a batch; finished requests go to `ready` (their callers are woken later, by
        whoever owns that list), before_run is called just before each onnxruntime call."""
        try:
            groups = _groups(batch)
        except Exception as exc:  # never let the worker die: fail this batch, serve the next
            groups = []
            _fail_all(batch, exc)
        for group in groups:
            try:
                self._run_group(group, ready, before_run)
            except Exception as exc:
                _fail_all(group, exc)

    def _run_group(self, group: list[Pending], ready: list[Pending],
                   before_run: Callable[[], None]) -> None:
        model = group[0]._model
        if len(group) == 1:
            arrays = group[0]._arrays
        else:
            arrays = {k: np.concatenate([r._arrays[k] for r in group]) for k in group[0]._arrays}
        bad = _non_finite(model, arrays)
        if bad:  # rare: find the culprits, fail them, run the others
            group = self._fail_non_finite(model, group)
            if group:
                self._run_group(group, ready, before_run)
            return
        started = time.perf_counter()
        try:
            before_run()
            outputs = model.run_checked(arrays)
        except InferenceError as exc:
            if len(group) == 1:
                group[0]._finish(None, exc)
            else:  # find the one that broke the batch; the others still succeed
                for req in group:
                    self._run_group([req], ready, before_run)
            return
        done = time.perf_counter()
        spent, size = done - started, len(group)
        model.metrics.record_many([done - req._enqueued for req in group])
        if size == 1 and not group[0]._squeeze:  # as it came: the outputs need not have its rows
            req = group[0]
            req._result = _batch_result(outputs, model, started - req._enqueued, spent, 1)
            ready.append(req)
            return
        names, values = list(outputs), list(outputs.values())
        only = values[0] if len(names) == 1 else None
        if size > 1 and only is not None and len(only) == size \
                and [req._rows for req in group].count(1) == size:
            # the common case (one output, one row a request) in one tight loop: iterating the
            # output yields its rows as views, and each statement here runs once a request
            name, new = names[0], _new_tuple
            for req, row in zip(group, only, strict=True):
                req._result = new(BatchResult, (
                    {name: row if req._squeeze else row[np.newaxis]}, model,
                    started - req._enqueued, spent, size))
            ready.extend(group)
            return
        offset = 0
        for req in group:
            rows = req._rows
            if only is not None:  # the common case: one output
                part = {names[0]: only[offset] if req._squeeze else only[offset:offset + rows]}
            elif req._squeeze:  # one sample without its batch axis: row `offset` of each output
                part = dict(zip(names, [v[offset] for v in values], strict=True))
            else:
                part = dict(zip(names, [v[offset:offset + rows] for v in values], strict=True))
            offset += rows
            req._result = _batch_result(part, model, started - req._enqueued, spent, size)
            ready.append(req)

    @staticmethod
    def _fail_non_finite(model: Model, group: list[Pending]) -> list[Pending]:
        keep = []
        for req in group:
            error = next((e for k, a in req._arrays.items()
                          if (e := model.input_checker.non_finite(k, a)) is not None), None)
            if error is None:
                keep.append(req)
            else:
                model.metrics.record_rejected()
                req._finish(None, error)
        return keep


def _groups(batch: list[Pending]) -> list[list[Pending]]:
    """Split a batch into runs that can share one onnxruntime call."""
    if len(batch) == 1:
        return [batch]
    model = batch[0]._model
    # count() compares in C (identity first): a third of the cost of all() over a generator
    if model.uniform_samples and [req._model for req in batch].count(model) == len(batch):
        return [batch]  # the check already proved every sample has the same shape
    by_signature: dict[Any, list[Pending]] = {}
    for req in batch:
        by_signature.setdefault(_signature(req), []).append(req)
    return list(by_signature.values())


def _fail_all(group: list[Pending], exc: Exception) -> None:
    for req in group:
        if not req.done():
            req._finish(None, InferenceError(f"batch failed: {exc!r}"))


def _signature(req: Pending) -> tuple[int, object]:
    """Requests can share a run when they go to the same model with the same sample shape."""
    if not req._model.batchable:
        return id(req._model), id(req)  # runs alone
    if len(req._arrays) == 1:
        return id(req._model), next(iter(req._arrays.values())).shape[1:]
    return id(req._model), tuple((k, v.shape[1:]) for k, v in req._arrays.items())


def _non_finite(model: Model, arrays: dict[str, np.ndarray]) -> bool:
    checker = model.input_checker
    return any(checker.non_finite(k, a) is not None for k, a in arrays.items())

