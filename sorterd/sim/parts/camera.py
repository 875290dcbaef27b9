"""The simulated camera: renders the world at each exposure instant."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sorterd.clock import Clock
from sorterd.configfile import opt
from sorterd.domain import LIGHT_MODES
from sorterd.parts.camera import CameraError, CameraOptions, Frame
from sorterd.parts.registry import Backend, Opening

if TYPE_CHECKING:
    from sorterd.sim.machine import SimMachine


@dataclass(frozen=True)
class SimCameraConfig(CameraOptions):
    type: str = opt("sim", "Backend: sim renders the simulated machine's frames.", choices=("sim",))
    width_px: int = opt(640, "Frame width (along the channel).", minval=64, maxval=8192)
    height_px: int = opt(240, "Frame height (across the channel).", minval=32, maxval=8192)
    pixels_per_mm: float = opt(20.0, "Image scale (from calibration).", minval=2.0, maxval=500.0)
    noise_sigma: float = opt(2.0, "Sensor noise in DN.", minval=0.0, maxval=50.0)

    @property
    def wall_clock(self) -> bool:
        return False


class SimCamera:
    def __init__(self, cfg: SimCameraConfig, machine: SimMachine, clock: Clock) -> None:
        self.cfg = cfg
        self.machine = machine
        self.clock = clock
        self.pixels_per_mm = cfg.pixels_per_mm
        self.prelit = False
        self.exposure_at_strobe = True  # rendered at exactly the instant asked, under its strobe
        self.pair_interval_ms: float | None = None
        self.lock = asyncio.Lock()
        self._refs = {m: machine.render_reference(m) for m in LIGHT_MODES}
        faults = machine.faults
        self._down_from_s = faults.get("camera_drop_at_s")
        self._down_for_s = faults.get("camera_down_s", 1.0)
        self._t_start = clock.now_ns()
        self.reopens = 0

    def _unplugged(self) -> bool:
        """The injected camera loss: gone over [drop_at, drop_at + down) of the run."""
        if self._down_from_s is None:
            return False
        t = (self.clock.now_ns() - self._t_start) / 1e9
        return self._down_from_s <= t < self._down_from_s + self._down_for_s

    def reopen(self) -> None:
        self.reopens += 1
        if self._unplugged():
            raise CameraError("simulated camera still disconnected")

    def reference(self, mode: str) -> np.ndarray:
        return self._refs[mode]

    async def grab(self, mode: str, t_ns: int) -> Frame:
        await self.clock.sleep_until(t_ns)
        if self._unplugged():
            raise CameraError("simulated camera disconnected")
        # Rendering stands in for sensor readout: a worker thread, not the loop.
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(None, self.machine.render, mode, t_ns)
        return Frame(image, t_ns, mode)

    def close(self) -> None:
        pass


def sim_camera(options: CameraOptions) -> SimCameraConfig:
    """The simulated machine renders its frames itself: it needs `[camera] type = "sim"`."""
    if not isinstance(options, SimCameraConfig):
        raise ValueError(f"the simulated machine renders its own frames: it needs camera.type = 'sim', "
                         f"not {options.type!r}")
    return options


def _open(cfg: SimCameraConfig, opening: Opening) -> SimCamera:
    return SimCamera(cfg, opening.machine, opening.clock)


BACKEND = Backend("camera", "sim", SimCameraConfig, _open)
