"""Labelled stones from the simulator, cut exactly as the daemon cuts them.

Stones are fed through the simulated channel, each beam edge yields a frame
pair, the daemon's own segmentation finds the objects, and every single
(non-cluster) object is matched to the world's ground truth.  The crops are
therefore what the model will see in production, not idealised renders.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sorterd.config import Config
from sorterd.sim.machine import SimMachine
from sorterd.sim.parts.trigger import sim_trigger
from sorterd.sim.stones import StoneSpec
from sorterd.sorting.segment import Observation, PairingLimits, segment_pair


@dataclass(frozen=True)
class Capture:
    backlit: np.ndarray
    toplit: np.ndarray
    t_edge_ns: int  # the beam edge that triggered the pair
    t_backlit_ns: int
    t_toplit_ns: int
    found: list[tuple[Observation, StoneSpec]]  # single stones matched to the truth


def machine_captures(machine: SimMachine, cfg: Config, refs: dict[str, np.ndarray]) -> Iterator[Capture]:
    """One frame pair per beam edge of the stones already fed to `machine`, as the machine
    triggers, segmented against the empty-channel references `refs` by the daemon's own
    segmentation; each single stone is in `found` of the first pair that sees it."""
    cam = cfg.camera
    dt = int(cfg.lights.pair_interval_ms * 1e6)
    lim = PairingLimits.from_config(cfg, cam.pixels_per_mm, cfg.lights.pair_interval_ms)
    seen: set[int] = set()
    trigger = sim_trigger(cfg.trigger)
    for t_edge, _ in machine.world.beam_times(trigger.beam_x_mm):
        t0 = t_edge + int(trigger.latency_ms * 1e6)
        back, top = machine.render("backlit", t0), machine.render("toplit", t0 + dt)
        # Speed from the pair's own exposure instants, as the sorter and a replay measure it.
        seg = segment_pair(back, top, refs["backlit"], refs["toplit"], t0 + dt, lim, t_backlit_ns=t0)
        found = []
        for obs in seg.observations:
            stone = _truth(machine, obs)
            if stone is not None and not obs.cluster and stone.sim_id not in seen:
                seen.add(stone.sim_id)
                found.append((obs, stone))
        yield Capture(back, top, t_edge, t0, t0 + dt, found)


def _truth(machine: SimMachine, obs: Observation) -> StoneSpec | None:
    """The fed stone whose centroid is within 1 mm of the observation."""
    best, best_d = None, 1.0
    for s, x, y in machine.world.placed_at(obs.t_ns):
        d = abs(x - obs.x_mm) + abs(y - obs.y_mm)
        if d < best_d:
            best, best_d = s, d
    return best
