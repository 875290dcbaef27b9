"""The simulated machine: the world plus its optics, shared by the sim backends."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sorterd.config import Config
from sorterd.sim.render import Optics, render_frame, render_reference
from sorterd.sim.world import World


class SimMachine:
    def __init__(self, cfg: Config) -> None:
        faults = cfg.sim.faults
        # The machine's true scale; the camera still reports the configured one
        # (a scale fault is what calibration must catch).
        cam = replace(cfg.camera, pixels_per_mm=cfg.camera.pixels_per_mm * (1.0 + faults.get("scale", 0.0)))
        self.world = World(cfg.sim, cfg.geometry, cam, dict(cfg.ejection.opening_latency_ms))
        self.optics = Optics(
            width_px=cam.width_px, height_px=cam.height_px, px_per_mm=cam.pixels_per_mm,
            noise_sigma=cam.noise_sigma,
            backlight_level=min(255.0, 225.0 * (1.0 + faults.get("backlight", 0.0))),
            ring_gain=1.0 + faults.get("ring_light", 0.0),
        )
        self.seed = cfg.sim.seed
        self.faults: dict[str, float] = dict(cfg.sim.faults)

    def _rng(self, t_ns: int, mode: str) -> np.random.Generator:
        # One generator per frame: frames render concurrently in worker threads,
        # and a frame's noise is reproducible from the seed and its instant.
        return np.random.default_rng([self.seed, t_ns & 0x7FFFFFFFFFFFFFFF, 0 if mode == "backlit" else 1])

    def render(self, mode: str, t_ns: int) -> np.ndarray:
        return render_frame(mode, self.world.placed_at(t_ns), self.optics, self._rng(t_ns, mode))

    def render_reference(self, mode: str, frames: int = 8) -> np.ndarray:
        """The empty channel, averaged over several frames as calibration does."""
        stack = [render_reference(mode, self.optics, self._rng(i, mode)) for i in range(frames)]
        return np.mean(stack, axis=0).round().astype(np.uint8)
