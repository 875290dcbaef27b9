"""The simulated machine: the world plus its optics, shared by the sim backends.

Beyond the backends, `sorterd run` drives it only through its run seam (feed,
start_at, stop_feed, fed_by, all_past_ns, last_landing_ns, open_jet, truth): the world's
internals stay in sorterd.sim.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from sorterd.config import Config, SimConfig
from sorterd.domain import JET_BINS
from sorterd.sim.parts.camera import sim_camera
from sorterd.sim.render import Optics, render_frame, render_reference
from sorterd.sim.stones import StoneSpec
from sorterd.sim.truth import SimTruth
from sorterd.sim.world import World

log = logging.getLogger(__name__)


class SimMachine:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        faults = cfg.sim.faults
        # The machine's true scale; the camera still reports the configured one
        # (a scale fault is what calibration must catch).
        configured = sim_camera(cfg.camera)
        cam = replace(configured, pixels_per_mm=configured.pixels_per_mm * (1.0 + faults.get("scale", 0.0)))
        self.world = World(true_valves(cfg), cfg.geometry, cam, dict(cfg.ejection.opening_latency_ms))
        self.optics = Optics(
            width_px=cam.width_px, height_px=cam.height_px, px_per_mm=cam.pixels_per_mm,
            noise_sigma=cam.noise_sigma,
            backlight_level=min(255.0, 225.0 * (1.0 + faults.get("backlight", 0.0))),
            ring_gain=1.0 + faults.get("ring_light", 0.0),
            wb_gains=wb_drift_gains(faults.get("wb_delta_e", 0.0)),
        )
        self.seed = cfg.sim.seed
        self.faults: dict[str, float] = dict(cfg.sim.faults)
        self._all_past_ns: int | None = None
        self._all_past_of: list[StoneSpec] | None = None  # the feed it was computed for

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

    # -- the run seam ---------------------------------------------------------

    def feed(self, n: int) -> None:
        """Put n stones on the feeder (relative to 0: generating them takes real time)."""
        self.world.feed(n, 0)
        warning = self.world.feed_report()["warning"]
        if warning:
            log.warning("%s", warning)

    def start_at(self, t_ns: int) -> None:
        """The fed stones start arriving at t_ns."""
        self.world.start_at(t_ns)

    def stop_feed(self, t_ns: int) -> int:
        """Stop the feeder at t_ns (a stop of the run): stones not yet in view are never fed.
        Returns the stones fed; the truth, the trigger and the run's end count only those."""
        return self.world.stop_feed(t_ns)

    def fed_by(self, t_ns: int) -> int:
        """How many stones have entered the view by t_ns (the progress line)."""
        return sum(1 for s in self.world.stones if s.t_entry_ns <= t_ns)

    def all_past_ns(self) -> int:
        """When the last fed stone has left the view (the run's end, for the vision trigger).
        Cached until the feed changes: the vision trigger asks at every preview."""
        if self._all_past_ns is None or self._all_past_of is not self.world.stones:
            spans = self.world.beam_times(self.world.view_mm[0])
            self._all_past_ns = max((clear for _, clear in spans), default=0) + 100_000_000
            self._all_past_of = self.world.stones
        return self._all_past_ns

    def last_landing_ns(self) -> int:
        """When the last fed stone has fallen into its bin."""
        return self.world.last_landing_ns()

    def open_jet(self, valve: str, on_ns: int, off_ns: int) -> None:
        """A valve line was driven over [on, off): the jet opens (a GPIO backend's edge observer)."""
        self.world.open_jet(valve, on_ns, off_ns)

    def truth(self, db_path: Path | None = None) -> SimTruth:
        """What the world knows of the run, for the summary's truth section, against the
        records in db_path (the batch's stones.db; None: no stone was recorded)."""
        return SimTruth.from_batch(self.cfg, self.world, db_path)


def true_valves(cfg: Config) -> SimConfig:
    """The sim config with the valves' true latencies (configured + injected slowness)."""
    latency = {b: cfg.sim.valve_latency_ms.get(b, cfg.ejection.opening_latency_ms[b])
               + cfg.sim.faults.get(f"{b.lower()}_valve_slow_ms", 0.0) for b in JET_BINS}
    return replace(cfg.sim, valve_latency_ms=latency)


def wb_drift_gains(delta_e: float, gray: float = 118.0) -> tuple[float, float, float]:
    """(B, G, R) gains, bluer and less red, that move the 18 % gray by delta_e (CIE76)."""
    if delta_e <= 0:
        return (1.0, 1.0, 1.0)

    def de(k: float) -> float:
        a = np.array([[[gray, gray, gray]]], np.float32) / 255.0
        b = np.array([[[gray * (1 + k), gray, gray * (1 - k)]]], np.float32) / 255.0
        la, lb = cv2.cvtColor(a, cv2.COLOR_BGR2Lab), cv2.cvtColor(b, cv2.COLOR_BGR2Lab)
        return float(np.linalg.norm(la - lb))

    lo, hi = 0.0, 0.9
    for _ in range(40):  # bisection: dE grows monotonically with k here
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if de(mid) < delta_e else (lo, mid)
    k = (lo + hi) / 2
    return (1.0 + k, 1.0, 1.0 - k)
