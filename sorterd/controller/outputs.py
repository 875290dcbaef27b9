"""What the controller link and the GPIO output thread share: the output command
(`Pulse`), its reported outcome, the timing statistics, and the registry that turns
every open output off at interpreter exit.  Valves and strobe lights are both
outputs of this kind (Klipper: one MCU serves every pin)."""


from __future__ import annotations

import atexit
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

from sorterd.quantiles import Samples


@dataclass(frozen=True)
class Pulse:
    """A valve command: open `valve` over [start_ns, end_ns) (host time)."""

    valve: str
    start_ns: int
    end_ns: int
    stone_id: str

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


# Fire-time error histogram buckets (seconds of |actual - intended|): a valve
# edge matters at the 0.1 ms scale, a stone at the 1 ms scale.
FIRE_ERROR_BUCKETS_S = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2)


@dataclass(frozen=True)
class PulseOutcome:
    pulse: Pulse
    fired: bool
    actual_on_ns: int | None  # device-reported drive edges of the valve (host time); the air lags them
    actual_off_ns: int | None
    status: str  # "fired", "refused: ...", "cancelled", "unknown: ..."


class ClockTruth(Protocol):
    """The true relation of a controller's clock to host time, known from outside the link.

    A backend is handed one by the composition root (the simulated machine
    knows it: it started the controller with that offset and drift) and uses
    it to measure its own errors, never to schedule.  Without one, the
    truth-side figures (ValveStats.sync_error_ns, true_fire_error_ns) stay empty.
    """

    def host_to_mcu(self, t_ns: int) -> int: ...

    def mcu_to_host(self, clock: int) -> int: ...


@dataclass
class ErrorHistogram:
    """Cumulative |error| histogram in seconds, for a Prometheus collector."""

    buckets: tuple[float, ...] = FIRE_ERROR_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * len(FIRE_ERROR_BUCKETS_S))
    count: int = 0
    sum_s: float = 0.0

    def observe(self, error_ns: int) -> None:
        err = abs(error_ns) * 1e-9
        self.count += 1
        self.sum_s += err
        for i, le in enumerate(self.buckets):
            if err <= le:
                self.counts[i] += 1


@dataclass
class ValveStats:
    """Timing and fault figures of a valve backend.  Owned by the thread that
    updates it (the event loop's); readers take a snapshot via stats()."""

    backend: str
    state: str = "ready"
    refusals: dict[str, int] = field(default_factory=dict)  # reason -> count
    watchdog_trips: int = 0
    reconnects: int = 0
    # Intended vs actual edge as the host sees it (device stamps converted with
    # the host's clock estimate): what a real deployment can measure.
    # Every series is bounded (exact up to a cap, then a histogram: sorterd/quantiles.py).
    fire_error_ns: Samples = field(default_factory=lambda: Samples(floor=1.0))
    fire_hist: ErrorHistogram = field(default_factory=ErrorHistogram)
    # Against the simulator's truth (sim only): the host's estimate of the
    # controller clock at each start vs the true clock then, and each edge's
    # actual time (true relation) vs the intended instant.  A host-side backend
    # (gpio) stamps edges on the host clock itself: its fire_error_ns is the truth.
    sync_error_ns: Samples = field(default_factory=lambda: Samples(floor=1.0))
    true_fire_error_ns: Samples = field(default_factory=lambda: Samples(floor=1.0))
    clock_offset_ns: float | None = None  # last sync sample vs the fitted line
    clock_rtt_ns: int | None = None
    clock_drift_ppm: float | None = None

    def refuse(self, kind: str, detail: str = "") -> str:
        """Count a refusal under a fixed kind (a metric label); returns the status text,
        which may say more."""
        self.refusals[kind] = self.refusals.get(kind, 0) + 1
        return f"refused: {kind}" + (f" ({detail})" if detail else "")

    @property
    def late_at_fire(self) -> int:
        """Pulses refused because the timer woke past the late limit (a controller's or the thread's)."""
        return sum(n for kind, n in self.refusals.items() if kind.endswith("late at fire"))

    def true_fire_errors(self) -> Samples:
        return self.true_fire_error_ns or self.fire_error_ns

    def fired(self, intended_ns: int, actual_ns: int) -> None:
        self.fire_error_ns.append(actual_ns - intended_ns)
        self.fire_hist.observe(actual_ns - intended_ns)


# -- outputs off on every exit path -------------------------------------------------

_OPEN: weakref.WeakSet[Any] = weakref.WeakSet()


def close_at_exit(backend: Any) -> None:
    """Register an open hardware backend: an exit that skips its close() (an exception
    in main, sys.exit) still closes it, so lines go off and a controller is told to."""
    _OPEN.add(backend)


def closed(backend: Any) -> None:
    """The backend closed itself: nothing left to do at exit."""
    _OPEN.discard(backend)


@atexit.register
def _close_all_at_exit() -> None:
    for backend in list(_OPEN):
        try:
            backend.close()
        except Exception:  # noqa: BLE001 -- at exit, try every one
            pass
