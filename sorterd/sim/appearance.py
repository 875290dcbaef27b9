"""What a simulated stone looks like: its outline and its optical properties.

The class clusters follow protocol §3.2: colour is judged under the ring light
on 18 % gray (HSV of the body), clarity under the backlight (transmission).
Every class is a box of parameter ranges; values are drawn from a Beta(2, 2)
inside the box, so most stones sit near the class centre with a natural
spread and none crosses into a neighbouring class.  The boxes are module
constants (`COLOR_CLASSES`, `CLARITY_CLASSES`) and `sample_appearance` takes
replacements, so borderline or drifted lots can be modelled by passing
shifted or widened boxes without touching this code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

import cv2
import numpy as np

from sorterd.sim.stones import Appearance


@dataclass(frozen=True)
class ColorClass:
    """Ranges (lo, hi) of the toplit body colour of one colour class."""

    hue_deg: tuple[float, float]
    sat: tuple[float, float]
    val: tuple[float, float]

    @property
    def centre(self) -> tuple[float, float, float]:
        return (_mid(self.hue_deg), _mid(self.sat), _mid(self.val))


@dataclass(frozen=True)
class ClarityClass:
    """Ranges (lo, hi) of backlight transmission and surface mottling."""

    transmission: tuple[float, float]
    texture: tuple[float, float]

    @property
    def centre(self) -> tuple[float, float]:
        return (_mid(self.transmission), _mid(self.texture))


# §3.2.1, toplit HSV on 18 % gray (value 1.0 = 255 DN at ring_gain 1; the gray
# itself is 118 DN = value 0.46).  Light stones are kept well above the gray
# so that a pale, see-through stone still stands out from the background.
COLOR_CLASSES: Mapping[str, ColorClass] = MappingProxyType({
    "blue": ColorClass(hue_deg=(215.0, 235.0), sat=(0.55, 0.90), val=(0.35, 0.70)),
    "light": ColorClass(hue_deg=(200.0, 230.0), sat=(0.08, 0.30), val=(0.68, 0.92)),
    "inky": ColorClass(hue_deg=(215.0, 245.0), sat=(0.35, 0.75), val=(0.06, 0.20)),
})

# §3.2.2, fraction of the panel's light that passes the stone body.  Milky
# translucent stones get the strongest mottling ("unevenly lit").  Clear
# stones start well above 0.6 because their dark refraction rim pulls the
# whole-stone mean down (most on 1 mm stones), and the >60 % rule is applied
# to what the camera sees.
CLARITY_CLASSES: Mapping[str, ClarityClass] = MappingProxyType({
    "transparent": ClarityClass(transmission=(0.76, 0.93), texture=(0.08, 0.22)),
    "translucent": ClarityClass(transmission=(0.28, 0.52), texture=(0.30, 0.55)),
    "opaque": ClarityClass(transmission=(0.01, 0.06), texture=(0.20, 0.45)),
})

MIN_SOLIDITY = 0.9  # one stone; two touching stones fall below this
MAX_NOTCH = 0.06  # deepest concavity / sqrt(area); the segmenter's cluster cue is 0.12
MAX_ASPECT = 1.6
VERTICES = (8, 16)
_MAX_TRIES = 200

_C = TypeVar("_C", ColorClass, ClarityClass)


def _mid(r: tuple[float, float]) -> float:
    return 0.5 * (r[0] + r[1])


def _draw(rng: np.random.Generator, r: tuple[float, float]) -> float:
    """Beta(2, 2) inside [lo, hi]: centred, bounded, with a natural spread."""
    return float(r[0] + (r[1] - r[0]) * rng.beta(2.0, 2.0))


# -- optical look ---------------------------------------------------------------


def sample_appearance(
    color: str,
    clarity: str,
    rng: np.random.Generator,
    color_classes: Mapping[str, ColorClass] = COLOR_CLASSES,
    clarity_classes: Mapping[str, ClarityClass] = CLARITY_CLASSES,
) -> Appearance:
    """Draw one stone's look from its class boxes (§3.2); no mixed zones."""
    col = _lookup(color_classes, color, "color")
    cla = _lookup(clarity_classes, clarity, "clarity")
    return Appearance(
        hue_deg=_draw(rng, col.hue_deg) % 360.0,
        sat=_draw(rng, col.sat),
        val=_draw(rng, col.val),
        transmission=_draw(rng, cla.transmission),
        texture=_draw(rng, cla.texture),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _lookup(classes: Mapping[str, _C], name: str, what: str) -> _C:
    if name not in classes:
        raise ValueError(f"Bad {what} {name!r}: valid {what} classes are {sorted(classes)}")
    return classes[name]


def make_stone_look(
    color: str, clarity: str, size_mm: float, rng: np.random.Generator,
) -> tuple[np.ndarray, float, float, Appearance]:
    """Outline and appearance of one new stone: (outline_mm, size_mm, length_mm, look)."""
    outline, size, length = sample_outline(size_mm, rng)
    return outline, size, length, sample_appearance(color, clarity, rng)


# -- outline -------------------------------------------------------------------


def sample_outline(size_mm: float, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """A rough-crystal outline whose sieve size (min-area-rect short side) is size_mm.

    Returns (outline (K, 2) float64 in mm around its centroid, size_mm, length_mm),
    both sizes measured on the returned polygon.
    """
    if not size_mm > 0:
        raise ValueError(f"Bad size_mm {size_mm!r}: must be > 0")
    poly = _acceptable_polygon(rng)
    poly = poly - polygon_centroid(poly)
    short, _ = min_rect_sides(poly)
    poly = poly * (size_mm / short)
    short, long = min_rect_sides(poly)
    return poly, short, long


def chip_outline(outline_mm: np.ndarray, chips: int, rng: np.random.Generator,
                 ) -> tuple[np.ndarray, float, float]:
    """A broken stone (§3.2.3 damaged): `chips` deep fracture faces cut off the outline.

    Returns (outline re-centred on its centroid, size_mm, length_mm), both
    measured after the break.  A break that would leave something the
    segmenter takes for two stones (or a sliver) is drawn again; after a few
    tries the stone stays as it was.
    """
    for _ in range(20):
        poly = outline_mm.copy()
        for _k in range(chips):
            poly = _cut_face(poly, rng, depth=(0.5, 0.75))
        if len(poly) >= 3 and _is_plausible_shape(poly):
            poly = poly - polygon_centroid(poly)
            short, long = min_rect_sides(poly)
            return poly, short, long
    short, long = min_rect_sides(outline_mm)
    return outline_mm, short, long


def _acceptable_polygon(rng: np.random.Generator) -> np.ndarray:
    """Redraw until the shape is one plausible stone (the checks rarely fail)."""
    for _ in range(_MAX_TRIES):
        poly = _raw_polygon(rng)
        if _is_plausible_stone(poly):
            return poly
    raise RuntimeError("could not draw a plausible stone outline")  # pragma: no cover


def _raw_polygon(rng: np.random.Generator) -> np.ndarray:
    """Jittered star-shaped polygon, stretched, turned, with cleavage faces cut off."""
    k = int(rng.integers(7, 13))
    step = 2.0 * np.pi / k
    angles = np.arange(k) * step + rng.uniform(-0.35, 0.35, k) * step
    radii = 1.0 + rng.uniform(-0.12, 0.12, k)
    poly = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    poly[:, 0] *= rng.uniform(1.0, 1.5)  # elongated crystals
    poly = poly @ _rotation(rng.uniform(0.0, np.pi)).T
    for _ in range(int(rng.integers(1, 3))):
        poly = _cut_face(poly, rng)
    return poly


def _rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _cut_face(poly: np.ndarray, rng: np.random.Generator,
              depth: tuple[float, float] = (0.72, 0.9)) -> np.ndarray:
    """Clip by a half-plane: a flat fracture / crystal face (Sutherland-Hodgman).

    depth: where the cut line sits, as a fraction of the farthest vertex in
    that direction (lower = a bigger piece broken off).
    """
    phi = rng.uniform(0.0, 2.0 * np.pi)
    normal = np.array([np.cos(phi), np.sin(phi)])
    proj = poly @ normal
    limit = proj.max() * rng.uniform(*depth)
    out: list[np.ndarray] = []
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        pa, pb = proj[i], proj[(i + 1) % len(poly)]
        if pa <= limit:
            out.append(a)
        if (pa - limit) * (pb - limit) < 0:  # the edge crosses the cut line
            out.append(a + (b - a) * (limit - pa) / (pb - pa))
    return np.array(out)


def _is_plausible_stone(poly: np.ndarray) -> bool:
    if not VERTICES[0] <= len(poly) <= VERTICES[1]:
        return False
    return _is_plausible_shape(poly)


def _is_plausible_shape(poly: np.ndarray) -> bool:
    short, long = min_rect_sides(poly)
    return (long / short <= MAX_ASPECT and solidity(poly) >= MIN_SOLIDITY
            and notch_depth(poly) <= MAX_NOTCH)


def polygon_centroid(poly: np.ndarray) -> np.ndarray:
    """Area centroid (shoelace), not the vertex mean: vertices are uneven."""
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2.0
    return np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6.0 * area)


def polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2.0)


def min_rect_sides(poly: np.ndarray) -> tuple[float, float]:
    """(shorter, longer) side of cv2.minAreaRect: how a sieve and the segmenter size it."""
    _, (w, h), _ = cv2.minAreaRect(poly.astype(np.float32))
    return float(min(w, h)), float(max(w, h))


def solidity(poly: np.ndarray) -> float:
    hull = cv2.convexHull(poly.astype(np.float32))[:, 0, :].astype(np.float64)
    return polygon_area(poly) / polygon_area(hull)


def notch_depth(poly: np.ndarray) -> float:
    """Deepest concavity (vertex distance below its hull edge) relative to sqrt(area).

    Two touching stones show a deep notch where they meet; one stone must not.
    """
    idx = np.sort(cv2.convexHull(poly.astype(np.float32), returnPoints=False).ravel())
    n = len(poly)
    depth = 0.0
    for i, j in zip(idx, np.roll(idx, -1), strict=True):
        pocket = [(i + k) % n for k in range(1, (j - i) % n)]
        if pocket:
            depth = max(depth, _max_distance_to_line(poly[pocket], poly[i], poly[j]))
    return depth / float(np.sqrt(polygon_area(poly)))


def _max_distance_to_line(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    edge = b - a
    normal = np.array([edge[1], -edge[0]]) / max(float(np.hypot(edge[0], edge[1])), 1e-12)
    return float(np.abs((pts - a) @ normal).max())
