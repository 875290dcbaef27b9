"""Simulated break-beam: one edge each time the beam is interrupted."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from sorterd.clock import Clock
from sorterd.config import SimTriggerConfig
from sorterd.parts.trigger import TriggerEvent
from sorterd.sim.machine import SimMachine


class SimTrigger:
    def __init__(self, cfg: SimTriggerConfig, machine: SimMachine, clock: Clock) -> None:
        self.clock = clock
        self.latency_ns = int(cfg.latency_ms * 1e6)
        self.beam_x_mm = cfg.beam_x_mm
        self.machine = machine
        self._edges: Iterator[int] | None = None

    async def next(self) -> TriggerEvent | None:
        if self._edges is None:  # the world is fed just before the run starts
            self._edges = iter(t_on for t_on, _ in self.machine.world.beam_times(self.beam_x_mm))
        t = next(self._edges, None)
        if t is None:
            return None
        # The host learns of the edge after the sensor latency; the event carries the edge time.
        await self.clock.sleep_until(t + self.latency_ns)
        return TriggerEvent(t)

    def set_reference(self, backlit: np.ndarray) -> None:
        """A simulated beam does not look at frames: nothing to do."""

    def close(self) -> None:
        pass
