"""A bounded FIFO that counts bytes as well as items, for every queue between the network and
a worker.

A count alone bounds nothing on a box with a few hundred MB: 1,024 messages of 1 MiB each is a
gigabyte. Each queue here has both bounds; a put past either is refused at once (the caller
answers the message as overloaded), never blocked, because the putter is paho's network thread.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BudgetFull(queue.Full):
    """The queue holds `maxsize` items or `max_bytes` bytes: the message says which."""


class ByteBudgetQueue(Generic[T]):
    """queue.Queue's put_nowait/get/get_nowait/qsize/empty, bounded in items and in bytes.

    `size_of(item)` is what an item costs; `None` (a wake-up for the consumer) costs nothing and
    is never refused.
    """

    def __init__(self, maxsize: int, max_bytes: int, size_of: Callable[[T], int]) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._items: deque[tuple[T | None, int]] = deque()
        self._bytes = 0
        self._ready = threading.Condition(threading.Lock())

    def put_nowait(self, item: T | None) -> None:
        size = 0 if item is None else self._size_of(item)
        with self._ready:
            if item is not None:
                if len(self._items) >= self.maxsize:
                    raise BudgetFull(f"{len(self._items)} messages waiting (the limit)")
                if self._bytes + size > self.max_bytes:
                    raise BudgetFull(f"{self._bytes} bytes waiting; {size} more would pass the "
                                     f"{self.max_bytes}-byte budget")
            self._items.append((item, size))
            self._bytes += size
            self._ready.notify()

    put = put_nowait  # never blocks: a full queue refuses

    def get(self, timeout: float | None = None) -> T | None:
        with self._ready:
            if not self._items and not self._ready.wait_for(lambda: bool(self._items), timeout):
                raise queue.Empty
            return self._pop()

    def get_nowait(self) -> T | None:
        with self._ready:
            if not self._items:
                raise queue.Empty
            return self._pop()

    def _pop(self) -> T | None:  # under the lock
        item, size = self._items.popleft()
        self._bytes -= size
        return item

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    @property
    def bytes(self) -> int:
        return self._bytes
