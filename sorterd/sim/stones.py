"""What a simulated stone *is*: its ground truth and its look.

The world model (`sorterd.sim.world`) moves `StoneSpec`s along the channel; the
renderer (`sorterd.sim.render`) draws them.  Nothing in the sorting pipeline
imports this module: the pipeline only ever sees pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Appearance:
    """How a stone looks, independent of where it is.

    hue_deg, sat, val: the stone's body colour under the ring light (HSV,
        hue in degrees 0..360, sat/val 0..1) -- the colour signal (§3.2.1).
    transmission: fraction of backlight passing through the stone body,
        0 (opaque silhouette) .. 1 (as bright as the empty panel) -- the
        clarity signal (§3.2.2).
    texture: strength 0..1 of the rough-surface mottling.
    texture_seed: seed for the stone's fixed surface pattern, so the same
        stone looks the same in both frames and in every capture.
    zone_val_delta, zone_transmission_delta: a second zone of the stone that
        differs in colour value / transmission (§6.3 mixed stones); 0 = none.
    zone_angle_deg: orientation of the boundary between the two zones.
    zone_sat_delta, zone_hue_delta_deg: the second zone's saturation and hue
        difference (§6.3 mixed colour zones, §6.1 pleochroism); 0 = none.
    zone_offset: how far the zone boundary sits from the centroid, as a
        fraction of the stone's radius; > 0 makes the second zone the smaller
        one (a dominant zone, §3.2.3), < 0 the larger.
    fractures: number of fracture lines across a damaged stone (§3.2.3); they
        block backlight and glint under the ring light.
    """

    hue_deg: float
    sat: float
    val: float
    transmission: float
    texture: float = 0.3
    texture_seed: int = 0
    zone_val_delta: float = 0.0
    zone_transmission_delta: float = 0.0
    zone_angle_deg: float = 0.0
    zone_sat_delta: float = 0.0
    zone_hue_delta_deg: float = 0.0
    zone_offset: float = 0.0
    fractures: int = 0


@dataclass(frozen=True)
class StoneSpec:
    """One physical stone fed into the machine.

    outline_mm: (K, 2) float array, polygon vertices in mm relative to the
        stone's centroid (x along the channel, y across it), as the camera
        sees it.  Stones slide without turning, so the outline is fixed.
    size_mm: sieve size = shorter side of the outline's minimum-area
        rectangle (what the 2 mm CUT rule is about, §8.2).
    length_mm: longer side of that rectangle.
    speed_mm_s: speed along the channel (constant while on the channel).
    t_entry_ns: host-monotonic instant the centroid crosses x = 0 mm (the
        left edge of the camera's field of view).
    y_mm: the centroid's lateral position, across the channel.
    lot_id, flags: the lot the stone came from and its §3.4 flags
        ("uncertain", "mixed", "damaged", "reject").
    label_color, label_clarity: what a human annotator called the stone when
        that differs from the truth (noisy borderline labels, §3.2.3); None =
        the true class.  A "reject" stone (debris, §6.5) has no label at all.
    notes: the annotator's free-text note (§3.4).
    """

    sim_id: int
    color: str
    clarity: str
    outline_mm: np.ndarray = field(repr=False)
    size_mm: float
    length_mm: float
    appearance: Appearance
    speed_mm_s: float
    t_entry_ns: int
    y_mm: float
    lot_id: str = "LOT-SIM-001"
    flags: tuple[str, ...] = ()
    label_color: str | None = None
    label_clarity: str | None = None
    notes: str = ""

    def human_label(self) -> tuple[str | None, str | None]:
        """(color, clarity) as annotated: (None, None) for non-gem material (§3.2.3)."""
        if "reject" in self.flags:
            return None, None
        return self.label_color or self.color, self.label_clarity or self.clarity

    def x_mm_at(self, t_ns: int) -> float:
        """Centroid position along the channel at host time t_ns."""
        return (t_ns - self.t_entry_ns) * 1e-9 * self.speed_mm_s

    def t_at_x_ns(self, x_mm: float) -> int:
        """Host time at which the centroid is at x_mm on the channel."""
        return self.t_entry_ns + int(round(x_mm / self.speed_mm_s * 1e9))
