"""The simulated camera's pixels: stones on the backlight or under the ring light.

Two lighting modes (protocol §2.2, §2.3):

* ``backlit``: backlight panel on, ring light off.  The background is the
  bright panel (a few % vignetting); a stone *multiplies* the panel by its
  transmission, so overlapping stones simply multiply.  Clear stones glow but
  show a dark refraction rim and darker internal facet lines; opaque stones
  are silhouettes.
* ``toplit``: ring light on, backlight off.  The background is flat 18 % gray;
  a stone is its HSV body colour, shaded per facet and towards the light,
  with surface texture, a couple of specular glints and, for clear stones, a
  little of the dark channel beneath showing through.  Stones are drawn over
  the background (and each other) with anti-aliased coverage.

Coordinates: pixel centres sit at integer (column, row); x_mm = column /
px_per_mm along the channel, y_mm = row / px_per_mm across it, origin at the
top-left of the frame.

Speed: a stone's look never changes, so it is rendered once per
(stone, px_per_mm) into a small premultiplied patch and cached; a frame is a
cached background, one sub-pixel shift and one blend per stone, and sensor
noise sliced at a random offset from a pre-generated bank.

Noise model: ``noise_sigma`` is the per-frame standard deviation of the
sensor noise, which is *uniform* on +-sqrt(3) sigma rather than Gaussian.
The segmentation contract promises that an empty pixel of a frame differs
from a (noisy) reference by < 4 sigma in 99.9 % of pixels.  The difference
of two frames has std sqrt(2) sigma, so with Gaussian noise ~1.4 % of pixels
(max over B, G, R) would exceed 4 sigma, and a truncated Gaussian still
~0.2 % after 8-bit rounding.  Uniform noise keeps |frame - reference| <=
2 sqrt(3) sigma + 1 DN of rounding, i.e. < 4 sigma always for sigma >= 2 DN
(the default); at 2 DN it looks the same as Gaussian noise.

Thread safety: the caches are shared by all threads and guarded by
``_CACHE_LOCK``; the cached arrays are never written after they are built.
"""

from __future__ import annotations

import colorsys
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from sorterd.domain import LIGHT_MODES
from sorterd.sim.stones import Appearance, StoneSpec

# -- look constants (why each value: see where it is used) ----------------------
_SUPERSAMPLE = 4  # coverage of the outline from a 4x4 supersampled fill
_MARGIN_PX = 3  # empty border around a patch: room for the sub-pixel shift
_VIGNETTE = 0.05  # backlight panel: corners 5 % darker than the centre
_PANEL_RAMP = 0.01  # edge-lit panel: 1 % brighter on one side
_RIM_DARKENING = 0.85  # refraction rim of a clear stone: 15 % of the body light
_FACET_LINE_DARKENING = 0.5
_DARK_BENEATH_DN = 28.0  # the unlit acrylic channel seen through a clear stone
_SEE_THROUGH = 0.12  # how much of it shows through a fully transparent stone
_LIGHT_DIR = (-0.6, -0.8)  # toplit shading: the upper-left side is brighter
_MAX_TRANSMISSION = 0.98
_FRACTURE_DARKENING = 0.7  # backlit: a crack line passes 30 % of the body light
_FRACTURE_GLINT = 0.45  # toplit: a crack line is 45 % of the way to pale gray
_FRACTURE_GLINT_DN = 205.0
_LOOK_CACHE_SIZE = 128  # stones at 20 px/mm (fewer at finer scales); a frame holds at most ~10, a pair reuses them

_CACHE_LOCK = threading.Lock()
_LOOKS: OrderedDict[tuple[object, ...], dict[str, _Look]] = OrderedDict()
_BACKGROUNDS: dict[tuple[str, Optics], np.ndarray] = {}
_NOISE_BANKS: dict[tuple[int, int, float], np.ndarray] = {}


@dataclass(frozen=True)
class Optics:
    """The simulated camera and lights.

    backlight_level: DN of the empty backlit panel at the frame centre.
    toplit_background: DN of the 18 % gray channel under the ring light
        (sRGB 118) at ring_gain 1.
    ring_gain: ring-light intensity factor (LED ageing, driver drift).
    wb_gains: (B, G, R) multipliers of the whole image (white-balance drift).
    noise_sigma: per-frame sensor noise std in DN (bounded, see module doc).
    lens_blur_px: Gaussian blur sigma of a dirty lens or a focus error, 0 = clean.
    backlight_tint: (B, G, R) colour of the backlight panel's LEDs (1, 1, 1 = white);
        only the backlit frame sees it.
    toplit_tint: (B, G, R) colour of the grey card under the ring light (1, 1, 1 =
        neutral 18 % grey); the background only, not the stones.
    """

    width_px: int = 640
    height_px: int = 160
    px_per_mm: float = 20.0
    backlight_level: float = 225.0
    toplit_background: float = 118.0
    ring_gain: float = 1.0
    wb_gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    noise_sigma: float = 2.0
    lens_blur_px: float = 0.0
    backlight_tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    toplit_tint: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        _require(self.width_px >= 16 and self.height_px >= 16, "width_px/height_px",
                 (self.width_px, self.height_px), ">= 16")
        _require(self.px_per_mm > 0, "px_per_mm", self.px_per_mm, "> 0")
        _require(0 < self.backlight_level <= 255, "backlight_level", self.backlight_level, "in (0, 255]")
        _require(0 < self.toplit_background <= 255, "toplit_background", self.toplit_background,
                 "in (0, 255]")
        _require(self.ring_gain > 0, "ring_gain", self.ring_gain, "> 0")
        _require(len(self.wb_gains) == 3 and all(g > 0 for g in self.wb_gains), "wb_gains",
                 self.wb_gains, "three positive (B, G, R) gains")
        _require(self.noise_sigma >= 0, "noise_sigma", self.noise_sigma, ">= 0")
        _require(self.lens_blur_px >= 0, "lens_blur_px", self.lens_blur_px, ">= 0")
        for name in ("backlight_tint", "toplit_tint"):
            tint = getattr(self, name)
            _require(len(tint) == 3 and all(0 < g <= 4 for g in tint), name, tint,
                     "three (B, G, R) gains in (0, 4]")


def _require(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"Optics.{name} = {value!r}: must be {rule}")


@dataclass(frozen=True)
class _Look:
    """One stone in one mode, ready to blend: frame = frame * keep + paint * gains.

    keep: (h, w, 3) float32, the fraction of the light beneath that stays:
        backlit, the stone's transmission (1 outside it), so overlapping
        stones multiply; toplit, 1 - coverage.
    paint: (h, w, 3) float32, toplit colour * coverage (BGR DN at ring_gain
        1, white balance 1); None for backlit, where the stone emits nothing.
    anchor: the stone's centroid in patch pixel coordinates (x, y).
    Kept as separate contiguous 3-channel arrays: blending strided 4-channel
    views costs ~3x more in numpy.
    """

    keep: np.ndarray
    paint: np.ndarray | None
    anchor: tuple[float, float]


@dataclass(frozen=True)
class _Geometry:
    """Where a stone is inside its patch, shared by both modes' looks."""

    coverage: np.ndarray  # (h, w) 0..1, anti-aliased outline
    depth: np.ndarray  # (h, w) px inside the outline (0 outside)
    u: np.ndarray  # (h, w) px from the centroid, along x
    v: np.ndarray  # (h, w) px from the centroid, along y
    facets: np.ndarray  # (h, w) facet label (Voronoi cells of points in the stone)
    n_facets: int
    facet_lines: np.ndarray  # (h, w) 0..1, soft lines where facets meet
    anchor: tuple[float, float]
    radius_px: float  # farthest outline vertex from the centroid


# -- public API -----------------------------------------------------------------


def render_frame(mode: str, placed: Sequence[tuple[StoneSpec, float, float]],
                 optics: Optics, rng: np.random.Generator) -> np.ndarray:
    """One H x W x 3 uint8 BGR frame with each stone's centroid at (x_mm, y_mm).

    Stones may lie partly or wholly outside the frame and may overlap.  The
    stones' look is fixed by their appearance; only the noise comes from rng.
    """
    _check_mode(mode)
    bg = _background(mode, optics)
    noise = _noise_window(optics, rng)
    ppm = optics.px_per_mm
    stones = [(_looks(s, ppm)[mode], x * ppm, y * ppm) for s, x, y in placed]
    gains = _toplit_gains(optics)
    if optics.lens_blur_px > 0:
        return _render_blurred(bg, stones, gains, optics.lens_blur_px, noise)
    # Only the stones' regions need float work: the rest is background + noise.
    out = _quantise(bg, noise)
    for (r0, r1, c0, c1), group in _regions(stones, bg.shape[0], bg.shape[1]):
        region = bg[r0:r1, c0:c1].copy()
        for look, x_px, y_px in group:
            _blend(region, look, x_px - c0, y_px - r0, gains)
        out[r0:r1, c0:c1] = _quantise(region, None if noise is None else noise[r0:r1, c0:c1])
    return out


def _render_blurred(bg: np.ndarray, stones: list[tuple[_Look, float, float]],
                    gains: np.ndarray, blur_px: float, noise: np.ndarray | None) -> np.ndarray:
    """Dirty lens: the whole frame is smeared, so it is built whole in float."""
    frame = bg.copy()
    for look, x_px, y_px in stones:
        _blend(frame, look, x_px, y_px, gains)
    # Reflecting the border keeps a uniform background uniform: the reference
    # (blurred the same way) still matches the empty parts of the frame.
    frame = cv2.GaussianBlur(frame, (0, 0), blur_px, borderType=cv2.BORDER_REFLECT)
    return _quantise(frame, noise)


def render_reference(mode: str, optics: Optics, rng: np.random.Generator) -> np.ndarray:
    """The empty channel in that mode: same background model, fresh noise."""
    return render_frame(mode, (), optics, rng)


def clear_look_cache() -> None:
    """Forget every cached stone look (tests; a new lot with reused sim_ids)."""
    with _CACHE_LOCK:
        _LOOKS.clear()


def _check_mode(mode: str) -> None:
    if mode not in LIGHT_MODES:
        raise ValueError(f"Bad mode {mode!r}: valid modes are {list(LIGHT_MODES)}")


# -- background and noise -------------------------------------------------------


def _background(mode: str, optics: Optics) -> np.ndarray:
    key = (mode, optics)
    with _CACHE_LOCK:
        bg = _BACKGROUNDS.get(key)
    if bg is None:
        bg = _backlit_panel(optics) if mode == "backlit" else _toplit_gray(optics)
        bg.setflags(write=False)
        with _CACHE_LOCK:
            if len(_BACKGROUNDS) > 16:
                _BACKGROUNDS.clear()
            _BACKGROUNDS[key] = bg
    return bg


def _backlit_panel(optics: Optics) -> np.ndarray:
    """Smooth, deterministic panel: radial vignetting plus a slight side ramp."""
    h, w = optics.height_px, optics.width_px
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) / (cx**2 + cy**2)
    panel = optics.backlight_level * (1.0 - _VIGNETTE * r2) * (1.0 + _PANEL_RAMP * (x / w - 0.5))
    tint = np.asarray(optics.wb_gains, np.float32) * np.asarray(optics.backlight_tint, np.float32)
    return panel[:, :, None] * tint


def _toplit_gray(optics: Optics) -> np.ndarray:
    level = optics.toplit_background * _toplit_gains(optics) * np.asarray(optics.toplit_tint, np.float32)
    # ascontiguousarray: astype of a broadcast view keeps an odd memory order,
    # which makes every OpenCV call on the frame copy it first (5x slower).
    return np.ascontiguousarray(np.broadcast_to(level, (optics.height_px, optics.width_px, 3)),
                                dtype=np.float32)


def _toplit_gains(optics: Optics) -> np.ndarray:
    """Reflected light scales with the ring light and the white balance."""
    return (optics.ring_gain * np.asarray(optics.wb_gains)).astype(np.float32)


def _noise_window(optics: Optics, rng: np.random.Generator) -> np.ndarray | None:
    """This frame's sensor noise: a random frame-sized window of the bank."""
    if optics.noise_sigma == 0:
        return None
    h, w = optics.height_px, optics.width_px
    bank = _noise_bank(h, w, optics.noise_sigma)
    oy, ox = int(rng.integers(0, h + 1)), int(rng.integers(0, w + 1))
    return bank[oy:oy + h, ox:ox + w]


def _quantise(image: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    """Float DN image (+ noise) to uint8, rounded and saturated in one pass."""
    if noise is None:
        return np.asarray(cv2.convertScaleAbs(image))  # image >= 0, so abs is a no-op
    return np.asarray(cv2.add(image, noise, dtype=cv2.CV_8U))


def _noise_bank(h: int, w: int, sigma: float) -> np.ndarray:
    """A (2h, 2w, 3) field of uniform noise of std sigma; frames take random windows.

    Seeded from the frame size so that the rng passed to render_frame alone
    decides a run's noise (reproducible runs, whatever was rendered before).
    """
    key = (h, w, sigma)
    with _CACHE_LOCK:
        bank = _NOISE_BANKS.get(key)
    if bank is None:
        unit = np.random.default_rng(h * 100003 + w).uniform(-math.sqrt(3), math.sqrt(3),
                                                             (2 * h, 2 * w, 3))
        bank = (unit * sigma).astype(np.float32)
        bank.setflags(write=False)
        with _CACHE_LOCK:
            if len(_NOISE_BANKS) > 4:
                _NOISE_BANKS.clear()
            _NOISE_BANKS[key] = bank
    return bank


# -- placing a stone --------------------------------------------------------------


def _patch_box(look: _Look, x_px: float, y_px: float) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) the look's patch covers, centroid at (x_px, y_px)."""
    ox, oy = math.floor(x_px - look.anchor[0]), math.floor(y_px - look.anchor[1])
    h, w = look.keep.shape[:2]
    return oy, oy + h, ox, ox + w


def _regions(stones: list[tuple[_Look, float, float]], height: int, width: int,
             ) -> list[tuple[tuple[int, int, int, int], list[tuple[_Look, float, float]]]]:
    """Group stones whose patches overlap along the channel; one box per group.

    Touching or overlapping stones must be blended into the same float region
    (backlit attenuations multiply, toplit stones cover each other).  Within a
    group the stones keep the caller's order, which decides what lies on top.
    """
    boxes = []
    for index, item in enumerate(stones):
        r0, r1, c0, c1 = _patch_box(*item)
        r0, r1, c0, c1 = max(r0, 0), min(r1, height), max(c0, 0), min(c1, width)
        if r0 < r1 and c0 < c1:  # else wholly outside the frame
            boxes.append(((r0, r1, c0, c1), index))
    boxes.sort(key=lambda b: b[0][2])
    merged: list[tuple[tuple[int, int, int, int], list[int]]] = []
    for (r0, r1, c0, c1), index in boxes:
        if merged and c0 < merged[-1][0][3]:
            (g0, g1, gc0, gc1), members = merged[-1]
            merged[-1] = ((min(g0, r0), max(g1, r1), gc0, max(gc1, c1)), [*members, index])
        else:
            merged.append(((r0, r1, c0, c1), [index]))
    return [(box, [stones[i] for i in sorted(members)]) for box, members in merged]


def _blend(frame: np.ndarray, look: _Look, x_px: float, y_px: float, gains: np.ndarray) -> None:
    """Blend one cached look into a float image, centroid at (x_px, y_px) of it."""
    oy, _, ox, _ = _patch_box(look, x_px, y_px)
    h, w = look.keep.shape[:2]
    fh, fw = frame.shape[:2]
    r0, r1, c0, c1 = max(oy, 0), min(oy + h, fh), max(ox, 0), min(ox + w, fw)
    if r0 >= r1 or c0 >= c1:
        return  # wholly outside
    dx, dy = x_px - look.anchor[0] - ox, y_px - look.anchor[1] - oy
    rows, cols = slice(r0 - oy, r1 - oy), slice(c0 - ox, c1 - ox)
    region = frame[r0:r1, c0:c1]
    np.multiply(region, _shift_subpixel(look.keep, dx, dy, 1.0)[rows, cols], out=region)
    if look.paint is None:
        return
    paint = _shift_subpixel(look.paint, dx, dy, 0.0)[rows, cols]
    if np.all(gains == 1.0):
        region += paint  # the common case: skip the per-channel scaling
    else:
        region += paint * gains


def _shift_subpixel(layer: np.ndarray, dx: float, dy: float, outside: float) -> np.ndarray:
    """Move a patch by a fraction of a pixel (bilinear); `outside` fills the gap."""
    if abs(dx) < 1e-3 and abs(dy) < 1e-3:
        return layer
    h, w = layer.shape[:2]
    m = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]], np.float32)
    return np.asarray(cv2.warpAffine(layer, m, (w, h), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=(outside,) * 4))


def _looks(stone: StoneSpec, px_per_mm: float) -> dict[str, _Look]:
    """Both modes' looks of a stone, from the cache or rendered now.

    The key holds the whole look-defining content, not only sim_id, so two
    different stones that share an id (tests, a second lot) never collide.
    """
    key = (stone.sim_id, px_per_mm, stone.appearance, stone.outline_mm.tobytes())
    with _CACHE_LOCK:
        looks = _LOOKS.get(key)
        if looks is not None:
            _LOOKS.move_to_end(key)
            return looks
    looks = _build_looks(stone.outline_mm, stone.appearance, px_per_mm)
    with _CACHE_LOCK:
        _LOOKS[key] = looks
        # A look's size grows with the scale squared: at 70 px/mm 128 of them held ~0.6 GB.
        while len(_LOOKS) > max(16, int(_LOOK_CACHE_SIZE * (20.0 / px_per_mm) ** 2)):
            _LOOKS.popitem(last=False)
    return looks


def _build_looks(outline_mm: np.ndarray, ap: Appearance, px_per_mm: float) -> dict[str, _Look]:
    # One generator drives geometry then both modes in a fixed order, so the
    # pattern depends only on texture_seed (and the outline and scale).
    rng = np.random.default_rng(ap.texture_seed)
    geo = _geometry(outline_mm * px_per_mm, rng)
    size_px = _short_side(outline_mm) * px_per_mm
    transmission = _backlit_transmission(geo, ap, rng, size_px, px_per_mm)
    colour = _toplit_colour(geo, ap, rng, px_per_mm)
    a = geo.coverage[:, :, None]
    # Premultiplied by coverage: anti-aliased edges, and a bilinear shift of
    # a premultiplied patch stays correct.
    backlit = _Look(_frozen(1.0 - a * (1.0 - transmission)), None, geo.anchor)
    toplit = _Look(_frozen(np.repeat(1.0 - a, 3, axis=2)), _frozen(colour * a), geo.anchor)
    return {"backlit": backlit, "toplit": toplit}


def _frozen(a: np.ndarray) -> np.ndarray:
    """Contiguous float32, read-only: cached looks are shared between threads."""
    out = np.ascontiguousarray(a, dtype=np.float32)
    out.setflags(write=False)
    return out


def _short_side(outline_mm: np.ndarray) -> float:
    _, (w, h), _ = cv2.minAreaRect(outline_mm.astype(np.float32))
    return float(min(w, h))


# -- geometry -----------------------------------------------------------------------


def _geometry(pts_px: np.ndarray, rng: np.random.Generator) -> _Geometry:
    lo = np.floor(pts_px.min(axis=0)) - _MARGIN_PX
    hi = np.ceil(pts_px.max(axis=0)) + _MARGIN_PX
    w, h = (hi - lo + 1).astype(int)
    local = pts_px - lo
    coverage = _coverage(local, h, w)
    depth = cv2.distanceTransform((coverage >= 0.5).astype(np.uint8), cv2.DIST_L2,
                                  cv2.DIST_MASK_PRECISE)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = xx - np.float32(-lo[0]), yy - np.float32(-lo[1])
    facets, n = _voronoi_facets(depth, xx, yy, rng)
    return _Geometry(
        coverage=coverage, depth=depth, u=u, v=v, facets=facets, n_facets=n,
        facet_lines=_facet_lines(facets, depth), anchor=(float(-lo[0]), float(-lo[1])),
        radius_px=float(np.hypot(pts_px[:, 0], pts_px[:, 1]).max()),
    )


def _coverage(local: np.ndarray, h: int, w: int) -> np.ndarray:
    """Fraction of each pixel inside the polygon (box-filtered supersampling)."""
    s = _SUPERSAMPLE
    fine = np.zeros((h * s, w * s), np.uint8)
    # Pixel centres are integers; a fine pixel's centre maps to (p + 0.5) s - 0.5.
    q = ((local + 0.5) * s - 0.5) * 16.0
    cv2.fillPoly(fine, [np.round(q).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
    return cv2.resize(fine, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _voronoi_facets(depth: np.ndarray, xx: np.ndarray, yy: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Split the stone into a few flat-looking facets: Voronoi cells of inner points."""
    inside = np.flatnonzero(depth.ravel() >= 1.0)
    if inside.size == 0:  # sub-pixel speck at a coarse scale: one facet
        return np.zeros(depth.shape, np.int32), 1
    n = int(np.clip(2 + inside.size // 900, 3, 7))  # ~3 facets at 1 mm, 7 at 5 mm
    seeds = rng.choice(inside, size=min(n, inside.size), replace=False)
    sy, sx = np.divmod(seeds, depth.shape[1])
    d2 = (xx[None] - sx[:, None, None]) ** 2 + (yy[None] - sy[:, None, None]) ** 2
    return np.argmin(d2, axis=0).astype(np.int32), len(seeds)


def _facet_lines(facets: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Soft 1 px lines where two facets meet, inside the stone only."""
    hard = np.zeros(facets.shape, np.float32)
    hard[:, :-1] += facets[:, :-1] != facets[:, 1:]
    hard[:-1, :] += facets[:-1, :] != facets[1:, :]
    soft = cv2.GaussianBlur(np.minimum(hard, 1.0), (0, 0), 0.6)
    return (np.clip(soft * 1.6, 0.0, 1.0) * (depth >= 2.0)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Unit-std low-frequency noise: a coarse random grid, bicubically enlarged."""
    h, w = shape
    cell = max(round(cell_px), 2)
    coarse = rng.standard_normal((h // cell + 3, w // cell + 3)).astype(np.float32)
    big = cv2.resize(coarse, (coarse.shape[1] * cell, coarse.shape[0] * cell),
                     interpolation=cv2.INTER_CUBIC)[:h, :w]
    return (big - big.mean()) / max(float(big.std()), 1e-6)


def _zoned(geo: _Geometry, base: float, delta: float, angle_deg: float, offset: float = 0.0) -> np.ndarray:
    """A per-pixel parameter: base, plus delta on one side of the zone line."""
    if delta == 0.0:
        return np.full(geo.u.shape, base, np.float32)
    return (base + delta * _zone_weight(geo, angle_deg, offset)).astype(np.float32)


def _zone_weight(geo: _Geometry, angle_deg: float, offset: float) -> np.ndarray:
    """0..1 per pixel: 1 inside the second zone, a ~2 px soft boundary.

    The boundary runs through the centroid moved by offset x radius along the
    zone direction, so offset > 0 leaves the second zone the smaller part.
    """
    a = math.radians(angle_deg)
    side = geo.u * math.cos(a) + geo.v * math.sin(a) - offset * geo.radius_px
    return np.clip(0.5 + side / 2.0, 0.0, 1.0)


def _fracture_mask(geo: _Geometry, ap: Appearance, px_per_mm: float) -> np.ndarray | None:
    """0..1 per pixel on the fracture lines of a damaged stone; None if it has none.

    Drawn from its own generator (texture_seed, 7): the same lines in both
    modes, and the look of undamaged stones is untouched.
    """
    if ap.fractures <= 0:
        return None
    rng = np.random.default_rng([ap.texture_seed, 7])
    h, w = geo.u.shape
    fine = np.zeros((h * 4, w * 4), np.uint8)
    inner = np.argwhere(geo.depth >= 2.0)
    if inner.size == 0:
        return None
    thickness = max(1, round(4 * max(0.8, 0.05 * px_per_mm)))
    for _ in range(ap.fractures):
        cy, cx = inner[int(rng.integers(len(inner)))]
        theta = rng.uniform(0.0, math.pi)
        # A crack wanders a little: three segments with jittered direction.
        pts, x, y = [], float(cx) - math.cos(theta) * geo.radius_px, float(cy) - math.sin(theta) * geo.radius_px
        step = 2.0 * geo.radius_px / 3.0
        for _k in range(4):
            pts.append((x * 4 + 2, y * 4 + 2))
            t = theta + rng.normal(0.0, 0.25)
            x, y = x + math.cos(t) * step, y + math.sin(t) * step
        cv2.polylines(fine, [np.round(np.array(pts)).astype(np.int32)], False, 255, thickness, cv2.LINE_AA)
    mask = cv2.resize(fine, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    return mask * (geo.depth >= 1.0)


# -- backlit -----------------------------------------------------------------------


def _backlit_transmission(geo: _Geometry, ap: Appearance, rng: np.random.Generator,
                          size_px: float, px_per_mm: float) -> np.ndarray:
    """(h, w, 3) fraction of the panel's light passing each pixel of the stone."""
    t = np.clip(_zoned(geo, ap.transmission, ap.zone_transmission_delta, ap.zone_angle_deg,
                       ap.zone_offset), 0, 1)
    # Thin edges let more light through than the thick middle (Beer-Lambert).
    rel_depth = np.clip(geo.depth / max(float(geo.depth.max()), 1.0), 0.0, 1.0)
    t = t ** (0.75 + 0.5 * rel_depth)
    # Cloudy at two scales: broad milky zones plus finer patches.
    mottle = (0.8 * _smooth_noise(rng, t.shape, 0.9 * px_per_mm)
              + 0.6 * _smooth_noise(rng, t.shape, 0.3 * px_per_mm))
    t = t * np.clip(1.0 + 0.6 * ap.texture * mottle, 0.3, 1.7)
    facet_gain = 1.0 + 0.06 * rng.standard_normal(geo.n_facets).astype(np.float32)
    t = t * facet_gain[geo.facets] * _rim(geo, size_px / px_per_mm, px_per_mm)
    # Milky stones scatter light, which washes out the facet lines.
    clear = float(np.clip((ap.transmission - 0.2) / 0.5, 0.3, 1.0))
    t = t * (1.0 - _FACET_LINE_DARKENING * clear * geo.facet_lines)
    cracks = _fracture_mask(geo, ap, px_per_mm)
    if cracks is not None:
        t = t * (1.0 - _FRACTURE_DARKENING * cracks)  # a crack scatters the light away
    return np.clip(t[:, :, None] * _blue_tint(ap), 0.0, _MAX_TRANSMISSION)


def _rim(geo: _Geometry, size_mm: float, px_per_mm: float) -> np.ndarray:
    """Refraction rim: light at the stone's edge is bent away from the lens.

    1-3 px wide at 20 px/mm, wider on bigger stones.
    """
    width = (0.03 + 0.024 * size_mm) * px_per_mm
    profile = np.exp(-(((geo.depth - 0.5) / width) ** 2))
    return (1.0 - _RIM_DARKENING * profile * (geo.depth > 0)).astype(np.float32)


def _blue_tint(ap: Appearance) -> np.ndarray:
    """Light through a blue stone is a little bluer; the mean stays `transmission`."""
    k = 0.15 * ap.sat
    return np.array([1.0 + k, 1.0, 1.0 - k], np.float32)


# -- toplit ------------------------------------------------------------------------


def _toplit_colour(geo: _Geometry, ap: Appearance, rng: np.random.Generator,
                   px_per_mm: float) -> np.ndarray:
    """(h, w, 3) BGR DN of the stone under the ring light (gain 1, neutral WB)."""
    val = np.clip(_zoned(geo, ap.val, ap.zone_val_delta, ap.zone_angle_deg, ap.zone_offset), 0.02, 1.0)
    colour = val[:, :, None] * _body_hue_bgr(geo, ap) * _shading(geo, ap, rng, px_per_mm)[:, :, None]
    colour = _see_through(colour, geo, ap, rng, px_per_mm)
    cracks = _fracture_mask(geo, ap, px_per_mm)
    if cracks is not None:  # fracture planes reflect the ring light as pale lines
        colour = colour + (_FRACTURE_GLINT_DN - colour) * (_FRACTURE_GLINT * cracks)[:, :, None]
    glint = _glints(geo, rng, px_per_mm)[:, :, None]
    return np.clip(colour + (250.0 - colour) * glint, 0.0, 255.0)


def _hue_bgr(hue_deg: float, sat: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, float(np.clip(sat, 0.0, 1.0)), 1.0)[::-1],
                    np.float32) * 255.0


def _body_hue_bgr(geo: _Geometry, ap: Appearance) -> np.ndarray:
    """Full-value body colour: (3,) for one colour, (h, w, 3) for a two-colour stone."""
    base = _hue_bgr(ap.hue_deg, ap.sat)
    if ap.zone_hue_delta_deg == 0.0 and ap.zone_sat_delta == 0.0:
        return base
    zone = _hue_bgr(ap.hue_deg + ap.zone_hue_delta_deg, ap.sat + ap.zone_sat_delta)
    weight = _zone_weight(geo, ap.zone_angle_deg, ap.zone_offset)[:, :, None]
    return (base + (zone - base) * weight).astype(np.float32)


def _shading(geo: _Geometry, ap: Appearance, rng: np.random.Generator, px_per_mm: float) -> np.ndarray:
    """Brightness factor: per-facet tilt, a gradient towards the light, rough texture."""
    facet = (0.9 + 0.22 * rng.random(geo.n_facets)).astype(np.float32)[geo.facets]
    toward = (geo.u * _LIGHT_DIR[0] + geo.v * _LIGHT_DIR[1]) / max(geo.radius_px, 1.0)
    directional = 1.0 + 0.06 * toward  # brighter on the side facing the light
    mottle = _smooth_noise(rng, geo.u.shape, 0.25 * px_per_mm)
    grain = cv2.GaussianBlur(rng.standard_normal(geo.u.shape).astype(np.float32), (0, 0), 0.7)
    texture = 1.0 + ap.texture * (0.1 * mottle + 0.12 * grain)
    return (facet * directional * texture).astype(np.float32)


def _see_through(colour: np.ndarray, geo: _Geometry, ap: Appearance, rng: np.random.Generator,
                 px_per_mm: float) -> np.ndarray:
    """Clear stones let a little of the dark channel beneath show, unevenly."""
    patchy = np.clip(0.5 + 0.5 * _smooth_noise(rng, geo.u.shape, 0.5 * px_per_mm), 0.0, 1.0)
    k = (_SEE_THROUGH * ap.transmission * patchy)[:, :, None]
    return colour * (1.0 - k) + _DARK_BENEATH_DN * k


def _glints(geo: _Geometry, rng: np.random.Generator, px_per_mm: float) -> np.ndarray:
    """A couple of small specular highlights on facets facing the ring light."""
    glint = np.zeros(geo.u.shape, np.float32)
    inner = np.flatnonzero(geo.depth.ravel() >= 2.0)
    if inner.size == 0:
        return glint
    sigma = max(0.9, 0.06 * px_per_mm)
    for idx in rng.choice(inner, size=int(rng.integers(1, 4))):
        cy, cx = divmod(int(idx), geo.u.shape[1])
        r2 = (geo.u - geo.u[cy, cx]) ** 2 + (geo.v - geo.v[cy, cx]) ** 2
        glint = np.maximum(glint, float(rng.uniform(0.5, 0.9)) * np.exp(-r2 / (2 * sigma**2)))
    return glint * (geo.depth >= 1.0)
