"""Domain randomisation in the simulator: per-session machines drawn from MachineRanges."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import pytest

from sorterd import config
from sorterd.cli.compose import load_config
from sorterd.sim.generate import GenerateOptions, generate
from sorterd.sim.lots import NOMINAL_MACHINE, MachineLook, MachineRanges, get_lot
from sorterd.sim.recipe import DEFAULT_LOTS, SHIFTED_LOT, TRAIN_MACHINES
from sorterd.sim.render import Optics, render_reference


def test_bad_ranges_say_which_and_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"MachineRanges.px_per_mm = \(40.0, 15.0\): must be \(low, high\) with 8.0"):
        MachineRanges(px_per_mm=(40.0, 15.0))
    with pytest.raises(ValueError, match=r"MachineRanges.noise_dn = \(1.0, 9.0\)"):
        MachineRanges(noise_dn=(1.0, 9.0))
    with pytest.raises(ValueError, match=r"Optics.backlight_tint = \(1.0, 0.0, 1.0\)"):
        Optics(backlight_tint=(1.0, 0.0, 1.0))


def test_every_draw_lies_in_its_range_and_sessions_differ() -> None:
    rng = np.random.default_rng(0)
    looks = [TRAIN_MACHINES.draw(rng) for _ in range(200)]
    r = TRAIN_MACHINES
    for name in ("px_per_mm", "backlight_level", "toplit_level", "exposure", "blur_mm", "noise_dn", "gain", "texture"):
        values = [getattr(look, name) for look in looks]
        lo, hi = getattr(r, name)
        assert lo <= min(values) and max(values) <= hi, name
        assert max(values) - min(values) > 0.5 * (hi - lo), name  # spread over the range, not one value
    for look in looks:
        for tint, (_, hi) in ((look.backlight_tint, r.backlight_tint), (look.toplit_tint, r.toplit_tint)):
            assert tint[1] == 1.0 and all(abs(g - 1.0) <= hi + 1e-12 for g in tint)
        assert 0.0 <= look.framing_mm <= r.framing_mm[1]
    assert NOMINAL_MACHINE.nominal and not TRAIN_MACHINES.nominal
    assert NOMINAL_MACHINE.draw(rng) == MachineLook()


def test_the_shifted_lot_is_outside_every_training_range_in_several_ways() -> None:
    shifted = SHIFTED_LOT.machine
    outside = []
    for f in fields(MachineRanges):
        lo, hi = getattr(TRAIN_MACHINES, f.name)
        slo, shi = getattr(shifted, f.name)
        if shi < lo or slo > hi:
            outside.append(f.name)
    assert len(outside) >= 5, outside
    assert all(b.randomised for b in DEFAULT_LOTS if b.lot not in ("anakie-dark", "chanthaburi-fine"))
    # ... and its stones' look is not a training lot's either.
    train_looks = [get_lot(b.lot).look for b in DEFAULT_LOTS if b.randomised]
    assert SHIFTED_LOT.look.hue_shift_deg > max(look.hue_shift_deg for look in train_looks)


def test_a_machine_look_changes_the_frames_as_it_says() -> None:
    base = Optics(width_px=64, height_px=32, noise_sigma=0.0)
    look = MachineLook(px_per_mm=40.0, backlight_level=200.0, backlight_tint=(1.1, 1.0, 0.9), toplit_level=90.0,
                       toplit_tint=(1.0, 1.0, 1.05), exposure=1.2, noise_dn=0.0)
    o = look.optics(base)
    assert (o.width_px, o.height_px, o.px_per_mm) == (128, 64, 40.0)  # the same field of view in mm
    rng = np.random.default_rng(0)
    back = render_reference("backlit", o, rng)[32, 64].astype(float)
    top = render_reference("toplit", o, rng)[32, 64].astype(float)
    assert back[0] > back[1] > back[2]  # B, G, R: bluer, redder less, as the tint says
    assert abs(back[1] - 200.0) < 3.0
    assert abs(top[1] - 90.0 * 1.2) < 1.5 and top[2] > top[1]


def test_generated_sessions_record_their_own_machine(tmp_path: Path) -> None:
    cfg = load_config(config.sim_config_path())
    ranges = MachineRanges(px_per_mm=(12.0, 30.0), toplit_level=(90.0, 130.0), framing_mm=(0.0, 0.3))
    lot = replace(get_lot("thai-mixed"), machine=ranges)
    res = generate(cfg, GenerateOptions(out=tmp_path, stones=6, lot=lot, seed=5, session_stones=3,
                                        day=date(2026, 3, 2)))
    assert res.stones == 6 and len(res.sessions) == 2
    metas = [json.loads((tmp_path / "sessions" / f"{s}.json").read_text()) for s in res.sessions]
    scales = [m["pixels_per_mm"] for m in metas]
    assert scales[0] != scales[1] and all(12.0 <= s <= 30.0 for s in scales)
    assert all(m["sim"]["machine"]["px_per_mm"] == m["pixels_per_mm"] for m in metas)
    labels = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    for lab in labels:
        ppm = next(m["pixels_per_mm"] for m in metas if m["session_id"] == lab["session_id"])
        crop = cv2.imread(str(tmp_path / "images" / "processed" / "backlit" / f"{lab['stone_id']}.png"))
        assert crop.shape[:2] == (round(6.4 * ppm),) * 2  # crop_mm square at the session's own scale
