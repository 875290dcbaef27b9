"""Realistic lots for the simulator: class mix, look, session drift and the §6 hard cases.

A *lot* (§1.4) is one parcel of rough from one source.  Lots differ in

* **class mix** -- the §1.3 Thai-melee frequencies scaled per lot (a heated
  Pailin lot has more Blue + Transparent, a dark Bo Ploi lot more Inky);
  Inky + Transparent stays rare (~1-3 %) everywhere;
* **look** -- origin, heat treatment and surface texture shift the class
  boxes of `sorterd.sim.appearance` a little (`LotLook`): hue, saturation,
  value, transmission, mottling.  Every shift stays inside the §3.2 class
  definitions: a Blue stone of any lot is still clearly Blue;
* **sizes** -- each lot is a sieve range; the lots with 1.0 mm lower edges
  have 15-35 % stones below 1.5 mm (§6.4);
* **hard cases** (§3.2.3, §6), drawn per stone with the lot's `HardCaseRates`
  and carrying the §3.4 flags:

  - *borderline* stones between two colour or two clarity classes.  The look
    lies in the gap between the two class boxes (w of the way across, w in
    0..1, the boundary at the middle); the true class is the nearer one, and
    the annotator's label follows a logistic curve around the boundary --
    about one borderline label in five goes to the other side, as a human's
    would.  Borderline clarity calls lean to Translucent, the middle class
    (§3.2.2).  Flag ``uncertain``;
  - *mixed* stones: a second zone of a neighbouring class covering ~20-45 %
    of the stone; labelled by the dominant zone (§3.2.3), less reliably the
    closer the zones are to half and half.  Flag ``mixed``;
  - *damaged* stones: broken pieces (deep fracture faces) with 1-3 cracks
    that block backlight and glint under the ring light; labelled normally.
    Flag ``damaged``;
  - *pleochroic* stones (§6.1): part of the stone shows the other optic
    axis, greener or more violet and a little darker or paler; labelled by
    what the standard imaging position shows.  Note ``pleochroic``;
  - *debris* (§6.5): rock fragments (brown-gray, opaque to translucent) and
    colourless quartz chips (which look much like Light + Transparent).  No
    colour or clarity label.  Flag ``reject``;
  - an annotator *slip* on a clean stone: a neighbouring class, unflagged.

* **session drift** (§2.4): each capture session gets its own backlight
  level, ring-light exposure and white balance, a few % off nominal
  (`SessionDrift`); the session's reference frames see the same drift.

The default hard-case rates (`TYPICAL_HARD_CASES`) describe a mixed-grade
parcel as a careful annotator would see it: 5 % borderline colour, 5 %
borderline clarity, 3 % mixed zones, 2 % damaged, 4 % pleochroic, 1.5 %
debris, 0.3 % slips -- ~13 % of stones flagged uncertain/mixed/damaged,
~2.5 % of labels on the "wrong" side of a class boundary.  Lots vary these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np

from sorterd.domain import CLARITIES, COLORS
from sorterd.sim.appearance import (
    CLARITY_CLASSES,
    COLOR_CLASSES,
    ClarityClass,
    ColorClass,
    chip_outline,
    sample_appearance,
    sample_outline,
)
from sorterd.sim.render import Optics
from sorterd.sim.stones import Appearance, StoneSpec
from sorterd.sim.world import THAI_MELEE_MIX

CASES = ("clean", "borderline_color", "borderline_clarity", "mixed", "damaged", "pleochroic", "debris")
BORDERLINE_W = (0.0, 1.0)  # where in the gap between two class boxes a borderline look lies
LABEL_SOFTNESS = 0.15  # width (in w) of the annotator's uncertainty: ~1 label in 5 crosses over
MIDDLE_BIAS = 0.6  # logit: borderline clarity calls lean to Translucent (§3.2.2)
ZONE_OFFSET = (0.1, 0.45)  # second zone ~44 % .. ~21 % of a round stone
DOMINANCE_SOFTNESS = 0.05  # how sharply "dominant zone" labels follow the zone areas
NOMINAL_EXPOSURE_US = {"backlit": 1000.0, "toplit": 3000.0}  # §2.4 typical values


# -- helpers ---------------------------------------------------------------------------


def _check(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name} = {value!r}: must be a number in {lo}..{hi}")


def _shift(r: tuple[float, float], by: float, lo: float, hi: float) -> tuple[float, float]:
    return (min(max(r[0] + by, lo), hi), min(max(r[1] + by, lo), hi))


def _scale(r: tuple[float, float], by: float, lo: float, hi: float) -> tuple[float, float]:
    return (min(max(r[0] * by, lo), hi), min(max(r[1] * by, lo), hi))


def _lerp(a: float, b: float, w: float) -> float:
    return a + (b - a) * w


def _across(box_a: tuple[float, float], box_b: tuple[float, float], a: float, b: float, w: float) -> float:
    """A borderline value, w of the way from class A to class B.

    Where the two class boxes are apart, from A's edge to B's edge across the
    gap between them (w = 0.5 is the middle of the gap: the class boundary);
    where they overlap, between the two stones' own values.  Mixing class
    *centres* instead would put the boundary inside a wide box (Blue's value
    range) and teach clean stones the wrong class.
    """
    if box_a[1] < box_b[0]:
        return _lerp(box_a[1], box_b[0], w)
    if box_b[1] < box_a[0]:
        return _lerp(box_a[0], box_b[1], w)
    return _lerp(a, b, w)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _neighbour(order: tuple[str, ...], name: str, rng: np.random.Generator) -> str:
    """An adjacent class: the middle class has two neighbours, the ends one.

    Light and Inky are both next to Blue only: a Light/Inky borderline is
    rare enough (§3.2.1) to leave out.
    """
    if order is COLORS:
        return "blue" if name != "blue" else str(rng.choice(["light", "inky"]))
    i = order.index(name)
    if i == 1:
        return order[int(rng.choice([0, 2]))]
    return order[1]


def _cap_fraction(offset: float) -> float:
    """Area share of a disc beyond a chord offset x radius from the centre."""
    o = min(max(offset, -1.0), 1.0)
    return (math.acos(o) - o * math.sqrt(1.0 - o * o)) / math.pi


def _mix(**factors: float) -> Mapping[str, float]:
    """The §1.3 mix with some classes (or a whole colour / clarity) scaled."""
    out = {}
    for cls, weight in THAI_MELEE_MIX.items():
        color, clarity = cls.split("_")
        f = factors.get(cls, 1.0) * factors.get(color, 1.0) * factors.get(clarity, 1.0)
        out[cls] = weight * f
    return MappingProxyType(out)


# -- how lots differ -------------------------------------------------------------------


@dataclass(frozen=True)
class LotLook:
    """How a lot's stones differ from the reference class boxes (origin, heat, surface).

    hue_shift_deg: greener (< 0) or more violet (> 0) blues.
    sat_scale, val_shift: richer/paler, darker/lighter body colour.
    transmission_shift: clearer (heat-treated: silk dissolved) or cloudier.
    texture_scale: surface mottling (water-worn alluvial rough is frosted).
    """

    hue_shift_deg: float = 0.0
    sat_scale: float = 1.0
    val_shift: float = 0.0
    transmission_shift: float = 0.0
    texture_scale: float = 1.0

    def __post_init__(self) -> None:
        _check("LotLook.hue_shift_deg", self.hue_shift_deg, -15.0, 15.0)
        _check("LotLook.sat_scale", self.sat_scale, 0.8, 1.2)
        _check("LotLook.val_shift", self.val_shift, -0.06, 0.06)
        _check("LotLook.transmission_shift", self.transmission_shift, -0.05, 0.05)
        _check("LotLook.texture_scale", self.texture_scale, 0.5, 2.0)

    def color_boxes(self) -> Mapping[str, ColorClass]:
        return MappingProxyType({name: ColorClass(
            hue_deg=_shift(box.hue_deg, self.hue_shift_deg, 0.0, 360.0),
            sat=_scale(box.sat, self.sat_scale, 0.0, 0.98),
            val=_shift(box.val, self.val_shift, 0.03, 0.98),
        ) for name, box in COLOR_CLASSES.items()})

    def clarity_boxes(self) -> Mapping[str, ClarityClass]:
        return MappingProxyType({name: ClarityClass(
            transmission=_shift(box.transmission, self.transmission_shift, 0.005, 0.97),
            texture=_scale(box.texture, self.texture_scale, 0.0, 0.9),
        ) for name, box in CLARITY_CLASSES.items()})


@dataclass(frozen=True)
class HardCaseRates:
    """Per-stone chance of each §6 hard case (mutually exclusive), and of an annotator slip."""

    borderline_color: float = 0.05
    borderline_clarity: float = 0.05
    mixed: float = 0.03
    damaged: float = 0.02
    pleochroic: float = 0.04
    debris: float = 0.015
    slip: float = 0.003

    def __post_init__(self) -> None:
        for name in (*CASES[1:], "slip"):
            _check(f"HardCaseRates.{name}", getattr(self, name), 0.0, 1.0)
        if self.total > 0.6:
            raise ValueError(f"HardCaseRates: hard cases add up to {self.total:.2f}; at most 0.6 "
                             "(a lot is mostly ordinary stones)")

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in CASES[1:])

    def pick(self, rng: np.random.Generator) -> str:
        """One case name from CASES for the next stone."""
        u = rng.random()
        for name in CASES[1:]:
            u -= getattr(self, name)
            if u < 0:
                return name
        return "clean"


TYPICAL_HARD_CASES = HardCaseRates()
NO_HARD_CASES = HardCaseRates(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class SessionDrift:
    """One capture session's lighting and camera, relative to nominal (§2.4).

    backlight_scale: backlight panel level (LED warm-up, driver current).
    ring_gain: ring-light brightness x exposure.
    wb_gains: (B, G, R) white balance as the camera applies it.
    """

    backlight_scale: float = 1.0
    ring_gain: float = 1.0
    wb_gains: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def optics(self, base: Optics) -> Optics:
        """The session's optics: this drift on top of the machine's own (faults included)."""
        (b0, b1, b2), (d0, d1, d2) = base.wb_gains, self.wb_gains
        wb = (b0 * d0, b1 * d1, b2 * d2)
        return replace(base, backlight_level=min(255.0, base.backlight_level * self.backlight_scale),
                       ring_gain=base.ring_gain * self.ring_gain, wb_gains=wb)

    @property
    def worst_deviation(self) -> float:
        """Largest relative deviation from nominal: §2.4 re-calibrates above 5 %."""
        return max(abs(v - 1.0) for v in (self.backlight_scale, self.ring_gain, *self.wb_gains))


Range = tuple[float, float]


def _check_range(name: str, r: Range, lo: float, hi: float) -> None:
    if len(r) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r) \
            or not lo <= r[0] <= r[1] <= hi:
        raise ValueError(f"{name} = {r!r}: must be (low, high) with {lo} <= low <= high <= {hi}")


@dataclass(frozen=True)
class MachineRanges:
    """What differs from one machine (or one set-up of it) to the next: per-session ranges.

    Domain randomisation: each capture session of a lot draws one value of every
    quantity uniformly in its range (`draw`), on top of the lot's `SessionDrift`
    (a few % of warm-up drift, §2.4) -- so a model trained on many sessions has
    seen many machines.  The defaults are the simulator's one nominal machine.

    px_per_mm: image scale; a 5 MP ROI with 1:1..2:1 optics gives ~15..80 px/mm
        (the frame keeps its size in mm, so it has more pixels at a larger scale;
        the crop stays crop_mm square, so a stone has more pixels too).
    backlight_level: DN of the empty backlight panel (LED current, exposure).
    backlight_tint: largest |B/G - 1| and |R/G - 1| of the backlight LEDs' colour.
    toplit_level: DN of the grey card under the ring light at nominal exposure.
    toplit_tint: the same for the grey card's own colour (a not-quite-neutral card).
    exposure: ring-light exposure x LED output, relative (stones and card alike).
    blur_mm: focus blur, Gaussian sigma in mm at the object (0 = in focus).
    noise_dn: sensor noise sigma in DN at gain 1.
    gain: camera gain: multiplies signal and noise.
    texture: factor on the lot's surface texture (`LotLook.texture_scale`).
    framing_mm: the crop window's centre off the stone's centroid, up to this many
        mm along each axis (another capture program centres crops differently).
    """

    px_per_mm: Range = (20.0, 20.0)
    backlight_level: Range = (225.0, 225.0)
    backlight_tint: Range = (0.0, 0.0)
    toplit_level: Range = (118.0, 118.0)
    toplit_tint: Range = (0.0, 0.0)
    exposure: Range = (1.0, 1.0)
    blur_mm: Range = (0.0, 0.0)
    noise_dn: Range = (2.0, 2.0)
    gain: Range = (1.0, 1.0)
    texture: Range = (1.0, 1.0)
    framing_mm: Range = (0.0, 0.0)

    def __post_init__(self) -> None:
        _check_range("MachineRanges.px_per_mm", self.px_per_mm, 8.0, 120.0)
        _check_range("MachineRanges.backlight_level", self.backlight_level, 120.0, 255.0)
        _check_range("MachineRanges.backlight_tint", self.backlight_tint, 0.0, 0.3)
        _check_range("MachineRanges.toplit_level", self.toplit_level, 50.0, 200.0)
        _check_range("MachineRanges.toplit_tint", self.toplit_tint, 0.0, 0.3)
        _check_range("MachineRanges.exposure", self.exposure, 0.5, 1.6)
        _check_range("MachineRanges.blur_mm", self.blur_mm, 0.0, 0.1)
        _check_range("MachineRanges.noise_dn", self.noise_dn, 0.0, 4.0)
        _check_range("MachineRanges.gain", self.gain, 1.0, 1.5)
        _check_range("MachineRanges.texture", self.texture, 0.5, 2.0)
        _check_range("MachineRanges.framing_mm", self.framing_mm, 0.0, 0.6)

    @property
    def nominal(self) -> bool:
        """Every range is one value, the simulator's own machine: nothing to draw."""
        return self == NOMINAL_MACHINE

    def draw(self, rng: np.random.Generator) -> MachineLook:
        """One session's machine, every quantity uniform in its range."""
        def u(r: Range) -> float:
            return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])

        def tint(r: Range) -> tuple[float, float, float]:
            # A colour cast: blue and red against green, each up to the range's size, either way.
            return (1.0 + float(rng.choice([-1.0, 1.0])) * u(r), 1.0, 1.0 + float(rng.choice([-1.0, 1.0])) * u(r))

        return MachineLook(px_per_mm=u(self.px_per_mm), backlight_level=u(self.backlight_level),
                           backlight_tint=tint(self.backlight_tint), toplit_level=u(self.toplit_level),
                           toplit_tint=tint(self.toplit_tint), exposure=u(self.exposure), blur_mm=u(self.blur_mm),
                           noise_dn=u(self.noise_dn), gain=u(self.gain), texture=u(self.texture),
                           framing_mm=self.framing_mm[1] * float(rng.uniform(0.0, 1.0)) if self.framing_mm[1] else 0.0)


NOMINAL_MACHINE = MachineRanges()


@dataclass(frozen=True)
class MachineLook:
    """One capture session's machine, drawn from `MachineRanges` (fields: see there)."""

    px_per_mm: float = 20.0
    backlight_level: float = 225.0
    backlight_tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    toplit_level: float = 118.0
    toplit_tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    exposure: float = 1.0
    blur_mm: float = 0.0
    noise_dn: float = 2.0
    gain: float = 1.0
    texture: float = 1.0
    framing_mm: float = 0.0  # the crop's centre is up to this far off the stone's, per axis

    def optics(self, base: Optics) -> Optics:
        """The machine's optics at this scale and light (before the session's own drift).

        The frame keeps its size in mm: width and height scale with px_per_mm.
        """
        k = self.px_per_mm / base.px_per_mm
        wb = tuple(g * self.gain for g in base.wb_gains)
        return replace(base, width_px=max(16, round(base.width_px * k)), height_px=max(16, round(base.height_px * k)),
                       px_per_mm=self.px_per_mm, backlight_level=min(255.0, self.backlight_level),
                       backlight_tint=self.backlight_tint, toplit_background=self.toplit_level,
                       toplit_tint=self.toplit_tint, ring_gain=base.ring_gain * self.exposure,
                       wb_gains=(wb[0], wb[1], wb[2]), noise_sigma=self.noise_dn * self.gain,
                       lens_blur_px=self.blur_mm * self.px_per_mm)

    def lot(self, lot: Lot) -> Lot:
        """The lot as this session's stones look: surface texture scaled (within LotLook's bounds)."""
        if self.texture == 1.0:
            return lot
        t = min(2.0, max(0.5, lot.look.texture_scale * self.texture))
        return replace(lot, look=replace(lot.look, texture_scale=t))


@dataclass(frozen=True)
class Lot:
    """One parcel of rough: what `sorterd sim generate --lot NAME` feeds.

    name: the preset's key; lot_id: the §3.4 lot_id its stones carry.
    class_mix: relative frequency per "color_clarity" class (§1.3).
    size_mm: sieve range, sizes drawn uniformly in it.
    drift: standard deviation of each session's lighting/white-balance drift
        (fraction of nominal, clipped at 2 sigma); 0 = every session nominal.
    machine: the ranges each session's machine is drawn from (`MachineRanges`;
        default: the simulator's one nominal machine).
    """

    name: str
    lot_id: str
    description: str
    origin: str
    heat_treated: bool
    class_mix: Mapping[str, float]
    look: LotLook = field(default_factory=LotLook)
    hard: HardCaseRates = TYPICAL_HARD_CASES
    size_mm: tuple[float, float] = (1.0, 5.0)
    drift: float = 0.02
    machine: MachineRanges = NOMINAL_MACHINE

    def __post_init__(self) -> None:
        valid = {f"{c}_{k}" for c in COLORS for k in CLARITIES}
        bad = sorted(set(self.class_mix) - valid)
        if bad:
            raise ValueError(f"Lot {self.name!r}: unknown classes {bad} in class_mix; valid: {sorted(valid)}")
        if sum(self.class_mix.values()) <= 0 or min(self.class_mix.values()) < 0:
            raise ValueError(f"Lot {self.name!r}: class_mix needs non-negative weights, not all zero")
        if not 0.3 <= self.size_mm[0] < self.size_mm[1] <= 10.0:
            raise ValueError(f"Lot {self.name!r}: size_mm {self.size_mm} must be (lo, hi) with 0.3 <= lo < hi <= 10")
        _check(f"Lot {self.name!r}: drift", self.drift, 0.0, 0.05)

    def with_lot_id(self, lot_id: str) -> Lot:
        """The same kind of parcel under another lot id (a second purchase from the source)."""
        return replace(self, lot_id=lot_id)

    # -- session -----------------------------------------------------------------------

    def session_drift(self, rng: np.random.Generator) -> SessionDrift:
        def factor(sigma: float) -> float:
            return float(np.clip(1.0 + rng.normal(0.0, sigma), 1.0 - 2 * sigma, 1.0 + 2 * sigma))

        d = self.drift
        # White balance drifts as a colour cast: blue and red gains against green.
        return SessionDrift(backlight_scale=factor(d), ring_gain=factor(d),
                            wb_gains=(factor(d / 2), 1.0, factor(d / 2)))

    # -- stones ------------------------------------------------------------------------

    def draw(self, rng: np.random.Generator) -> StoneSpec:
        """One stone of this lot: class, look, size, flags and the annotator's label.

        Kinematic fields (speed, entry time, position) are left at zero: the
        feeder (`World.feed(..., lot=...)`) places the stone on the channel.
        """
        case = self.hard.pick(rng)
        if case == "debris":
            return self._debris(rng)
        color, clarity = self._pick_class(rng)
        outline, size, length = sample_outline(float(rng.uniform(*self.size_mm)), rng)
        d = _CASE_DRAWERS[case](self, color, clarity, rng)
        if case == "damaged":
            outline, size, length = chip_outline(outline, int(rng.integers(1, 3)), rng)
        if case == "clean" and rng.random() < self.hard.slip:
            d = self._slip(d, rng)
        return StoneSpec(
            sim_id=0, color=d.color, clarity=d.clarity, outline_mm=outline, size_mm=size, length_mm=length,
            appearance=d.look, speed_mm_s=0.0, t_entry_ns=0, y_mm=0.0, lot_id=self.lot_id, flags=d.flags,
            label_color=d.label_color, label_clarity=d.label_clarity, notes=d.notes,
        )

    def _pick_class(self, rng: np.random.Generator) -> tuple[str, str]:
        names = sorted(self.class_mix)
        w = np.array([self.class_mix[n] for n in names], dtype=np.float64)
        color, clarity = names[int(rng.choice(len(names), p=w / w.sum()))].split("_")
        return color, clarity

    def _look(self, color: str, clarity: str, rng: np.random.Generator) -> Appearance:
        return sample_appearance(color, clarity, rng, self.look.color_boxes(), self.look.clarity_boxes())

    def _clean(self, color: str, clarity: str, rng: np.random.Generator) -> _Drawn:
        return _Drawn(self._look(color, clarity, rng), color, clarity, color, clarity)

    def _borderline_color(self, color: str, clarity: str, rng: np.random.Generator) -> _Drawn:
        other = _neighbour(COLORS, color, rng)
        a, b = self._look(color, clarity, rng), self._look(other, clarity, rng)
        boxes = self.look.color_boxes()
        ca, cb = boxes[color], boxes[other]
        w = float(rng.uniform(*BORDERLINE_W))
        look = replace(a, hue_deg=_across(ca.hue_deg, cb.hue_deg, a.hue_deg, b.hue_deg, w),
                       sat=_across(ca.sat, cb.sat, a.sat, b.sat, w), val=_across(ca.val, cb.val, a.val, b.val, w))
        truth = other if w > 0.5 else color
        label = other if rng.random() < _sigmoid((w - 0.5) / LABEL_SOFTNESS) else color
        pair = "/".join(sorted((color, other), key=COLORS.index))
        return _Drawn(look, truth, clarity, label, clarity, ("uncertain",), f"borderline {pair}")

    def _borderline_clarity(self, color: str, clarity: str, rng: np.random.Generator) -> _Drawn:
        other = _neighbour(CLARITIES, clarity, rng)
        a, b = self._look(color, clarity, rng), self._look(color, other, rng)
        boxes = self.look.clarity_boxes()
        ka, kb = boxes[clarity], boxes[other]
        w = float(rng.uniform(*BORDERLINE_W))
        look = replace(a, transmission=_across(ka.transmission, kb.transmission, a.transmission, b.transmission, w),
                       texture=_across(ka.texture, kb.texture, a.texture, b.texture, w))
        truth = other if w > 0.5 else clarity
        bias = MIDDLE_BIAS if other == "translucent" else (-MIDDLE_BIAS if clarity == "translucent" else 0.0)
        label = other if rng.random() < _sigmoid((w - 0.5) / LABEL_SOFTNESS + bias) else clarity
        pair = "/".join(sorted((clarity, other), key=CLARITIES.index))
        return _Drawn(look, color, truth, color, label, ("uncertain",), f"borderline {pair}")

    def _mixed(self, color: str, clarity: str, rng: np.random.Generator) -> _Drawn:
        a = self._look(color, clarity, rng)
        offset = float(rng.uniform(*ZONE_OFFSET))
        angle = float(rng.uniform(0.0, 360.0))
        p_minor = _sigmoid((_cap_fraction(offset) - 0.5) / DOMINANCE_SOFTNESS)
        minor_wins = rng.random() < p_minor
        if rng.random() < 0.5:
            other = _neighbour(COLORS, color, rng)
            b = self._look(other, clarity, rng)
            look = replace(a, zone_hue_delta_deg=b.hue_deg - a.hue_deg, zone_sat_delta=b.sat - a.sat,
                           zone_val_delta=b.val - a.val, zone_angle_deg=angle, zone_offset=offset)
            label = other if minor_wins else color
            return _Drawn(look, color, clarity, label, clarity, ("mixed",), f"mixed colour zones {color}/{other}")
        other = _neighbour(CLARITIES, clarity, rng)
        b = self._look(color, other, rng)
        look = replace(a, zone_transmission_delta=b.transmission - a.transmission, zone_angle_deg=angle,
                       zone_offset=offset)
        label = other if minor_wins else clarity
        return _Drawn(look, color, clarity, color, label, ("mixed",), f"mixed clarity zones {clarity}/{other}")

    def _damaged(self, color: str, clarity: str, rng: np.random.Generator) -> _Drawn:
        a = self._look(color, clarity, rng)
        cracks = int(rng.integers(1, 4))
        look = replace(a, fractures=cracks, texture=min(0.9, a.texture * 1.3))
        return _Drawn(look, color, clarity, color, clarity, ("damaged",),
                      f"broken; {cracks} fracture{'s' if cracks > 1 else ''}")

    def _pleochroic(self, color: str, clarity: str, rng: np.random.Generator) -> _Drawn:
        a = self._look(color, clarity, rng)
        look = replace(a, zone_hue_delta_deg=float(rng.choice([-1.0, 1.0]) * rng.uniform(12.0, 25.0)),
                       zone_sat_delta=float(rng.uniform(-0.12, 0.05)), zone_val_delta=float(rng.uniform(-0.08, 0.05)),
                       zone_angle_deg=float(rng.uniform(0.0, 360.0)), zone_offset=float(rng.uniform(-0.3, 0.3)))
        return _Drawn(look, color, clarity, color, clarity, (), "pleochroic")

    def _slip(self, d: _Drawn, rng: np.random.Generator) -> _Drawn:
        """A mis-click: one axis labelled as a neighbouring class, with no flag."""
        if rng.random() < 0.5:
            return replace(d, label_color=_neighbour(COLORS, d.color, rng))
        return replace(d, label_clarity=_neighbour(CLARITIES, d.clarity, rng))

    def _debris(self, rng: np.random.Generator) -> StoneSpec:
        """Non-gem material (§6.5): no class; its place is REJECT."""
        lo, hi = self.size_mm
        outline, size, length = sample_outline(float(rng.uniform(lo, min(hi, max(lo + 0.5, 3.0)))), rng)
        seed = int(rng.integers(0, 2**31 - 1))
        if rng.random() < 0.3:
            look = Appearance(hue_deg=float(rng.uniform(0.0, 360.0)), sat=float(rng.uniform(0.0, 0.07)),
                              val=float(rng.uniform(0.72, 0.92)), transmission=float(rng.uniform(0.72, 0.9)),
                              texture=float(rng.uniform(0.1, 0.35)), texture_seed=seed)
            notes = "non-gem: colourless quartz chip"
        else:
            look = Appearance(hue_deg=float(rng.uniform(15.0, 50.0)), sat=float(rng.uniform(0.1, 0.45)),
                              val=float(rng.uniform(0.2, 0.55)), transmission=float(rng.uniform(0.0, 0.25)),
                              texture=float(rng.uniform(0.45, 0.9)), texture_seed=seed)
            notes = "non-gem: rock fragment"
        # Debris has no colour/clarity class.  Its truth is recorded as
        # Inky + Opaque because that class maps to REJECT (§8.2) -- the bin
        # debris belongs in -- so the world's truth bins stay right; the
        # "reject" flag makes human_label() give no class at all.
        return StoneSpec(sim_id=0, color="inky", clarity="opaque", outline_mm=outline, size_mm=size,
                         length_mm=length, appearance=look, speed_mm_s=0.0, t_entry_ns=0, y_mm=0.0,
                         lot_id=self.lot_id, flags=("reject",), notes=notes)


@dataclass(frozen=True)
class _Drawn:
    """A drawn look with its true class and the annotator's label."""

    look: Appearance
    color: str
    clarity: str
    label_color: str
    label_clarity: str
    flags: tuple[str, ...] = ()
    notes: str = ""


_CASE_DRAWERS: dict[str, Callable[[Lot, str, str, np.random.Generator], _Drawn]] = {
    "clean": Lot._clean,
    "borderline_color": Lot._borderline_color,
    "borderline_clarity": Lot._borderline_clarity,
    "mixed": Lot._mixed,
    "damaged": Lot._damaged,
    "pleochroic": Lot._pleochroic,
}


# -- the preset lots ------------------------------------------------------------------

LOTS: Mapping[str, Lot] = MappingProxyType({lot.name: lot for lot in (
    Lot("thai-mixed", "LOT-2026-001", "Thai melee, Chanthaburi market, mixed grade",
        "Chanthaburi (Thailand/Cambodia), basaltic", False, _mix(),
        LotLook(val_shift=-0.01), size_mm=(1.0, 4.5)),
    Lot("pailin-heated", "LOT-2026-002", "Pailin melee, heat-treated, good colour",
        "Pailin (Cambodia), basaltic", True, _mix(blue_transparent=1.4, blue_translucent=1.1, light=0.7),
        LotLook(hue_shift_deg=3.0, sat_scale=1.08, transmission_shift=0.03, texture_scale=0.8),
        size_mm=(1.0, 4.0)),
    Lot("bo-ploi-dark", "LOT-2026-003", "Bo Ploi melee, dark, unheated",
        "Bo Ploi, Kanchanaburi (Thailand), basaltic", False, _mix(inky=1.7, light=0.8, inky_transparent=0.7),
        LotLook(hue_shift_deg=-5.0, sat_scale=1.04, val_shift=-0.035), size_mm=(1.2, 5.0)),
    Lot("ilakaka-pale", "LOT-2026-004", "Madagascar melee, pale to medium, unheated",
        "Ilakaka (Madagascar), metamorphic", False, _mix(light=1.5, inky=0.5, transparent=1.2),
        LotLook(hue_shift_deg=6.0, sat_scale=0.92, val_shift=0.03), size_mm=(1.0, 4.0)),
    Lot("ratnapura-worn", "LOT-2026-005", "Sri Lankan alluvial melee, water-worn, frosted",
        "Ratnapura (Sri Lanka), alluvial", False, _mix(light=1.3, translucent=1.2),
        LotLook(hue_shift_deg=4.0, val_shift=0.02, transmission_shift=-0.02, texture_scale=1.4),
        HardCaseRates(damaged=0.04, debris=0.02), size_mm=(1.0, 3.5)),
    Lot("anakie-dark", "LOT-2026-006", "Australian melee, dark greenish blue, strongly pleochroic",
        "Anakie, Queensland (Australia), basaltic", False, _mix(inky=1.4, opaque=1.2, inky_transparent=0.8),
        LotLook(hue_shift_deg=-8.0, val_shift=-0.025, texture_scale=1.15),
        HardCaseRates(pleochroic=0.06), size_mm=(1.0, 5.0)),
    Lot("chanthaburi-fine", "LOT-2026-007", "Thai fine melee, sieve 1.0-2.5 mm",
        "Chanthaburi (Thailand/Cambodia), basaltic", False, _mix(),
        LotLook(hue_shift_deg=-2.0, transmission_shift=0.01),
        HardCaseRates(borderline_color=0.06, borderline_clarity=0.06), size_mm=(1.0, 2.5)),
    Lot("sim-default", "LOT-SIM-001", "the simulator's plain stones, as `sorterd run --sim` feeds them",
        "simulator", False, _mix(), hard=NO_HARD_CASES, size_mm=(1.0, 5.0), drift=0.0),
)})


def get_lot(name: str) -> Lot:
    """A preset lot by name, with an error that lists the presets."""
    if name not in LOTS:
        raise ValueError(f"Bad lot {name!r}: valid lots are {', '.join(sorted(LOTS))}")
    return LOTS[name]
