"""Segmentation on rendered frames: every object found, sized, paired, clusters kept apart."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.domain import CLARITIES, COLORS
from sorterd.sim.appearance import make_stone_look
from sorterd.sim.machine import SimMachine
from sorterd.sim.render import render_frame
from sorterd.sim.stones import StoneSpec
from sorterd.sorting.segment import PairingLimits, crop_pair, segment_pair

PPM = 20.0
DT_NS = 10_000_000


@pytest.fixture(scope="module")
def machine() -> SimMachine:
    return SimMachine(load_config(config.sim_config_path()))


@pytest.fixture(scope="module")
def refs(machine: SimMachine) -> dict[str, np.ndarray]:
    return {m: machine.render_reference(m) for m in ("backlit", "toplit")}


LIMITS = PairingLimits(PPM, DT_NS / 1e9, 100.0, 1000.0, 9.6)


def stone(sid: int, color: str, clarity: str, size: float, speed: float, rng: np.random.Generator) -> StoneSpec:
    outline, size, length, look = make_stone_look(color, clarity, size, rng)
    return StoneSpec(sid, color, clarity, outline, size, length, look, speed, 0, 6.0)


def frames(machine: SimMachine, placed_b: list, placed_t: list, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (render_frame("backlit", placed_b, machine.optics, rng),
            render_frame("toplit", placed_t, machine.optics, rng))


@pytest.mark.parametrize("color", COLORS)
@pytest.mark.parametrize("clarity", CLARITIES)
def test_every_class_found_sized_and_timed(machine: SimMachine, refs: dict, color: str, clarity: str) -> None:
    rng = np.random.default_rng(COLORS.index(color) * 3 + CLARITIES.index(clarity))
    for size in (1.0, 2.0, 3.5, 5.0):
        s = stone(1, color, clarity, size, 400.0, rng)
        x0 = 12.0
        b, t = frames(machine, [(s, x0, 6.0)], [(s, x0 + 4.0, 6.0)], int(size * 10))
        seg = segment_pair(b, t, refs["backlit"], refs["toplit"], DT_NS, LIMITS)
        assert len(seg.observations) == 1, (color, clarity, size)
        o = seg.observations[0]
        assert not o.cluster, o.reason
        assert o.size_mm == pytest.approx(s.size_mm, abs=0.25)
        assert o.x_mm == pytest.approx(x0 + 4.0, abs=0.1)
        assert o.speed_mm_s == pytest.approx(400.0, rel=0.02)


def test_several_stones_counted_and_paired_in_order(machine: SimMachine, refs: dict) -> None:
    rng = np.random.default_rng(5)
    stones = [stone(i, COLORS[i % 3], CLARITIES[(i // 3) % 3], 2.0 + i * 0.4, 350.0, rng) for i in range(4)]
    xs = [5.0, 11.0, 17.0, 23.0]
    b, t = frames(machine, [(s, x, 6.0) for s, x in zip(stones, xs, strict=True)],
                  [(s, x + 3.5, 6.0) for s, x in zip(stones, xs, strict=True)], 1)
    seg = segment_pair(b, t, refs["backlit"], refs["toplit"], DT_NS, LIMITS)
    assert [o.x_mm for o in seg.observations] == pytest.approx([x + 3.5 for x in xs], abs=0.1)
    for o, s in zip(seg.observations, stones, strict=True):
        assert o.size_mm == pytest.approx(s.size_mm, abs=0.25)
        assert o.speed_mm_s == pytest.approx(350.0, rel=0.02)


def test_touching_stones_are_one_cluster(machine: SimMachine, refs: dict) -> None:
    rng = np.random.default_rng(9)
    hits = 0
    for trial in range(10):
        a = stone(1, "blue", "transparent", 3.0, 400.0, rng)
        b_ = stone(2, "light", "opaque", 3.0, 400.0, rng)
        # Place b's right edge just overlapping a's left edge.
        gap = float(a.outline_mm[:, 0].min() - b_.outline_mm[:, 0].max()) + 0.15
        xa, xb = 15.0, 15.0 + gap
        b, t = frames(machine, [(a, xa, 6.0), (b_, xb, 6.0)], [(a, xa + 4, 6.0), (b_, xb + 4, 6.0)], trial)
        seg = segment_pair(b, t, refs["backlit"], refs["toplit"], DT_NS, LIMITS)
        assert len(seg.observations) == 1, "touching stones must be one object"
        hits += seg.observations[0].cluster
    assert hits >= 9, f"only {hits}/10 touching pairs recognised as clusters"


def test_close_but_apart_stones_are_two(machine: SimMachine, refs: dict) -> None:
    rng = np.random.default_rng(11)
    a = stone(1, "blue", "translucent", 3.0, 400.0, rng)
    c = stone(2, "inky", "opaque", 3.0, 400.0, rng)
    gap = float(a.outline_mm[:, 0].min() - c.outline_mm[:, 0].max()) - 0.6
    b, t = frames(machine, [(a, 15.0, 6.0), (c, 15.0 + gap, 6.0)], [(a, 19.0, 6.0), (c, 19.0 + gap, 6.0)], 3)
    seg = segment_pair(b, t, refs["backlit"], refs["toplit"], DT_NS, LIMITS)
    assert len(seg.observations) == 2
    assert not any(o.cluster for o in seg.observations)


def test_partly_visible_stone_is_not_used(machine: SimMachine, refs: dict) -> None:
    rng = np.random.default_rng(2)
    s = stone(1, "blue", "opaque", 4.0, 400.0, rng)
    b, t = frames(machine, [(s, 30.5, 6.0)], [(s, 34.5, 6.0)], 4)
    seg = segment_pair(b, t, refs["backlit"], refs["toplit"], DT_NS, LIMITS)
    assert seg.observations == []


def test_empty_channel_has_no_objects(refs: dict, machine: SimMachine) -> None:
    b, t = frames(machine, [], [], 8)
    assert segment_pair(b, t, refs["backlit"], refs["toplit"], DT_NS, LIMITS).observations == []


def test_crop_is_six_channel_and_centred(machine: SimMachine, refs: dict) -> None:
    rng = np.random.default_rng(3)
    s = stone(1, "inky", "opaque", 3.0, 400.0, rng)
    b, t = frames(machine, [(s, 12.0, 6.0)], [(s, 16.0, 6.0)], 5)
    [o] = segment_pair(b, t, refs["backlit"], refs["toplit"], DT_NS, LIMITS).observations
    crop = crop_pair(b, t, o, 128, 128)
    assert crop.shape == (128, 128, 6) and crop.dtype == np.uint8
    # A dark stone: the centre of both halves is darker than the corners.
    for half in (crop[:, :, :3], crop[:, :, 3:]):
        assert half[54:74, 54:74].mean() < half[:10, :10].mean() - 40


def test_sim_world_speed_measurement_matches_truth(machine: SimMachine, refs: dict) -> None:
    cfg = load_config(config.sim_config_path())
    m = SimMachine(dataclasses.replace(cfg, sim=dataclasses.replace(cfg.sim, seed=4)))
    m.world.feed(60, 0)
    errors = []
    for t_edge, _ in m.world.beam_times(cfg.trigger.beam_x_mm)[:50]:
        back, top = m.render("backlit", t_edge), m.render("toplit", t_edge + DT_NS)
        seg = segment_pair(back, top, refs["backlit"], refs["toplit"], t_edge + DT_NS, LIMITS)
        for o in seg.observations:
            truth = min(m.world.placed_at(o.t_ns), key=lambda p: abs(p[1] - o.x_mm))
            if not o.cluster:
                errors.append(o.speed_mm_s / truth[0].speed_mm_s - 1.0)
    assert len(errors) >= 45
    assert np.percentile(np.abs(errors), 99) < 0.01
