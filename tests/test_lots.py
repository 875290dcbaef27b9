"""Simulated lots: class mix, looks, session drift and the §6 hard cases."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from sorterd import config
from sorterd.domain import CLARITIES, COLORS
from sorterd.sim.appearance import COLOR_CLASSES, chip_outline, sample_outline
from sorterd.sim.lots import LOTS, HardCaseRates, Lot, LotLook, get_lot
from sorterd.sim.render import Optics, render_frame, render_reference
from sorterd.sim.stones import Appearance, StoneSpec
from sorterd.sim.world import THAI_MELEE_MIX, World
from sorterd.sorting.segment import PairingLimits, segment_pair

N = 4000


def draw(lot: Lot, n: int = N, seed: int = 0) -> list[StoneSpec]:
    rng = np.random.default_rng(seed)
    return [lot.draw(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def thai() -> list[StoneSpec]:
    return draw(LOTS["thai-mixed"])


def case(stone: StoneSpec) -> str:
    return stone.notes.split(" ")[0] if stone.notes else "clean"


# -- class mix ------------------------------------------------------------------------------


def test_class_mix_follows_the_protocol_frequencies(thai: list[StoneSpec]) -> None:
    gems = [s for s in thai if "reject" not in s.flags]
    counts = Counter(f"{s.color}_{s.clarity}" for s in gems)
    total = sum(THAI_MELEE_MIX.values())
    for cls, weight in THAI_MELEE_MIX.items():
        # Borderline stones can end on the neighbouring class: a little slack.
        assert counts[cls] / len(gems) == pytest.approx(weight / total, abs=0.02), cls


@pytest.mark.parametrize("name", sorted(LOTS))
def test_inky_transparent_stays_rare_in_every_lot(name: str) -> None:
    mix = LOTS[name].class_mix
    assert 0.01 <= mix["inky_transparent"] / sum(mix.values()) <= 0.03  # §1.3: ~1-3 %


def test_lots_differ_in_mix_and_look() -> None:
    dark, pale = LOTS["bo-ploi-dark"], LOTS["ilakaka-pale"]
    inky = sum(v for k, v in dark.class_mix.items() if k.startswith("inky")) / sum(dark.class_mix.values())
    inky_pale = sum(v for k, v in pale.class_mix.items() if k.startswith("inky")) / sum(pale.class_mix.values())
    assert inky > 2 * inky_pale
    assert dark.look.color_boxes()["blue"].val[0] < pale.look.color_boxes()["blue"].val[0]
    assert LOTS["pailin-heated"].heat_treated and LOTS["pailin-heated"].look.transmission_shift > 0
    assert LOTS["ratnapura-worn"].look.texture_scale > 1.2  # frosted, water-worn


@pytest.mark.parametrize("name", sorted(LOTS))
def test_lot_looks_stay_inside_the_class_definitions(name: str) -> None:
    """A shifted lot still separates its classes (§3.2): the boxes do not overlap."""
    col = LOTS[name].look.color_boxes()
    cla = LOTS[name].look.clarity_boxes()
    assert col["inky"].val[1] < col["blue"].val[0]
    assert col["light"].sat[1] < col["blue"].sat[0]
    assert cla["opaque"].transmission[1] < cla["translucent"].transmission[0]
    assert cla["translucent"].transmission[1] < cla["transparent"].transmission[0]


def test_bad_lot_values_are_refused_with_their_name() -> None:
    with pytest.raises(ValueError, match="LotLook.val_shift"):
        LotLook(val_shift=0.5)
    with pytest.raises(ValueError, match="hard cases add up"):
        HardCaseRates(borderline_color=0.5, borderline_clarity=0.5)
    with pytest.raises(ValueError, match="unknown classes"):
        replace(LOTS["thai-mixed"], class_mix={"blue_clear": 1.0})
    with pytest.raises(ValueError, match="valid lots are .*thai-mixed"):
        get_lot("thai")


# -- hard cases and flags ---------------------------------------------------------------------


def test_hard_case_rates_are_what_the_lot_says(thai: list[StoneSpec]) -> None:
    rates = LOTS["thai-mixed"].hard
    cases = Counter(case(s) for s in thai)
    assert cases["borderline"] / N == pytest.approx(rates.borderline_color + rates.borderline_clarity, abs=0.015)
    assert cases["mixed"] / N == pytest.approx(rates.mixed, abs=0.01)
    assert cases["broken;"] / N == pytest.approx(rates.damaged, abs=0.01)
    assert cases["pleochroic"] / N == pytest.approx(rates.pleochroic, abs=0.01)
    assert cases["non-gem:"] / N == pytest.approx(rates.debris, abs=0.008)


def test_every_stone_carries_only_protocol_flags(thai: list[StoneSpec]) -> None:
    flags = Counter(f for s in thai for f in s.flags)
    assert set(flags) == {"uncertain", "mixed", "damaged", "reject"}
    for s in thai:
        expected = {"borderline": ("uncertain",), "mixed": ("mixed",), "broken;": ("damaged",),
                    "non-gem:": ("reject",)}.get(case(s), ())
        assert s.flags == expected


def test_borderline_labels_are_noisy_like_a_humans(thai: list[StoneSpec]) -> None:
    border = [s for s in thai if case(s) == "borderline"]
    off = sum(1 for s in border if s.human_label() != (s.color, s.clarity))
    assert 0.1 < off / len(border) < 0.35  # about one in five across the boundary
    clean = [s for s in thai if case(s) in ("clean", "pleochroic", "broken;")]
    slips = sum(1 for s in clean if s.human_label() != (s.color, s.clarity))
    assert slips / len(clean) < 0.01  # only the rare unflagged slip


def test_borderline_clarity_calls_lean_to_translucent() -> None:
    """§3.2.2: when unsure between two clarities, the annotator picks Translucent."""
    stones = draw(replace(LOTS["thai-mixed"], hard=HardCaseRates(0, 0.5, 0, 0, 0, 0, 0)), 6000)
    to_middle = sum(1 for s in stones if s.clarity != "translucent" and s.human_label()[1] == "translucent")
    from_middle = sum(1 for s in stones if s.clarity == "translucent" and s.human_label()[1] != "translucent")
    assert to_middle > 1.5 * from_middle


def test_borderline_looks_lie_between_the_two_classes() -> None:
    stones = draw(replace(LOTS["sim-default"], hard=HardCaseRates(0.5, 0, 0, 0, 0, 0, 0)), 2000)
    border = [s for s in stones if "borderline blue/inky" in s.notes]
    blue, inky = COLOR_CLASSES["blue"], COLOR_CLASSES["inky"]
    vals = np.array([s.appearance.val for s in border])
    # They fill the gap no clean stone occupies; the boundary is its middle.
    assert vals.min() >= inky.val[1] - 1e-9 and vals.max() <= blue.val[0] + 1e-9
    assert vals.max() - vals.min() > 0.8 * (blue.val[0] - inky.val[1])
    middle = (inky.val[1] + blue.val[0]) / 2
    assert all((s.color == "inky") == (s.appearance.val < middle) for s in border)


def test_mixed_stones_have_a_smaller_second_zone_and_the_dominant_label(thai: list[StoneSpec]) -> None:
    mixed = [s for s in thai if "mixed" in s.flags]
    assert all(s.appearance.zone_offset > 0 for s in mixed)
    assert all(s.appearance.zone_val_delta or s.appearance.zone_transmission_delta for s in mixed)
    dominant = sum(1 for s in mixed if s.human_label() == (s.color, s.clarity))
    assert dominant / len(mixed) > 0.8


def test_damaged_stones_are_broken_and_cracked(thai: list[StoneSpec]) -> None:
    damaged = [s for s in thai if "damaged" in s.flags]
    assert damaged and all(1 <= s.appearance.fractures <= 3 for s in damaged)
    assert all(s.human_label() == (s.color, s.clarity) for s in damaged)  # still assessable


def test_debris_has_no_label_and_belongs_in_reject(thai: list[StoneSpec]) -> None:
    debris = [s for s in thai if "reject" in s.flags]
    assert debris and all(s.human_label() == (None, None) for s in debris)
    dcfg = config.DecisionConfig()
    assert all(dcfg.bins[s.color][s.clarity] == "REJECT" for s in debris)


def test_pleochroic_stones_show_two_hues(thai: list[StoneSpec]) -> None:
    pleo = [s for s in thai if s.notes == "pleochroic"]
    assert pleo and all(12 <= abs(s.appearance.zone_hue_delta_deg) <= 25 for s in pleo)


def test_small_stones_are_part_of_the_lot() -> None:
    fine = draw(LOTS["chanthaburi-fine"], 2000)
    assert 0.25 < np.mean([s.size_mm < 1.5 for s in fine]) < 0.45  # §6.4
    assert max(s.size_mm for s in fine) <= 2.6


def test_session_drift_stays_within_the_recalibration_limit() -> None:
    lot = LOTS["thai-mixed"]
    rng = np.random.default_rng(5)
    drifts = [lot.session_drift(rng) for _ in range(500)]
    assert all(d.worst_deviation < 0.05 for d in drifts)  # §2.4: > 5 % means re-calibrate
    assert np.std([d.backlight_scale for d in drifts]) > 0.01  # but sessions do differ
    optics = drifts[0].optics(Optics())
    assert optics.ring_gain == drifts[0].ring_gain and optics.wb_gains == drifts[0].wb_gains
    assert LOTS["sim-default"].session_drift(rng).worst_deviation == 0.0


def test_same_seed_same_stones() -> None:
    a, b = draw(LOTS["anakie-dark"], 50, seed=9), draw(LOTS["anakie-dark"], 50, seed=9)
    assert [(s.color, s.appearance, s.notes) for s in a] == [(s.color, s.appearance, s.notes) for s in b]


# -- the feeder and the renderer ---------------------------------------------------------------


def test_feeder_takes_its_stones_from_a_lot(sim_cfg: config.Config) -> None:
    world = World(sim_cfg.sim, sim_cfg.geometry, sim_cfg.camera, dict(sim_cfg.ejection.opening_latency_ms))
    stones = world.feed(200, 0, lot=LOTS["ratnapura-worn"])
    assert {s.lot_id for s in stones} == {"LOT-2026-005"}
    assert [s.sim_id for s in stones] == list(range(200))
    assert all(b.t_entry_ns > a.t_entry_ns for a, b in zip(stones, stones[1:], strict=False))
    assert any(s.flags for s in stones) and all(s.speed_mm_s > 0 for s in stones)
    plain = World(sim_cfg.sim, sim_cfg.geometry, sim_cfg.camera, dict(sim_cfg.ejection.opening_latency_ms))
    assert all(s.flags == () and s.lot_id == "LOT-SIM-001" for s in plain.feed(50, 0))


def _segment_one(stone: StoneSpec, optics: Optics) -> list[bool]:
    """Cluster flags of the objects the daemon's segmentation finds around one stone."""
    rng = np.random.default_rng(1)
    refs = [render_reference(m, optics, rng) for m in ("backlit", "toplit")]
    back = render_frame("backlit", [(stone, 16.0, 4.0)], optics, rng)
    top = render_frame("toplit", [(stone, 16.0, 4.0)], optics, rng)
    lim = PairingLimits(optics.px_per_mm, 0.01, -100.0, 100.0, 9.6)
    return [o.cluster for o in segment_pair(back, top, refs[0], refs[1], 0, lim).observations]


@pytest.mark.parametrize("wanted", ["broken;", "mixed", "pleochroic", "non-gem:", "borderline"])
def test_hard_cases_segment_as_one_stone(wanted: str) -> None:
    """Segmentation contract: a hard case is still one object, never a 'cluster'."""
    lot = LOTS["thai-mixed"]
    rng = np.random.default_rng(11)
    stones = [s for s in (lot.draw(rng) for _ in range(1500)) if case(s) == wanted][:6]
    optics = Optics(width_px=640, height_px=160)
    for s in stones:
        s = replace(s, y_mm=4.0)
        assert _segment_one(s, optics) == [False], (s.notes, s.size_mm)


def test_fractures_block_backlight() -> None:
    rng = np.random.default_rng(2)
    outline, size, length = sample_outline(3.0, rng)
    look = Appearance(hue_deg=225.0, sat=0.7, val=0.5, transmission=0.85, texture=0.1, texture_seed=4)
    optics = Optics(noise_sigma=0.0)

    def backlit_sum(ap: Appearance) -> float:
        s = StoneSpec(sim_id=1, color="blue", clarity="transparent", outline_mm=outline, size_mm=size,
                      length_mm=length, appearance=ap, speed_mm_s=1.0, t_entry_ns=0, y_mm=4.0)
        return float(render_frame("backlit", [(s, 16.0, 4.0)], optics, rng).astype(float).sum())

    assert backlit_sum(replace(look, fractures=3)) < backlit_sum(look) - 2000


def test_chipped_outline_is_smaller_and_still_one_stone() -> None:
    rng = np.random.default_rng(3)
    outline, size, _ = sample_outline(3.0, rng)
    chipped, new_size, new_length = chip_outline(outline, 2, rng)
    assert new_size <= size + 1e-9 and new_length >= new_size
    assert np.allclose(chipped.mean(axis=0), 0.0, atol=0.3)


def test_class_names_match_the_stones() -> None:
    assert all(set(lot.class_mix) == {f"{c}_{k}" for c in COLORS for k in CLARITIES} for lot in LOTS.values())


def test_session_drift_applies_on_top_of_the_machines_own_optics() -> None:
    """A lot's session drift must not undo a fault the simulated machine was given (sim.faults)."""
    from sorterd.sim.lots import SessionDrift

    faulty = Optics(backlight_level=200.0, ring_gain=0.8, wb_gains=(1.1, 1.0, 1.0))
    o = SessionDrift(backlight_scale=0.9, ring_gain=1.05, wb_gains=(1.0, 1.0, 0.9)).optics(faulty)
    assert o.backlight_level == pytest.approx(180.0) and o.ring_gain == pytest.approx(0.84)
    assert o.wb_gains == pytest.approx((1.1, 1.0, 0.9))
