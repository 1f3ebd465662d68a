"""Hot swap: under a steady stream, the slot switches models with no request lost or failed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.batching import MicroBatcher
from runtime.model import Model
from runtime.package import write_package
from runtime.slot import EmptySlotError, ModelSlot


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, digits_onnx: Path) -> tuple[Model, Model]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("versions")
    v1 = write_package(root / "v1", digits_onnx, name="digits", version="1")
    v2 = write_package(root / "v2", digits_onnx, name="digits", version="2")
    return Model(v1.path, warmup_batches=(32,)), Model(v2.path, warmup_batches=(32,))


def test_swap_under_load_loses_nothing(two_versions, digits_split):
    v1, v2 = two_versions
    slot = ModelSlot(v1)
    batcher = MicroBatcher(slot, max_batch=16, max_delay_ms=2)
    records: list[tuple[float, object]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def producer(offset: int) -> None:
        i = offset
        while not stop.is_set():
            submitted = time.perf_counter()
            fut = batcher.submit(digits_split.x_test[i % len(digits_split.x_test)])
            with lock:
                records.append((submitted, fut))
            fut.result(10)
            i += 1

    threads = [threading.Thread(target=producer, args=(k * 50,)) for k in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.4)
    swapped_at = time.perf_counter()
    old = slot.swap(v2)
    time.sleep(0.4)
    stop.set()
    for t in threads:
        t.join(10)
    batcher.close()

    assert old is v1
    assert slot.generation == 2
    versions = [fut.result(0).model.version for _, fut in records]  # raises if any failed
    assert versions.count("1") > 10
    assert versions.count("2") > 10
    assert all(fut.result(0).model.version == "2" for t, fut in records if t > swapped_at + 0.001)


def test_request_in_flight_finishes_on_the_model_it_started_on(two_versions, digits_split):
    v1, v2 = two_versions
    slot = ModelSlot(v1)
    batcher = MicroBatcher(slot, max_batch=32, max_delay_ms=300)  # it waits in the queue
    queued = batcher.submit(digits_split.x_test[0])
    slot.swap(v2)
    after = batcher.submit(digits_split.x_test[0])
    assert queued.result(5).model.version == "1"
    assert after.result(5).model.version == "2"
    np.testing.assert_allclose(queued.result().outputs["logits"], after.result().outputs["logits"])
    batcher.close()


def test_empty_slot_says_so():
    slot = ModelSlot()
    assert slot.empty
    with pytest.raises(EmptySlotError, match="no model is active"):
        _ = slot.current


def test_batcher_on_an_empty_slot_fails_the_request_not_the_caller():
    batcher = MicroBatcher(ModelSlot(), max_batch=4)
    with pytest.raises(EmptySlotError):
        batcher.submit(np.zeros((1, 8, 8))).result(1)
    batcher.close()
