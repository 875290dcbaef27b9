"""Simulated break-beam: one edge each time the beam is interrupted."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sorterd.clock import Clock
from sorterd.configfile import opt
from sorterd.parts.registry import Backend, Opening
from sorterd.parts.trigger import TriggerEvent, TriggerOptions

if TYPE_CHECKING:
    from sorterd.sim.machine import SimMachine
    from sorterd.sim.stones import StoneSpec


@dataclass(frozen=True)
class SimTriggerConfig(TriggerOptions):
    type: str = opt("sim", "Backend: sim (a simulated break-beam at beam_x_mm).", choices=("sim",))
    beam_x_mm: float = opt(10.0, "Where the beam crosses the channel, from the view's left edge (a whole stone must be in view when its front breaks the beam).", minval=0.0)
    latency_ms: float = opt(0.3, "Sensor-to-host latency of the trigger edge.", minval=0.0, maxval=20.0)

    @property
    def front_mm(self) -> float | None:
        return self.beam_x_mm

    @property
    def wall_clock(self) -> bool:
        return False


class SimTrigger:
    def __init__(self, cfg: SimTriggerConfig, machine: SimMachine, clock: Clock) -> None:
        self.clock = clock
        self.latency_ns = int(cfg.latency_ms * 1e6)
        self.beam_x_mm = cfg.beam_x_mm
        self.machine = machine
        self._edges: deque[int] = deque()
        self._feed: list[StoneSpec] | None = None  # the world's feed the edges were computed from
        self._last_ns = -1  # the last edge returned

    async def next(self) -> TriggerEvent | None:
        while (t := self._next_edge()) is not None:
            # The host learns of the edge after the sensor latency; the event carries the edge time.
            await self.clock.sleep_until(t + self.latency_ns)
            if self._next_edge() == t:  # not a stone the feeder kept back meanwhile (a stop)
                self._edges.popleft()
                self._last_ns = t
                return TriggerEvent(t)
        return None

    def _next_edge(self) -> int | None:
        """The next beam edge of the stones fed; recomputed when the feed changes (fed just
        before the run starts, shortened when the feeder stops)."""
        stones = self.machine.world.stones
        if stones is not self._feed:
            self._feed = stones
            self._edges = deque(t_on for t_on, _ in self.machine.world.beam_times(self.beam_x_mm)
                                if t_on > self._last_ns)
        return self._edges[0] if self._edges else None

    def set_reference(self, backlit: np.ndarray) -> None:
        """A simulated beam does not look at frames: nothing to do."""

    def close(self) -> None:
        pass


def sim_trigger(options: TriggerOptions) -> SimTriggerConfig:
    """Simulated captures follow the simulated beam: `[trigger] type = "sim"`."""
    if not isinstance(options, SimTriggerConfig):
        raise ValueError(f"simulated captures follow the simulated beam: they need trigger.type = 'sim', "
                         f"not {options.type!r}")
    return options


def _open(cfg: SimTriggerConfig, opening: Opening) -> SimTrigger:
    return SimTrigger(cfg, opening.machine, opening.clock)


BACKEND = Backend("trigger", "sim", SimTriggerConfig, _open)
