"""The live model, replaced atomically between two frame pairs (DESIGN §4, §4a "swap between two
frame pairs"; issue 12 item 5).

One mechanism for every swap the sorter makes: `LiveRef` is a reference that a reader reads
*once* per unit of work (a frame pair's batch) and a writer replaces whole under a lock.  The
TensorRT backend keeps its live engine in one (`tensorrt.py`: onnxruntime until the engine is
ready, then the engine, back on a run-time failure); `LiveModel` keeps the live release in one
(the release watcher, `sorterd/release/swap.py`, swaps a verified, QA-passed release in).  A
reader holding the old reference finishes its batch on the old model; no pair is classified by
a half-loaded one, because a model is only published once it is wholly open and checked.

A replaced model is closed (`Model.close`: its session, a TensorRT engine and its thread) only
once no pair uses it: the pipeline classifies inside `LiveModel.using()`, which counts the pairs
on each model, and `LiveModel.retire(old, closer)` closes `old` at once when none is on it, or
when the last such pair finishes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

from sorterd.parts.inference import Model, Prediction

if TYPE_CHECKING:
    from sorterd.data.bundle import Manifest

T = TypeVar("T")


class LiveRef(Generic[T]):
    """A reference read once per unit of work and replaced whole (one lock for the writers)."""

    def __init__(self, value: T) -> None:
        self._value = value
        self._lock = threading.Lock()

    def get(self) -> T:
        """The current value (a plain attribute read: atomic under the GIL, never blocks a reader)."""
        return self._value

    def swap(self, new: T) -> T:
        """Publish `new`; the previous value is returned (readers holding it finish on it)."""
        with self._lock:
            old, self._value = self._value, new
        return old

    def replace_if(self, expected: T, new: T) -> bool:
        """Publish `new` only if `expected` is still current (of two workers failing, one acts)."""
        with self._lock:
            if self._value is not expected:
                return False
            self._value = new
        return True


class LiveModel:
    """A `Model` whose model can be swapped between two frame pairs.

    The pipeline calls `current()` once per pair and classifies, decides and records that pair
    with the model it got (its version is what the pair's stone rows record); `predict*` here
    delegate to one snapshot too (calibration, evaluation)."""

    def __init__(self, model: Model) -> None:
        self._ref: LiveRef[Model] = LiveRef(model)
        self.swaps = 0
        self._lock = threading.Lock()
        self._users: dict[int, int] = {}  # id(model) -> pairs being classified on it
        self._retired: dict[int, tuple[Model, Callable[[Model], None]]] = {}  # closed when their last pair ends

    def current(self) -> Model:
        return self._ref.get()

    @contextmanager
    def using(self) -> Iterator[Model]:
        """The current model, for one pair: it is not closed while the pair is on it."""
        with self._lock:
            model = self._ref.get()
            self._users[id(model)] = self._users.get(id(model), 0) + 1
        try:
            yield model
        finally:
            with self._lock:
                left = self._users.pop(id(model)) - 1
                if left:
                    self._users[id(model)] = left
                retired = self._retired.pop(id(model), None) if not left else None
            if retired is not None:
                retired[1](retired[0])

    def retire(self, old: Model, closer: Callable[[Model], None]) -> bool:
        """Close `old` with `closer` once no pair uses it (now when none does; True then).  The live
        model is never retired (False, nothing closed)."""
        with self._lock:
            if old is self._ref.get():
                return False
            if self._users.get(id(old)):
                self._retired[id(old)] = (old, closer)
                return False
        closer(old)
        return True

    def in_use(self, model: Model) -> int:
        """Pairs being classified on `model` now."""
        with self._lock:
            return self._users.get(id(model), 0)

    def swap(self, new: Model) -> Model:
        """`new` classifies the next pair; returns the model it replaced."""
        old = self._ref.swap(new)
        self.swaps += 1
        return old

    @property
    def manifest(self) -> Manifest:
        return self._ref.get().manifest

    @property
    def version(self) -> str:
        return self._ref.get().version

    @property
    def backend(self) -> str:
        return self._ref.get().backend

    def predict(self, crops_hwc: np.ndarray) -> tuple[list[Prediction], float]:
        return self._ref.get().predict(crops_hwc)

    def predict_halves(self, halves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[Prediction], float]:
        return self._ref.get().predict_halves(halves)

    def close(self) -> None:
        """Close the live model (the end of a run; a replaced one is closed by whoever swapped it out)."""
        self._ref.get().close()
