"""The calibration rig of the simulated machine: it places the gray card, the
target and the reference stones itself, and drops valve test stones.

Its faults are the machine's (`sim.faults`); its baseline is what the same
machine measures when healthy -- the "factory" calibration a real sorter
stores when it is set up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from sorterd.calibration.checklist import Baseline, centre_mean
from sorterd.config import Config
from sorterd.domain import CLARITIES, COLORS, LIGHT_MODES
from sorterd.sim.appearance import make_stone_look
from sorterd.sim.machine import SimMachine
from sorterd.sim.parts.camera import sim_camera
from sorterd.sim.render import render_frame
from sorterd.sim.stones import Appearance, StoneSpec
from sorterd.sim.world import World
from sorterd.sorting.eject import plan_pulse
from sorterd.sorting.track import Track

KIT_SIZE = 20
KIT_SEED = 777
TARGET_MM = 4.0
TEST_STONE_MM = 3.0
TEST_SPEED = 400.0


class SimRig:
    needs_operator = False  # the simulated machine places its own card, target and stones
    instant_warmup = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.machine = SimMachine(cfg)
        healthy = dataclasses.replace(cfg, sim=dataclasses.replace(cfg.sim, faults={}))
        self.healthy = SimMachine(healthy)
        self._refs: dict[str, np.ndarray] | None = None

    def warm_up(self, seconds: float, tick: Callable[[float], None]) -> None:
        tick(1.0)  # simulated LEDs are at temperature at once

    def reference_frames(self) -> dict[str, np.ndarray]:
        if self._refs is None:
            self._refs = {m: self.machine.render_reference(m) for m in LIGHT_MODES}
        return self._refs

    def gray_card(self) -> np.ndarray:
        # The channel walls are the 18 % gray reference (§2.3); the card is the same gray.
        return self.reference_frames()["toplit"]

    def target(self) -> tuple[np.ndarray, np.ndarray, float]:
        """An opaque disc of TARGET_MM on the backlight (a dot on a calibration slide)."""
        angles = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        outline = np.stack([np.cos(angles), np.sin(angles)], axis=1) * TARGET_MM / 2
        look = Appearance(hue_deg=0.0, sat=0.0, val=0.05, transmission=0.0, texture=0.0)
        disc = StoneSpec(-1, "inky", "opaque", outline, TARGET_MM, TARGET_MM, look, 0.0, 0, 0.0)
        w_mm, h_mm = self.machine.world.view_mm
        image = render_frame("backlit", [(disc, w_mm / 2, h_mm / 2)], self.machine.optics, np.random.default_rng(1))
        return image, self.reference_frames()["backlit"], TARGET_MM

    def reference_stones(self) -> list[tuple[np.ndarray, np.ndarray, str, str]]:
        """The kit: known stones of every class, each imaged alone; labels as written on the box."""
        rng = np.random.default_rng(KIT_SEED)
        wrong = round(self.machine.faults.get("reference_mislabel", 0.0) * KIT_SIZE)
        dx = TEST_SPEED * self.cfg.lights.pair_interval_ms / 1e3
        w_mm, h_mm = self.machine.world.view_mm
        # 12 mm into the view; in a view too narrow for that (an 800x800 ROI at 70 px/mm is
        # 11.4 mm wide) both exposures centred in it.
        x = min(12.0, (w_mm - dx) / 2)
        kit = []
        for i in range(KIT_SIZE):
            color, clarity = COLORS[i % 3], CLARITIES[(i // 3) % 3]
            outline, size, length, look = make_stone_look(color, clarity, float(rng.uniform(2.0, 4.5)), rng)
            s = StoneSpec(10_000 + i, color, clarity, outline, size, length, look, TEST_SPEED, 0, h_mm / 2)
            b = render_frame("backlit", [(s, x, h_mm / 2)], self.machine.optics, rng)
            t = render_frame("toplit", [(s, x + dx, h_mm / 2)], self.machine.optics, rng)
            if i < wrong:  # the label on the box is not what the stone is
                color = COLORS[(COLORS.index(color) + 1) % 3]
            kit.append((b, t, color, clarity))
        return kit

    def valve_hit(self, bin_name: str, latency_ms: float, offset_ms: float) -> bool:
        """Drop one test stone and fire the planned pulse `offset_ms` late: was it deflected?"""
        world = World(dataclasses.replace(self.machine.world.sim, valve_jitter_ms=0.0, fall_jitter=0.0),
                      self.cfg.geometry, sim_camera(self.cfg.camera), dict(self.cfg.ejection.opening_latency_ms))
        outline, size, length, look = make_stone_look("blue", "opaque", TEST_STONE_MM, np.random.default_rng(5))
        stone = StoneSpec(0, "blue", "opaque", outline, size, length, look, TEST_SPEED, 0, 4.0)
        world.stones = [stone]
        world.fall_scale = {0: 1.0}
        ej = dataclasses.replace(self.cfg.ejection, opening_latency_ms={**self.cfg.ejection.opening_latency_ms,
                                                                         bin_name: latency_ms})
        pulse = plan_pulse(Track("test", 0, 0.0, TEST_SPEED, length), bin_name, self.cfg.geometry, ej)
        shift = int(offset_ms * 1e6)
        world.open_jet(bin_name, pulse.start_ns + shift, pulse.end_ns + shift)
        return world.landing(stone).bin == bin_name

    def baseline(self) -> Baseline:
        refs = {m: self.healthy.render_reference(m) for m in LIGHT_MODES}
        return Baseline(float(centre_mean(refs["backlit"]).mean()),
                        [float(v) for v in centre_mean(refs["toplit"])], float(self.cfg.camera.pixels_per_mm))
