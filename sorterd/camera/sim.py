"""The simulated camera: renders the world at each exposure instant."""

from __future__ import annotations

import asyncio

import numpy as np

from sorterd.camera import Frame
from sorterd.clock import Clock
from sorterd.config import SimCameraConfig
from sorterd.sim.machine import SimMachine


class SimCamera:
    def __init__(self, cfg: SimCameraConfig, machine: SimMachine, clock: Clock) -> None:
        self.cfg = cfg
        self.machine = machine
        self.clock = clock
        self.pixels_per_mm = cfg.pixels_per_mm
        self._refs = {m: machine.render_reference(m) for m in ("backlit", "toplit")}

    def reference(self, mode: str) -> np.ndarray:
        return self._refs[mode]

    async def grab(self, mode: str, t_ns: int) -> Frame:
        await self.clock.sleep_until(t_ns)
        # Rendering stands in for sensor readout: a worker thread, not the loop.
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(None, self.machine.render, mode, t_ns)
        return Frame(image, t_ns, mode)

    def close(self) -> None:
        pass
