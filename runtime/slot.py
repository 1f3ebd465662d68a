"""Hot swap: a slot holds the active model and switches it atomically.

Whoever reads `current` keeps a reference to that model for the whole request, so a request in
flight finishes on the model it started on even after a swap; the old session is freed only
when the last such request lets go of it. Nothing is dropped and no lock is held while running.
"""

from __future__ import annotations

import threading

from runtime.errors import EdgefleetError
from runtime.model import Model


class EmptySlotError(EdgefleetError):
    """No model is active in this slot yet."""


class ModelSlot:
    """The active model for one route (a stream or a model name), swappable at any time."""

    def __init__(self, model: Model | None = None) -> None:
        self._model = model
        self._lock = threading.Lock()
        self.generation = 0 if model is None else 1

    @property
    def current(self) -> Model:
        model = self._model  # one reference read: atomic under the GIL and free-threading alike
        if model is None:
            raise EmptySlotError("no model is active")
        return model

    @property
    def empty(self) -> bool:
        return self._model is None

    def swap(self, new: Model) -> Model | None:
        """Make `new` active for every request that starts from now on; return the previous one."""
        with self._lock:
            old, self._model = self._model, new
            self.generation += 1
        return old
