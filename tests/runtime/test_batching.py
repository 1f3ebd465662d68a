"""Micro-batching: concurrent requests share runs, get their own answers and their own errors."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.batching import MicroBatcher
from runtime.errors import ClosedError, InferenceError, InputError, OverloadedError
from runtime.metrics import Metrics
from runtime.model import Model
from runtime.schema import CheckedInputs, InputChecker, TensorSpec
from tests.support.onnx_models import reshape_model


@pytest.fixture(scope="module")
def digits_model(signed_digits_package) -> Model:  # type: ignore[no-untyped-def]
    return Model(signed_digits_package.path, warmup_batches=(32,))


def test_concurrent_singles_are_merged_and_split_back(digits_model: Model, digits_split):
    batcher = MicroBatcher(digits_model, max_batch=32, max_delay_ms=20)
    xs = digits_split.x_test[:64]
    expected = digits_model.run(xs)["logits"]
    try:
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda x: batcher.run(x, timeout=10), xs))
    finally:
        batcher.close()
    for got, want in zip(results, expected, strict=True):
        assert got.outputs["logits"].shape == (10,)  # single sample in, single sample out
        np.testing.assert_allclose(got.outputs["logits"], want, rtol=1e-5, atol=1e-6)
    assert max(r.batch_size for r in results) > 1, "no request shared a run"
    assert all(r.model is digits_model for r in results)


def test_a_lone_request_does_not_wait_out_max_delay(digits_model: Model, digits_split):
    """Nothing else came for a quarter of max_delay: the batch closes (the lull rule)."""
    batcher = MicroBatcher(digits_model, max_batch=32, max_delay_ms=8000)
    try:
        result = batcher.run(digits_split.x_test[0], timeout=6)  # max_delay alone would time out
    finally:
        batcher.close()
    assert result.batch_size == 1


def test_flush_runs_what_is_queued_without_waiting(digits_model: Model, digits_split):
    batcher = MicroBatcher(digits_model, max_batch=32, max_delay_ms=60_000)
    try:
        futures = [batcher.submit(x) for x in digits_split.x_test[:3]]
        batcher.flush()  # the caller has no more now
        results = [f.result(10) for f in futures]  # the lull alone would be 15 s
        batcher.flush()  # nothing queued: nothing to do
        later = batcher.submit(digits_split.x_test[3])
        batcher.flush()
        assert later.result(10).batch_size == 1
    finally:
        batcher.close()
    assert [r.batch_size for r in results] == [3, 3, 3]


def test_run_queued_runs_the_batch_on_the_callers_thread(digits_model: Model, digits_split):
    """wake=False + run_queued: the caller runs the batch itself, callbacks included; the worker
    is not woken for a first request."""
    batcher = MicroBatcher(digits_model, max_batch=32, max_delay_ms=60_000)
    seen: list[str] = []
    try:
        futures = [batcher.submit(x, wake=False) for x in digits_split.x_test[:3]]
        for f in futures:
            f.add_done_callback(lambda _: seen.append(threading.current_thread().name))
        time.sleep(0.2)
        assert not any(f.done() for f in futures)  # the worker was not woken, and did not run
        batcher.run_queued()
        assert all(f.done() for f in futures)  # done on return, no waiting
        results = [f.result(0) for f in futures]
        batcher.run_queued()  # nothing queued: nothing to do
    finally:
        batcher.close()
    assert [r.batch_size for r in results] == [3, 3, 3]
    assert seen == [threading.current_thread().name] * 3
    want = digits_model.run(digits_split.x_test[:3])["logits"]
    np.testing.assert_allclose(np.stack([r.outputs["logits"] for r in results]), want,
                               rtol=1e-5, atol=1e-6)


def test_without_wake_a_full_batch_still_goes_to_the_worker(digits_model: Model, digits_split):
    batcher = MicroBatcher(digits_model, max_batch=4, max_delay_ms=60_000)
    names: list[str] = []
    try:
        futures = [batcher.submit(x, wake=False) for x in digits_split.x_test[:4]]
        futures[0].add_done_callback(lambda _: names.append(threading.current_thread().name))
        results = [f.result(10) for f in futures]  # the lull alone would be 15 s
    finally:
        batcher.close()
    assert [r.batch_size for r in results] == [4] * 4
    assert names == ["edgefleet-batcher"]


def test_worker_carries_on_when_a_caller_takes_the_batch_it_waits_on(digits_model: Model,
                                                                     digits_split):
    batcher = MicroBatcher(digits_model, max_batch=32, max_delay_ms=60_000)
    try:
        first = batcher.submit(digits_split.x_test[0])  # wakes the worker: it waits for mates
        time.sleep(0.2)
        batcher.flush()  # wakes it again, to run the batch ...
        batcher.run_queued()  # ... which this thread takes first (the worker must wake up)
        assert first.done()
        time.sleep(0.2)
        second = batcher.submit(digits_split.x_test[1])
        batcher.flush()
        result = second.result(10)  # run by the worker, which went back to waiting
    finally:
        batcher.close()
    assert result.batch_size == 1


def test_run_queued_racing_the_worker_answers_every_request_once(digits_model: Model,
                                                                  digits_split):
    """Producers wake the worker while a driver keeps running the queue itself: each request is
    run exactly once, by one of them, and gets its own answer."""
    # a lull of 5 ms: the driver, every millisecond, takes batches the worker is waiting on
    batcher = MicroBatcher(digits_model, max_batch=8, max_delay_ms=20)
    xs = digits_split.x_test[:200]
    expected = digits_model.run(xs)["logits"]
    calls = [0] * len(xs)
    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set():
            batcher.run_queued()
            time.sleep(0.001)

    def produce(k: int) -> list[tuple[int, object]]:
        out = []
        for i in range(k, len(xs), 4):
            fut = batcher.submit(xs[i], wake=i % 2 == 0)
            fut.add_done_callback(lambda _, i=i: calls.__setitem__(i, calls[i] + 1))
            out.append((i, fut))
        return out

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            submitted = [p for part in pool.map(produce, range(4)) for p in part]
        results = {i: fut.result(10) for i, fut in submitted}  # type: ignore[attr-defined]
        stop.set()
        driver.join()
        after = batcher.run(xs[0], timeout=10)  # the worker is still there, alone now
    finally:
        stop.set()
        driver.join()
        batcher.close()
    np.testing.assert_allclose(after.outputs["logits"], expected[0], rtol=1e-5, atol=1e-6)
    assert sorted(results) == list(range(len(xs)))
    for i, result in results.items():
        np.testing.assert_allclose(result.outputs["logits"], expected[i], rtol=1e-5, atol=1e-6)
    assert calls == [1] * len(xs)


def test_batch_never_exceeds_max_batch(digits_model: Model, digits_split):
    batcher = MicroBatcher(digits_model, max_batch=4, max_delay_ms=50)
    futures = [batcher.submit(x) for x in digits_split.x_test[:10]]
    futures.append(batcher.submit(digits_split.x_test[:3]))  # a request that is itself a batch
    results = [f.result(10) for f in futures]
    batcher.close()
    assert max(r.batch_size for r in results) <= 4
    assert results[-1].outputs["logits"].shape == (3, 10)


def test_bad_request_fails_alone(digits_model: Model, digits_split):
    batcher = MicroBatcher(digits_model, max_batch=32, max_delay_ms=50)
    good = [batcher.submit(x) for x in digits_split.x_test[:5]]
    bad = batcher.submit(np.full((1, 8, 8), np.nan))
    wrong_shape = batcher.submit(np.zeros((1, 7, 7)))
    more = [batcher.submit(x) for x in digits_split.x_test[5:10]]
    with pytest.raises(InputError, match="NaN"):
        bad.result(5)
    with pytest.raises(InputError, match="axis 2 must be 8"):
        wrong_shape.result(5)
    assert all(f.result(5).outputs["logits"].shape == (10,) for f in good + more)
    batcher.close()


class PoisonModel:
    """A fake model whose run fails when any row holds the value 13: a failure only
    onnxruntime would notice, so the batcher must find the culprit among batch-mates."""

    name, version, batchable, uniform_samples = "poison", "1", True, True

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.calls: list[int] = []
        self._checker = InputChecker([TensorSpec(name="x", dtype="float32", shape=["N", 2])])
        self.exact_sample = self._checker.exact_sample

    @property
    def input_checker(self) -> InputChecker:
        return self._checker

    def check(self, inputs, *, finite: bool = True) -> CheckedInputs:  # type: ignore[no-untyped-def]
        return self._checker.check(inputs, finite=finite)

    def run_checked(self, arrays):  # type: ignore[no-untyped-def]
        x = arrays["x"]
        self.calls.append(len(x))
        if (x == 13).any():
            raise InferenceError("poisoned row")
        return {"y": x * 2}


def test_model_failure_in_a_batch_is_isolated():
    model = PoisonModel()
    batcher = MicroBatcher(model, max_batch=16, max_delay_ms=100)  # type: ignore[arg-type]
    futures = [batcher.submit([float(i), 0.0]) for i in range(10, 16)]
    results = {}
    for i, fut in zip(range(10, 16), futures, strict=True):
        try:
            results[i] = fut.result(5).outputs["y"].tolist()
        except InferenceError as exc:
            results[i] = str(exc)
    batcher.close()
    assert results[13] == "poisoned row"
    assert results[12] == [24.0, 0.0]
    assert results[15] == [30.0, 0.0]
    assert model.calls[0] == 6  # they did share the first run


def test_models_without_a_batch_axis_run_each_request_alone(tmp_path: Path):
    model = Model(reshape_model(tmp_path / "r.onnx"), warmup_batches=())
    assert not model.batchable
    batcher = MicroBatcher(model, max_batch=8, max_delay_ms=20)
    a = batcher.submit({"x": np.ones((2, 6)), "shape": [3, 4]})
    b = batcher.submit({"x": np.ones((2, 6)), "shape": [4, 3]})
    assert a.result(5).outputs["y"].shape == (3, 4)
    assert b.result(5).outputs["y"].shape == (4, 3)
    batcher.close()


def test_full_queue_refuses_instead_of_dropping():
    model = PoisonModel()
    gate = threading.Event()
    original = model.run_checked

    def slow(arrays):  # type: ignore[no-untyped-def]
        gate.wait(5)
        return original(arrays)

    model.run_checked = slow  # type: ignore[method-assign]
    batcher = MicroBatcher(model, max_batch=1, max_delay_ms=0, max_queue=3)  # type: ignore[arg-type]
    futures = [batcher.submit([1.0, 2.0]) for _ in range(8)]
    time.sleep(0.1)
    refused = [f for f in futures if f.done() and isinstance(f.exception(), OverloadedError)]
    gate.set()
    accepted = [f for f in futures if f not in refused]
    assert refused, "nothing was refused"
    assert all(f.result(5).outputs["y"].tolist() == [2.0, 4.0] for f in accepted)
    assert len(accepted) + len(refused) == 8
    batcher.close()


def test_close_finishes_queued_requests_then_refuses_new_ones(digits_model: Model, digits_split):
    batcher = MicroBatcher(digits_model, max_batch=8, max_delay_ms=30)
    futures = [batcher.submit(x) for x in digits_split.x_test[:20]]
    batcher.close()
    assert all(f.result(0).outputs["logits"].shape == (10,) for f in futures)
    with pytest.raises(ClosedError):
        batcher.submit(digits_split.x_test[0]).result(1)


class BrokenModel(PoisonModel):
    """A model object that breaks the batcher's own bookkeeping around a run (its input
    checker, which the batch-wide NaN check asks for, is missing)."""

    def __getattribute__(self, name: str):  # type: ignore[no-untyped-def]
        if name == "input_checker":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_worker_survives_its_own_failures():
    batcher = MicroBatcher(BrokenModel(), max_batch=4, max_delay_ms=1)  # type: ignore[arg-type]
    with pytest.raises(InferenceError, match="batch failed"):
        batcher.run([1.0, 2.0], timeout=5)
    with pytest.raises(InferenceError, match="batch failed"):
        batcher.run([1.0, 2.0], timeout=5)  # the worker is still there to answer
    batcher.close(timeout=5)


def test_done_callbacks_run_once_each(digits_model: Model, digits_split):
    batcher = MicroBatcher(digits_model, max_batch=8, max_delay_ms=5)
    calls: list[str] = []
    lock = threading.Lock()
    pendings = [batcher.submit(x) for x in digits_split.x_test[:40]]
    for p in pendings:  # some register before, some after their result is in
        p.add_done_callback(lambda done: (lock.acquire(), calls.append(done.result().model.version),
                                          lock.release()))
    for p in pendings:
        p.result(5)
    batcher.close()
    time.sleep(0.05)
    assert len(calls) == 40
    late: list[bool] = []
    pendings[0].add_done_callback(lambda done: late.append(done.done()))
    assert late == [True]  # already done: called at once, here


def test_a_failing_done_callback_costs_its_batch_mates_nothing(digits_model: Model, digits_split,
                                                              caplog):
    """Callbacks of one batch run one after another: one that raises is logged, the others run."""
    batcher = MicroBatcher(digits_model, max_batch=8, max_delay_ms=50)
    calls: list[int] = []
    pendings = [batcher.submit(x, wake=False) for x in digits_split.x_test[:8]]
    for i, p in enumerate(pendings):
        def callback(done: Any, i: int = i) -> None:
            if i == 3:
                raise TypeError("a callback that cannot build its answer")
            calls.append(i)
        p.add_done_callback(callback)
    batcher.run_queued()  # on this thread: nothing raises out of it either
    batcher.close()
    assert sorted(calls) == [0, 1, 2, 4, 5, 6, 7]
    assert "done callback failed" in caplog.text


def test_exact_samples_and_all_other_forms_get_the_same_answers(digits_model: Model,
                                                                  digits_split):
    """A float32 sample of exactly the model's shape skips the per-request check (the batcher
    tests dtype and shape itself); lists, other dtypes, byte orders and batches of one still go
    through the checker, and in one batch all of them get the model's own answers."""
    assert digits_model.exact_sample == ("image", np.dtype(np.float32), (1, 8, 8))
    x = digits_split.x_test[0]
    forms = [x, x.tolist(), x.astype(np.float64), x.astype(">f4"), x[np.newaxis],
             np.asfortranarray(x)]
    want = digits_model.run(x)["logits"]
    batcher = MicroBatcher(digits_model, max_batch=32, max_delay_ms=60_000)
    try:
        futures = [batcher.submit(f) for f in forms]
        batcher.flush()
        results = [f.result(10) for f in futures]
    finally:
        batcher.close()
    assert [r.batch_size for r in results] == [len(forms)] * len(forms)
    for form, result in zip(forms, results, strict=True):
        got = result.outputs["logits"]
        assert got.shape == ((1, 10) if np.ndim(form) == 4 else (10,))
        np.testing.assert_allclose(got.reshape(10), want, rtol=1e-5, atol=1e-6)


def test_exact_samples_with_nan_or_the_wrong_shape_fail_alone(digits_model: Model, digits_split):
    good = digits_split.x_test[:2]
    nan = good[0].copy()
    nan[0, 3, 3] = np.nan  # exact dtype and shape: the batch's own NaN check must catch it
    wrong = np.zeros((1, 8, 7), np.float32)
    batcher = MicroBatcher(digits_model, max_batch=32, max_delay_ms=60_000)
    try:
        futures = [batcher.submit(good[0]), batcher.submit(nan), batcher.submit(wrong),
                   batcher.submit(good[1])]
        batcher.flush()
        with pytest.raises(InputError, match="NaN or infinite"):
            futures[1].result(10)
        with pytest.raises(InputError, match="axis 3 must be 8"):
            futures[2].result(10)
        ok = [futures[0].result(10), futures[3].result(10)]
    finally:
        batcher.close()
    want = digits_model.run(good)["logits"]
    np.testing.assert_allclose(np.stack([r.outputs["logits"] for r in ok]), want,
                               rtol=1e-5, atol=1e-6)


def test_requests_of_several_rows_share_batches_with_single_samples(digits_model: Model,
                                                                      digits_split):
    """Single samples are taken off the queue in bulk; once a request of several rows (or none)
    is queued, rows are counted again, and batches never exceed max_batch rows."""
    xs = digits_split.x_test
    requests = [xs[0], xs[1:4], xs[4], xs[5:5], xs[5], xs[6:8], xs[8], xs[9]]
    batcher = MicroBatcher(digits_model, max_batch=4, max_delay_ms=60_000)
    try:
        futures = [batcher.submit(r, wake=False) for r in requests]
        assert batcher._multi_row == 3
        while batcher.pending:
            batcher.run_queued()
        results = [f.result(10) for f in futures]
        assert batcher._multi_row == 0
        assert batcher._queued_rows == 0
        singles = [batcher.submit(x, wake=False) for x in xs[10:16]]
        batcher.run_queued()  # all single rows: up to max_batch of them at once
        assert [f.done() for f in singles] == [True] * 4 + [False] * 2
        batcher.run_queued()
        assert [f.result(10).batch_size for f in singles] == [4] * 4 + [2] * 2
    finally:
        batcher.close()
    want = digits_model.run(xs[:10])["logits"]
    got = [r.outputs["logits"] for r in results]
    np.testing.assert_allclose(np.concatenate([g.reshape(-1, 10) for g in got]), want,
                               rtol=1e-5, atol=1e-6)
    assert [g.shape for g in got] == [(10,), (3, 10), (10,), (0, 10), (10,), (2, 10), (10,),
                                      (10,)]
