"""One way to make a model input: crops of any size, aspect and scale land at the model's scale.

The datasets here are written by hand with cv2 (not by our simulator): sessions at 15, 40 and
80 px/mm, each with its own background levels, crops that are tight boxes, wide, tall or far
larger than the model's window.  Whatever the camera and the crop, a 3 mm disc must come out
as many pixels across in the model input, an ellipse keeps its aspect, and the padding is the
crop's own background.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from sorterd.data.crops import border_colour, cut_window, fit_crop
from sorterd.data.dataset import load_crops, open_dataset

SIZE = 128  # the model's input
CROP_MM = 6.4  # the model's window: SIZE / CROP_MM = 20 px per mm in the model input
OUT_PPM = SIZE / CROP_MM
DISC_MM = 3.0
# (px/mm, backlight level, grey-card level): other cameras, other light.
SESSIONS = {"s15": (15.0, 225, 96), "s40": (40.0, 190, 130), "s80": (80.0, 245, 110)}
# Crop shapes in mm (width, height): tight, wide, tall, larger than the window.
SHAPES_MM = [(3.4, 3.4), (7.0, 3.6), (3.5, 6.0), (10.0, 9.0)]
STONE_BACK, STONE_TOP = 55, 200


def disc_crop(ppm: float, shape_mm: tuple[float, float], level: int, stone: int,
              axes_mm: tuple[float, float] = (DISC_MM, DISC_MM), offset_mm: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """A crop of shape_mm at ppm with one ellipse (axes in mm) near its centre: drawn at 8x and
    area-averaged down, so its edge pixels cover what they should (cv2's own anti-aliased fill
    is about a pixel too wide, which at 15 px/mm would be 1.3 px of the model's input)."""
    up = 8
    w, h = round(shape_mm[0] * ppm), round(shape_mm[1] * ppm)
    big = np.full((h * up, w * up, 3), level, np.uint8)
    centre = (round((w / 2 + offset_mm[0] * ppm) * up), round((h / 2 + offset_mm[1] * ppm) * up))
    axes = (round(axes_mm[0] / 2 * ppm * up), round(axes_mm[1] / 2 * ppm * up))
    cv2.ellipse(big, centre, axes, 0, 0, 360, (stone, stone, stone), -1, cv2.LINE_8)
    return np.asarray(cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA))


def extent_px(half: np.ndarray, background: float, stone: float) -> tuple[float, float, float]:
    """(equivalent diameter, width, height) of the stone in a model-input half, in px."""
    grey = half.mean(axis=2)
    mask = (np.abs(grey - stone) < np.abs(grey - background)).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    assert n == 2, f"one stone expected, {n - 1} regions"
    x, y, w, h, area = stats[1]
    return 2.0 * np.sqrt(area / np.pi), float(w), float(h)


def write_dataset(root: Path) -> Path:
    lines = []
    for sid, (ppm, back, top) in SESSIONS.items():
        raw = root / "images" / "raw" / sid
        raw.mkdir(parents=True)
        (raw / "session_meta.json").write_text(json.dumps({"session_id": sid, "pixels_per_mm": ppm}))
        for k, shape in enumerate(SHAPES_MM):
            stone_id = f"{sid}_{k}"
            for mode, level, stone in (("backlit", back, STONE_BACK), ("toplit", top, STONE_TOP)):
                folder = root / "images" / "processed" / mode
                folder.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / f"{stone_id}.png"), disc_crop(ppm, shape, level, stone))
            lines.append(json.dumps({"stone_id": stone_id, "color": "blue", "clarity": "transparent",
                                     "session_id": sid}))
    (root / "labels.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_a_3mm_disc_is_the_same_size_whatever_the_scale_and_the_crop(tmp_path: Path) -> None:
    ds = open_dataset(write_dataset(tmp_path))
    x = load_crops(ds, ds.labels, SIZE, CROP_MM)
    assert x.shape == (len(SESSIONS) * len(SHAPES_MM), SIZE, SIZE, 6)
    want = DISC_MM * OUT_PPM  # 60 px
    for lab, item in zip(ds.labels, x, strict=True):
        _, back, top = SESSIONS[lab.session_id]
        for half, level, stone in ((item[:, :, :3], back, STONE_BACK), (item[:, :, 3:], top, STONE_TOP)):
            d, w, h = extent_px(half, level, stone)
            assert d == pytest.approx(want, abs=1.0), (lab.stone_id, d)
            assert w == pytest.approx(h, abs=2), (lab.stone_id, w, h)  # a disc stays round
            # Padded with the crop's own background, not black (the corners are outside every crop
            # narrower than the window, and background in the others).
            for corner in (half[0, 0], half[0, -1], half[-1, 0], half[-1, -1]):
                assert np.abs(corner.astype(int) - level).max() <= 2, (lab.stone_id, corner, level)


@pytest.mark.parametrize("ppm", [15.0, 40.0, 80.0])
@pytest.mark.parametrize("shape_mm", [(5.0, 2.5), (2.6, 6.0), (12.0, 4.0)])
def test_aspect_is_kept_never_stretched(ppm: float, shape_mm: tuple[float, float]) -> None:
    """An ellipse 2 x 1 mm stays 2:1 and 40 x 20 px in the input, in a crop of any aspect."""
    img = disc_crop(ppm, shape_mm, 180, 40, axes_mm=(2.0, 1.0))
    out = fit_crop(img, ppm, CROP_MM, SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    _, w, h = extent_px(out, 180, 40)
    assert w == pytest.approx(2.0 * OUT_PPM, abs=2) and h == pytest.approx(1.0 * OUT_PPM, abs=2)


def test_unknown_scale_fits_the_crop_and_keeps_its_aspect() -> None:
    img = disc_crop(30.0, (8.0, 4.0), 200, 50, axes_mm=(3.0, 1.5))  # 240 x 120 px
    out = fit_crop(img, None, CROP_MM, SIZE)
    _, w, h = extent_px(out, 200, 50)
    assert w / h == pytest.approx(2.0, abs=0.08)
    assert w == pytest.approx(3.0 / 8.0 * SIZE, abs=2)  # the crop's longer side fills the window


def test_the_sorters_window_and_a_crops_only_dataset_agree() -> None:
    """Train/serve parity: the sorter's window on a frame and a tight crop of the same frame."""
    ppm = 40.0
    frame = disc_crop(ppm, (30.0, 12.0), 190, 60, offset_mm=(4.3, -1.2))  # a 1200 x 480 frame
    cx, cy = 600 + 4.3 * ppm, 240 - 1.2 * ppm
    served = cut_window(frame, cx, cy, round(CROP_MM * ppm), SIZE)
    r = round(2.0 * ppm)
    tight = frame[round(cy) - r:round(cy) + r, round(cx) - r:round(cx) + r]
    trained = fit_crop(tight, ppm, CROP_MM, SIZE)
    a, b = extent_px(served, 190, 60), extent_px(trained, 190, 60)
    assert a == pytest.approx(b, abs=1.0)
    assert np.abs(served.astype(int) - trained.astype(int)).mean() < 3.0


def test_a_crop_already_at_the_models_window_is_untouched() -> None:
    """What `sorterd sim generate` writes at the model's crop and scale passes through as is."""
    img = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    assert fit_crop(img, OUT_PPM, CROP_MM, SIZE) is img


def test_border_colour_ignores_where_the_stone_touches_the_rim() -> None:
    img = np.full((40, 30, 3), (10, 120, 230), np.uint8)
    img[:, :6] = 0  # the stone touches one side
    assert border_colour(img) == (10.0, 120.0, 230.0)


def test_bad_inputs_say_what_is_allowed() -> None:
    img = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match=r"pixels_per_mm = 0.0: must be > 0"):
        fit_crop(img, 0.0, CROP_MM, SIZE)
    with pytest.raises(ValueError, match=r"crop_mm = -1.0: must be > 0"):
        fit_crop(img, 20.0, -1.0, SIZE)
    with pytest.raises(ValueError, match=r"an empty crop \(0x10 px\)"):
        fit_crop(np.zeros((10, 0, 3), np.uint8), 20.0, CROP_MM, SIZE)
