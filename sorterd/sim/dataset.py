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
from sorterd.segment import Observation, PairingLimits, crop_pair, segment_pair
from sorterd.sim.machine import SimMachine
from sorterd.sim.stones import CLARITIES, COLORS, StoneSpec


@dataclass(frozen=True)
class Capture:
    backlit: np.ndarray
    toplit: np.ndarray
    t_edge_ns: int  # the beam edge that triggered the pair
    t_backlit_ns: int
    t_toplit_ns: int
    found: list[tuple[Observation, StoneSpec]]  # single stones matched to the truth


def captures(cfg: Config, n_stones: int, seed: int) -> Iterator[tuple[SimMachine, Capture]]:
    """One capture per beam edge; every stone appears in (usually) one capture."""
    from dataclasses import replace

    machine = SimMachine(replace(cfg, sim=replace(cfg.sim, seed=seed)))
    machine.world.feed(n_stones, 0)
    refs = {m: machine.render_reference(m) for m in ("backlit", "toplit")}
    for cap in machine_captures(machine, cfg, refs):
        yield machine, cap


def machine_captures(machine: SimMachine, cfg: Config, refs: dict[str, np.ndarray]) -> Iterator[Capture]:
    """One frame pair per beam edge of the stones already fed to `machine`, as the machine
    triggers, segmented against the empty-channel references `refs` by the daemon's own
    segmentation; each single stone is in `found` of the first pair that sees it."""
    cam = cfg.camera
    dt = int(cfg.lights.pair_interval_ms * 1e6)
    lim = PairingLimits.from_config(cfg, cam.pixels_per_mm, cfg.lights.pair_interval_ms)
    seen: set[int] = set()
    for t_edge, _ in machine.world.beam_times(cfg.trigger.beam_x_mm):
        t0 = t_edge + int(cfg.trigger.latency_ms * 1e6)
        back, top = machine.render("backlit", t0), machine.render("toplit", t0 + dt)
        seg = segment_pair(back, top, refs["backlit"], refs["toplit"], t0 + dt, lim)
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


@dataclass
class LabelledCrops:
    x: np.ndarray  # N x H x W x 6 uint8 (backlit RGB, toplit RGB)
    color: np.ndarray  # N int64, index into COLORS
    clarity: np.ndarray  # N int64, index into CLARITIES
    size_mm: np.ndarray


def labelled_crops(cfg: Config, n_stones: int, seed: int, crop_mm: float, size: int) -> LabelledCrops:
    crop_px = int(round(crop_mm * cfg.camera.pixels_per_mm))
    xs, colors, clarities, sizes = [], [], [], []
    for _, cap in captures(cfg, n_stones, seed):
        for obs, stone in cap.found:
            xs.append(crop_pair(cap.backlit, cap.toplit, obs, crop_px, size))
            colors.append(COLORS.index(stone.color))
            clarities.append(CLARITIES.index(stone.clarity))
            sizes.append(stone.size_mm)
    return LabelledCrops(np.stack(xs), np.array(colors, np.int64), np.array(clarities, np.int64),
                         np.array(sizes, np.float64))
