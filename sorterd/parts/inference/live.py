"""The live model, replaced atomically between two frame pairs (DESIGN §4, §4a "swap between two
frame pairs"; issue 12 item 5).

One mechanism for every swap the sorter makes: `LiveRef` is a reference that a reader reads
*once* per unit of work (a frame pair's batch) and a writer replaces whole under a lock.  The
TensorRT backend keeps its live engine in one (`tensorrt.py`: onnxruntime until the engine is
ready, then the engine, back on a run-time failure); `LiveModel` keeps the live release in one
(the release watcher, `sorterd/release/swap.py`, swaps a verified, QA-passed release in).  A
reader holding the old reference finishes its batch on the old model; no pair is classified by
a half-loaded one, because a model is only published once it is wholly open and checked.
"""

from __future__ import annotations

import threading
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

    def current(self) -> Model:
        return self._ref.get()

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
