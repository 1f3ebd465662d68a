"""The disk outbox on its own: durability callbacks, order, bounds, TTL, restart, disk full."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from device_agents.outbox import Outbox


def _fill(box: Outbox, n: int, size: int = 100, prefix: str = "m") -> list[bool]:
    outcomes: list[bool] = []
    for i in range(n):
        box.put(f"t/{prefix}{i}", bytes([i % 256]) * size, on_durable=outcomes.append)
    assert box.flush(10)
    return outcomes


def test_rows_come_back_in_order_and_leave_on_ack(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    assert _fill(box, 100) == [True] * 100
    rows = box.peek(0, 1000)
    assert [r.topic for r in rows] == [f"t/m{i}" for i in range(100)]
    for row in rows[:60]:
        box.ack(row.id)
    box.put("t/sync", b"x")
    box.flush()
    assert box.stats().depth == 41
    assert box.peek(0, 1)[0].topic == "t/m60"
    box.close()


def test_survives_a_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    _fill(box, 10)
    box.close()
    again = Outbox(tmp_path / "o.db")
    assert [r.topic for r in again.peek(0, 100)] == [f"t/m{i}" for i in range(10)]
    assert again.stats().depth == 10
    again.close()


def test_drop_oldest_when_full_is_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=64 * 1024, on_full="drop-oldest")
    _fill(box, 1000, size=200)
    stats = box.stats()
    assert stats.bytes <= 64 * 1024
    assert stats.dropped == 1000 - stats.depth
    assert stats.dropped_by == {"dropped_oldest": stats.dropped}
    assert box.peek(0, 100_000)[-1].topic == "t/m999"  # the newest are kept
    box.close()


def test_reject_new_when_full_is_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=64 * 1024, on_full="reject-new")
    _fill(box, 1000, size=200)
    stats = box.stats()
    assert stats.dropped_by == {"rejected_full": 1000 - stats.depth}
    assert box.peek(0, 1)[0].topic == "t/m0"  # the oldest are kept
    box.close()


def test_ttl_expires_old_rows_and_counts_them(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", ttl_s=0.5)
    _fill(box, 20)
    time.sleep(1.6)
    box.put("t/fresh", b"x")
    box.flush()
    deadline = time.monotonic() + 5
    while box.stats().dropped_by.get("expired", 0) < 20 and time.monotonic() < deadline:
        box.put("t/tick", b"x")
        box.flush()
        time.sleep(0.2)
    assert box.stats().dropped_by["expired"] == 20
    box.close()
    again = Outbox(tmp_path / "o.db")  # counters persist with the data
    assert again.stats().dropped_by["expired"] == 20
    again.close()


def test_disk_full_refuses_durability_and_keeps_working(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    _fill(box, 5)
    # SQLite's own "database or disk is full" (SQLITE_FULL), as on a full disk
    box._db.execute(f"PRAGMA max_page_count = {box._db.execute('PRAGMA page_count').fetchone()[0]}")
    outcomes = _fill(box, 200, size=4000, prefix="big")
    assert False in outcomes, "a write to a full database reported durable"
    assert box.stats().write_errors > 0
    box._db.execute("PRAGMA max_page_count = 1000000")
    assert _fill(box, 3, prefix="after") == [True] * 3
    topics = [r.topic for r in box.peek(0, 10_000)]
    assert topics[:5] == [f"t/m{i}" for i in range(5)]  # nothing accepted earlier was lost
    assert topics[-3:] == ["t/after0", "t/after1", "t/after2"]
    box.close()


def test_put_from_many_threads(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    outcomes: list[bool] = []

    def worker(k: int) -> None:
        for i in range(500):
            box.put(f"t/{k}/{i}", b"payload", on_durable=outcomes.append)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert box.flush(30)
    assert len(outcomes) == 4000
    assert all(outcomes)
    assert box.stats().depth == 4000
    per_thread: dict[str, list[int]] = {}
    for row in box.peek(0, 10_000):
        _, k, i = row.topic.split("/")
        per_thread.setdefault(k, []).append(int(i))
    assert all(v == sorted(v) for v in per_thread.values())  # each producer's order is kept
    box.close()



def test_deferred_puts_commit_on_the_callers_thread(tmp_path: Path) -> None:
    """commit_deferred() writes the deferred rows here: their callbacks have run, on this thread,
    when it returns (the agent's intake worker relies on it to skip the writer thread)."""
    box = Outbox(tmp_path / "o.db")
    seen: list[tuple[bool, int]] = []
    for i in range(5):
        box.put(f"t/d{i}", b"x", defer=True,
                on_durable=lambda ok: seen.append((ok, threading.get_ident())))
    box.commit_deferred()
    assert seen == [(True, threading.get_ident())] * 5
    assert [r.topic for r in box.peek(0, 10)] == [f"t/d{i}" for i in range(5)]
    box.close()


def test_deferred_puts_handed_to_the_writer(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    seen: list[int] = []
    box.put("t/a", b"x", defer=True, on_durable=lambda ok: seen.append(threading.get_ident()))
    box.commit_deferred(inline=False)
    assert box.flush(5)
    assert len(seen) == 1
    assert seen[0] != threading.get_ident()
    box.close()


def test_deferred_puts_left_behind_are_still_committed(tmp_path: Path) -> None:
    """A caller that defers and never commits loses nothing: the writer takes the rows."""
    box = Outbox(tmp_path / "o.db")
    done = threading.Event()
    box.put("t/forgotten", b"x", defer=True, on_durable=lambda ok: done.set())
    assert done.wait(5)
    assert box.stats().depth == 1
    box.close()
    again = Outbox(tmp_path / "o.db")
    assert [r.topic for r in again.peek(0, 10)] == ["t/forgotten"]
    again.close()


def test_acks_alone_are_deleted_without_a_new_put(tmp_path: Path) -> None:
    """Acknowledgements ride with the next commit; with no new rows the writer deletes them
    within ACK_IDLE_S, so a quiet outbox does not keep (and republish) acknowledged rows."""
    box = Outbox(tmp_path / "o.db")
    _fill(box, 10)
    for row in box.peek(0, 100):
        box.ack(row.id)
    deadline = time.monotonic() + 5
    while box.stats().depth and time.monotonic() < deadline:
        time.sleep(0.02)
    assert box.stats().depth == 0
    box.close()
    assert Outbox(tmp_path / "o.db").stats().depth == 0


def test_mixed_deferred_and_queued_puts_from_threads(tmp_path: Path) -> None:
    """A caller committing deferred rows while other threads put and the writer commits:
    every row is stored once, each producer's order kept."""
    box = Outbox(tmp_path / "o.db")
    outcomes: list[bool] = []

    def queued(k: int) -> None:
        for i in range(300):
            box.put(f"t/q{k}/{i}", b"p", on_durable=outcomes.append)

    def deferring() -> None:
        for i in range(300):
            box.put(f"t/d/{i}", b"p", defer=True, on_durable=outcomes.append)
            if i % 7 == 0:
                box.commit_deferred(inline=i % 2 == 0)
        box.commit_deferred()

    threads = [threading.Thread(target=queued, args=(k,)) for k in range(3)]
    threads.append(threading.Thread(target=deferring))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert box.flush(30)
    assert outcomes == [True] * 1200
    per_producer: dict[str, list[int]] = {}
    for row in box.peek(0, 10_000):
        _, k, i = row.topic.split("/")
        per_producer.setdefault(k, []).append(int(i))
    assert sorted(per_producer) == ["d", "q0", "q1", "q2"]
    assert all(v == sorted(v) and len(v) == 300 for v in per_producer.values())
    box.close()


def test_a_failed_commit_on_the_callers_thread_does_not_raise(tmp_path: Path) -> None:
    """The intake worker calls commit_deferred from its loop: an unexpected failure there is
    logged, not raised, and the write lock is free again for the writer."""
    box = Outbox(tmp_path / "o.db")
    real = box._commit

    def broken(batch: list[tuple[str, object]]) -> None:
        raise RuntimeError("boom")

    box._commit = broken  # type: ignore[method-assign]
    box.put("t/a", b"x", defer=True)
    box.commit_deferred()  # must not raise
    box._commit = real  # type: ignore[method-assign]
    done = threading.Event()
    box.put("t/b", b"y", on_durable=lambda ok: done.set())
    assert done.wait(5)
    box.close()


def test_a_response_keeps_its_correlation_data_across_a_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.put("t/response", b"{}", correlation=b"\x00corr-42")
    box.put("t/result", b"{}")
    assert box.flush(10)
    assert [r.correlation for r in box.take(0, 10)] == [b"\x00corr-42", None]  # fresh, in memory
    box.close()
    again = Outbox(tmp_path / "o.db")
    assert [r.correlation for r in again.peek(0, 10)] == [b"\x00corr-42", None]  # from disk
    again.close()


def test_an_outbox_of_an_older_agent_is_read_and_gains_the_new_column(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "o.db")
    db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
               " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,"
               " created REAL NOT NULL, size INTEGER NOT NULL)")
    db.execute("INSERT INTO outbox (topic, payload, qos, retain, created, size) "
               "VALUES ('t/old', x'7b7d', 1, 0, ?, 70)", (time.time(),))
    db.commit()
    db.close()
    box = Outbox(tmp_path / "o.db")
    rows = box.peek(0, 10)
    assert [(r.topic, r.payload, r.correlation) for r in rows] == [("t/old", b"{}", None)]
    box.put("t/new", b"{}", correlation=b"c")
    assert box.flush(10)
    assert [r.correlation for r in box.peek(0, 10)] == [None, b"c"]
    box.close()


def test_a_dead_letter_leaves_at_once_and_is_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    _fill(box, 3)
    first = box.peek(0, 1)[0]
    box.dead_letter(first.id)
    deadline = time.monotonic() + 5
    while len(box.peek(0, 10)) != 2 and time.monotonic() < deadline:  # committed
        time.sleep(0.01)
    stats = box.stats()
    assert stats.depth == 2
    assert stats.dropped_by == {"dead_letter": 1}
    assert [r.topic for r in box.peek(0, 10)] == ["t/m1", "t/m2"]
    box.close()
    again = Outbox(tmp_path / "o.db")
    assert again.stats().dropped_by == {"dead_letter": 1}  # the count survives a restart
    again.close()


def test_puts_past_the_pending_budget_are_refused_at_once_while_the_disk_lags(tmp_path: Path
                                                                              ) -> None:
    """A writer that cannot commit (here: held) lets no more than max_pending_bytes pile up in
    memory; what comes after is refused on the caller's thread, and the rest is stored."""
    box = Outbox(tmp_path / "o.db", max_pending_bytes=10_000)
    outcomes: list[tuple[int, bool]] = []
    with box._write_lock:  # the disk has stopped syncing
        for i in range(100):
            box.put(f"t/{i}", b"x" * 400, on_durable=lambda ok, i=i: outcomes.append((i, ok)),
                    bounded=True)
        refused = [i for i, ok in outcomes if not ok]
        assert refused == list(range(21, 100))  # 21 rows of 464 bytes fit in 10,000
        assert box.refused_pending == len(refused)
    assert box.flush(10)
    stored = sorted(i for i, ok in outcomes if ok)
    assert stored == list(range(21))
    assert [r.topic for r in box.peek(0, 200)] == [f"t/{i}" for i in range(21)]
    box.put("t/after", b"x" * 400, bounded=True)  # the budget is back once the disk caught up
    big: list[bool] = []
    with box._write_lock:
        box.put("t/unbounded", b"x" * 400)  # an answer to QoS 1: the broker's window bounds it
    assert box.flush(10)
    box.put("t/big", b"x" * 20_000, bounded=True, on_durable=big.append)  # alone: taken
    assert box.flush(10)
    assert big == [True]
    assert box.stats().depth == 24
    box.close()
