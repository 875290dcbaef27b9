"""The simulator's stone looks and frames: shapes, determinism, and the
segmentation contract the downstream segmenter relies on."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sorterd.domain import CLARITIES, COLORS
from sorterd.sim import render
from sorterd.sim.appearance import (
    CLARITY_CLASSES,
    COLOR_CLASSES,
    MAX_ASPECT,
    MIN_SOLIDITY,
    make_stone_look,
    min_rect_sides,
    notch_depth,
    polygon_centroid,
    sample_appearance,
    sample_outline,
    solidity,
)
from sorterd.sim.render import Optics, render_frame, render_reference
from sorterd.sim.stones import Appearance, StoneSpec

MODES = ("backlit", "toplit")
OPTICS = Optics()
CLASSES = [(c, k) for c in COLORS for k in CLARITIES]


def make_stone(color: str, clarity: str, size_mm: float, rng: np.random.Generator,
               sim_id: int = 0) -> StoneSpec:
    outline, size, length, look = make_stone_look(color, clarity, size_mm, rng)
    return StoneSpec(sim_id=sim_id, color=color, clarity=clarity, outline_mm=outline,
                     size_mm=size, length_mm=length, appearance=look, speed_mm_s=150.0,
                     t_entry_ns=0, y_mm=4.0)


def stone_pixels(stone: StoneSpec, x_mm: float, y_mm: float, optics: Optics = OPTICS) -> np.ndarray:
    """Pixels whose centre lies inside the stone's outline (bool H x W)."""
    mask = np.zeros((optics.height_px, optics.width_px), np.uint8)
    pts = (stone.outline_mm + [x_mm, y_mm]) * optics.px_per_mm
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask.astype(bool)


def max_channel_diff(frame: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.asarray(cv2.absdiff(frame, reference)).max(axis=2)


@pytest.fixture(scope="module")
def references() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100)
    return {m: render_reference(m, OPTICS, rng) for m in MODES}


@pytest.fixture(scope="module")
def rendered() -> list[tuple[StoneSpec, np.ndarray, dict[str, np.ndarray]]]:
    """Five stones per class, 1-5 mm, alone at a sub-pixel position: both frames."""
    rng = np.random.default_rng(7)
    out = []
    for i, (color, clarity) in enumerate(CLASSES):
        for j, size in enumerate(np.linspace(1.0, 5.0, 5)):
            stone = make_stone(color, clarity, float(size), rng, sim_id=10 * i + j)
            x, y = 16.0 + rng.uniform(-0.5, 0.5), 4.0 + rng.uniform(-0.2, 0.2)
            frames = {m: render_frame(m, [(stone, x, y)], OPTICS, rng) for m in MODES}
            out.append((stone, stone_pixels(stone, x, y), frames))
    return out


# -- outline and appearance ---------------------------------------------------------


def test_outline_is_one_rough_stone_of_the_asked_sieve_size() -> None:
    rng = np.random.default_rng(1)
    for size in rng.uniform(1.0, 5.0, 200):
        outline, measured, length = sample_outline(float(size), rng)
        short, long = min_rect_sides(outline)
        assert outline.shape[1] == 2 and 8 <= len(outline) <= 16
        assert outline.dtype == np.float64
        assert measured == pytest.approx(size, rel=1e-5) and short == pytest.approx(measured)
        assert length == pytest.approx(long) and 1.0 <= length / measured <= MAX_ASPECT + 1e-6
        assert solidity(outline) >= MIN_SOLIDITY
        assert notch_depth(outline) < 0.12  # the segmenter's two-lobe cue
        assert np.abs(polygon_centroid(outline)).max() < 1e-9


def test_class_boxes_name_exactly_the_stone_classes() -> None:
    assert set(COLOR_CLASSES) == set(COLORS)
    assert set(CLARITY_CLASSES) == set(CLARITIES)


def test_appearance_stays_inside_its_class_box() -> None:
    rng = np.random.default_rng(2)
    for color, clarity in CLASSES:
        col, cla = COLOR_CLASSES[color], CLARITY_CLASSES[clarity]
        for _ in range(50):
            ap = sample_appearance(color, clarity, rng)
            assert col.sat[0] <= ap.sat <= col.sat[1] and col.val[0] <= ap.val <= col.val[1]
            assert col.hue_deg[0] <= ap.hue_deg <= col.hue_deg[1]
            assert cla.transmission[0] <= ap.transmission <= cla.transmission[1]


def test_unknown_class_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"Bad color 'teal': valid color classes are \['blue', 'inky', 'light'\]"):
        sample_appearance("teal", "opaque", np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"Bad clarity 'milky'"):
        sample_appearance("blue", "milky", np.random.default_rng(0))


# -- frames ---------------------------------------------------------------------------


def test_optics_defaults_and_bad_values() -> None:
    assert (OPTICS.width_px, OPTICS.height_px, OPTICS.px_per_mm) == (640, 160, 20.0)
    assert (OPTICS.backlight_level, OPTICS.toplit_background) == (225.0, 118.0)
    with pytest.raises(ValueError, match=r"Optics.noise_sigma = -1.0: must be >= 0"):
        Optics(noise_sigma=-1.0)
    with pytest.raises(ValueError, match=r"Optics.wb_gains"):
        Optics(wb_gains=(1.0, 0.0, 1.0))


def test_frames_are_bgr_uint8_of_the_frame_size() -> None:
    rng = np.random.default_rng(3)
    stone = make_stone("blue", "translucent", 2.5, rng)
    optics = Optics(width_px=320, height_px=96)
    for mode in MODES:
        for image in (render_frame(mode, [(stone, 5.0, 2.0)], optics, rng),
                      render_reference(mode, optics, rng)):
            assert image.shape == (96, 320, 3) and image.dtype == np.uint8


def test_bad_mode_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"Bad mode 'uv': valid modes are \['backlit', 'toplit'\]"):
        render_frame("uv", [], OPTICS, np.random.default_rng(0))


def test_backgrounds_are_the_panel_and_18_percent_gray(references: dict[str, np.ndarray]) -> None:
    back, top = references["backlit"].astype(float), references["toplit"].astype(float)
    centre = back[70:90, 310:330].mean()
    assert centre == pytest.approx(225.0, abs=1.5)
    assert 0.93 < back[:5, :5].mean() / centre < 0.99  # vignetting of a few %
    assert top.mean() == pytest.approx(118.0, abs=0.5) and np.ptp(top.mean(axis=(0, 1))) < 0.5


def test_stone_look_is_fixed_and_only_noise_comes_from_rng() -> None:
    rng = np.random.default_rng(4)
    stone = make_stone("light", "transparent", 3.0, rng)
    clean = Optics(noise_sigma=0.0)
    for mode in MODES:
        ref = render_reference(mode, clean, rng).astype(float)
        a = render_frame(mode, [(stone, 16.0, 4.0)], clean, np.random.default_rng(1))
        b = render_frame(mode, [(stone, 16.0, 4.0)], clean, np.random.default_rng(2))
        render.clear_look_cache()
        c = render_frame(mode, [(stone, 17.0, 4.0)], clean, np.random.default_rng(3))
        np.testing.assert_array_equal(a, b)
        # Moved by exactly 20 px: the same stone over a (slightly vignetted) background.
        rel_a = a[:, 200:420] / ref[:, 200:420]
        rel_c = c[:, 220:440] / ref[:, 220:440]
        assert np.abs(rel_a - rel_c).max() < 0.03
        noisy = [render_frame(mode, [(stone, 16.0, 4.0)], OPTICS, np.random.default_rng(s))
                 for s in (5, 5, 6)]
        np.testing.assert_array_equal(noisy[0], noisy[1])
        assert not np.array_equal(noisy[0], noisy[2])


def test_sub_pixel_position_is_honoured() -> None:
    rng = np.random.default_rng(5)
    stone = make_stone("blue", "opaque", 2.0, rng)
    clean = Optics(noise_sigma=0.0)
    ref = render_reference("backlit", clean, rng).astype(float)

    def centroid_x(x_mm: float) -> float:
        frame = render_frame("backlit", [(stone, x_mm, 4.0)], clean, rng).astype(float)
        weight = (ref - frame).sum(axis=2)
        return float((weight * np.arange(clean.width_px)).sum() / weight.sum())

    base = centroid_x(16.0)
    assert base == pytest.approx(16.0 * clean.px_per_mm, abs=0.3)
    for dx_px in (0.25, 0.5, 0.8):
        assert centroid_x(16.0 + dx_px / clean.px_per_mm) - base == pytest.approx(dx_px, abs=0.06)


def test_segmentation_contract_every_class_and_size(
        rendered: list[tuple[StoneSpec, np.ndarray, dict[str, np.ndarray]]],
        references: dict[str, np.ndarray]) -> None:
    for stone, pixels, frames in rendered:
        diffs = {m: max_channel_diff(frames[m], references[m])[pixels] for m in MODES}
        label = f"{stone.color}/{stone.clarity} {stone.size_mm:.1f} mm"
        for mode in MODES:
            assert diffs[mode].mean() >= 25, f"{label}: {mode} mean diff {diffs[mode].mean():.1f}"
        strong = (diffs["backlit"] >= 18) | (diffs["toplit"] >= 18)
        assert strong.mean() >= 0.7, f"{label}: only {strong.mean():.0%} of pixels differ"


def test_background_differs_from_reference_only_by_noise(
        rendered: list[tuple[StoneSpec, np.ndarray, dict[str, np.ndarray]]],
        references: dict[str, np.ndarray]) -> None:
    for _, pixels, frames in rendered[::4]:
        # Beyond the anti-aliased edge and the sub-pixel shift: pure background.
        near = cv2.dilate(pixels.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        for mode in MODES:
            diff = max_channel_diff(frames[mode], references[mode])[~near]
            assert (diff < 4 * OPTICS.noise_sigma).mean() >= 0.999


@pytest.mark.parametrize("optics", [
    Optics(wb_gains=(1.06, 1.0, 0.93), ring_gain=0.85, noise_sigma=3.0),
    Optics(lens_blur_px=1.5, px_per_mm=15.0),
])
def test_drifted_optics_keep_the_empty_channel_matching(optics: Optics) -> None:
    rng = np.random.default_rng(6)
    stone = make_stone("inky", "opaque", 3.0, rng)
    for mode in MODES:
        frame = render_frame(mode, [(stone, 8.0, 4.0)], optics, rng)
        ref = render_reference(mode, optics, rng)
        far = max_channel_diff(frame, ref)[:, optics.width_px // 2:]
        assert (far < 4 * optics.noise_sigma).mean() >= 0.999
        assert max_channel_diff(frame, ref)[stone_pixels(stone, 8.0, 4.0, optics)].mean() > 25


def test_class_separation(rendered: list[tuple[StoneSpec, np.ndarray, dict[str, np.ndarray]]],
                          references: dict[str, np.ndarray]) -> None:
    ratio: dict[str, list[float]] = {k: [] for k in CLARITIES}
    hsv: dict[str, list[np.ndarray]] = {c: [] for c in COLORS}
    panel = references["backlit"].astype(float)
    for stone, pixels, frames in rendered:
        ratio[stone.clarity].append(frames["backlit"][pixels].mean() / panel[pixels].mean())
        mean_bgr = frames["toplit"][pixels].mean(axis=0).astype(np.uint8).reshape(1, 1, 3)
        hsv[stone.color].append(cv2.cvtColor(mean_bgr, cv2.COLOR_BGR2HSV)[0, 0].astype(float))
    mean = {k: float(np.mean(v)) for k, v in ratio.items()}
    assert mean["transparent"] > 0.6 > mean["translucent"] > mean["opaque"]
    assert mean["opaque"] < 0.15
    assert min(ratio["transparent"]) > 0.6 and max(ratio["translucent"]) < 0.6  # per stone too
    sat = {c: np.mean([h[1] for h in v]) for c, v in hsv.items()}
    val = {c: np.mean([h[2] for h in v]) for c, v in hsv.items()}
    assert sat["blue"] > sat["light"] + 60  # of 255
    assert val["inky"] < val["blue"] - 60


def test_touching_stones_form_one_blob(references: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(8)
    for color, clarity in [("blue", "translucent"), ("light", "transparent"), ("inky", "opaque")]:
        a = make_stone(color, clarity, 2.5, rng, sim_id=1)
        b = make_stone(color, clarity, 2.0, rng, sim_id=2)
        xb = _touching_x(a, b, 10.0, 4.0)
        placed = [(a, 10.0, 4.0), (b, xb, 4.0)]
        masks = {}
        for mode in MODES:
            masks[mode] = (max_channel_diff(render_frame(mode, placed, OPTICS, rng),
                                            references[mode]) >= 18).astype(np.uint8)
            if (color, clarity) != ("light", "transparent"):  # a clear stone's body is faint
                assert cv2.connectedComponents(masks[mode], connectivity=8)[0] == 2, (color, mode)
        either = masks["backlit"] | masks["toplit"]
        assert cv2.connectedComponents(either, connectivity=8)[0] == 2, (color, clarity)


def _touching_x(a: StoneSpec, b: StoneSpec, xa: float, y: float) -> float:
    """Smallest-overlap x of b's centroid right of a at which their outlines touch."""
    ma = stone_pixels(a, xa, y)
    x = xa + (a.length_mm + b.length_mm)
    while x > xa:
        both = (ma | stone_pixels(b, x, y)).astype(np.uint8)
        if cv2.connectedComponents(both, connectivity=8)[0] == 2:
            return x
        x -= 0.02
    raise AssertionError("stones never touched")


def test_stones_partly_or_wholly_outside_the_frame() -> None:
    rng = np.random.default_rng(9)
    stone = make_stone("blue", "transparent", 5.0, rng)
    w_mm = OPTICS.width_px / OPTICS.px_per_mm
    h_mm = OPTICS.height_px / OPTICS.px_per_mm
    for x, y in [(-1.0, 4.0), (w_mm + 0.5, 4.0), (16.0, -1.5), (16.0, h_mm + 1.0), (0.03, 0.02)]:
        for mode in MODES:
            frame = render_frame(mode, [(stone, x, y)], OPTICS, rng)
            assert frame.shape == (160, 640, 3)
    for mode in MODES:
        gone = render_frame(mode, [(stone, -50.0, 4.0)], OPTICS, np.random.default_rng(1))
        np.testing.assert_array_equal(gone, render_reference(mode, OPTICS, np.random.default_rng(1)))


def test_mixed_zone_splits_the_stone_along_its_angle() -> None:
    rng = np.random.default_rng(10)
    outline, size, length = sample_outline(4.0, rng)
    look = Appearance(hue_deg=225.0, sat=0.7, val=0.35, transmission=0.4,
                      zone_val_delta=0.3, zone_angle_deg=0.0)
    stone = StoneSpec(sim_id=3, color="blue", clarity="translucent", outline_mm=outline,
                      size_mm=size, length_mm=length, appearance=look, speed_mm_s=100.0,
                      t_entry_ns=0, y_mm=4.0)
    clean = Optics(noise_sigma=0.0)
    frame = render_frame("toplit", [(stone, 16.0, 4.0)], clean, rng).astype(float)
    pixels = stone_pixels(stone, 16.0, 4.0)
    cols = np.nonzero(pixels)[1]
    left = pixels & (np.arange(clean.width_px) < 16.0 * 20 - 5)[None, :]
    right = pixels & (np.arange(clean.width_px) > 16.0 * 20 + 5)[None, :]
    assert left.any() and right.any() and cols.size
    assert frame[right].max(axis=1).mean() > frame[left].max(axis=1).mean() + 40  # +x side is lighter
