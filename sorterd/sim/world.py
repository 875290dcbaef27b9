"""The simulated machine's physics: feeder, channel, fall, jets and bins.

This is a world model, not a test mock.  It decides, from the stones it fed
and from when each jet was *actually* open, where every stone physically
lands -- knowing nothing of what the pipeline intended.

Geometry (all in mm, times in host monotonic ns):
  * x runs along the channel from the camera view's left edge; stones slide
    at constant per-stone speed and start to fall at ``lip_mm``;
  * after the lip a stone falls freely: it passes the nozzle ``d`` mm below
    the lip ``sqrt(2 d / g)`` s later, at ``g t`` mm/s;
  * a jet deflects a stone into its bin if it is open for at least
    ``deflect_overlap`` of the stone's passage through it; nozzles are met
    top to bottom and the first that deflects wins; no jet -> REJECT.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import cv2
import numpy as np

from sorterd.config import GeometryConfig, SimConfig
from sorterd.domain import CLARITIES, COLORS, JET_BINS
from sorterd.sim.appearance import make_stone_look
from sorterd.sim.parts.camera import SimCameraConfig
from sorterd.sim.stones import StoneSpec
from sorterd.sorting.physics import fall_time_s, passage_window_ns

# §1.3 expected frequencies in Thai rough melee (mid-points of the ranges).
THAI_MELEE_MIX = {
    "blue_transparent": 17.5, "blue_translucent": 22.5, "blue_opaque": 7.5,
    "light_transparent": 7.5, "light_translucent": 17.5, "light_opaque": 6.5,
    "inky_transparent": 2.0, "inky_translucent": 6.5, "inky_opaque": 7.5,
}


class StoneSource(Protocol):
    """Where fed stones come from when not the config's class mix: a lot (sorterd.sim.lots).

    draw() returns a stone's look, class, size, lot and flags; the feeder
    then gives it its place on the channel (kinematic fields are ignored).
    """

    def draw(self, rng: np.random.Generator) -> StoneSpec: ...


@dataclass
class Landing:
    bin: str
    reason: str  # "jet CUT", "no jet", ...
    t_ns: int


@dataclass
class World:
    sim: SimConfig
    geometry: GeometryConfig
    camera: SimCameraConfig
    opening_latency_ms: dict[str, float]
    stones: list[StoneSpec] = field(default_factory=list)
    # bin -> list of (on_ns, off_ns) when that jet was physically open
    jets: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    # A controller's pins observed by the simulated machine (sorterd/sim/firmware.py
    # ValveTrace): it opens jets from the firmware's actual edges and keeps the
    # timing truth for the run summary.  None with the ideal `sim` valves.
    valve_trace: Any = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.sim.seed)
        self.fall_scale: dict[int, float] = {}
        # Lookup indexes, rebuilt when what they index changed (a run of 100,000 stones
        # must not scan every stone per frame, nor every jet per stone).
        self._view_index: tuple[list[StoneSpec], int, _Spans] | None = None
        self._jet_index: dict[str, tuple[int, _Spans]] = {}

    @property
    def view_mm(self) -> tuple[float, float]:
        ppm = self.camera.pixels_per_mm
        return self.camera.width_px / ppm, self.camera.height_px / ppm

    # -- feeder ---------------------------------------------------------------

    def feed(self, n: int, t_start_ns: int, lot: StoneSource | None = None) -> list[StoneSpec]:
        """Generate n stones entering the view after t_start_ns.

        lot: draws each stone (class mix, look, hard cases, flags); None = the
        config's class mix (sim.class_mix) with plain stones of every class.
        """
        classes, weights = self._class_weights()
        prev: StoneSpec | None = None
        t = t_start_ns
        for i in range(n):
            if lot is None:
                color, clarity = classes[self.rng.choice(len(classes), p=weights)]
                stone = self._next_stone(i, color, clarity, prev, t)
            else:
                stone = self._place(replace(lot.draw(self.rng), sim_id=i), prev, t)
            self.stones.append(stone)
            self.fall_scale[stone.sim_id] = 1.0 + self.rng.normal(0.0, self.sim.fall_jitter)
            prev, t = stone, stone.t_entry_ns
        return self.stones

    def start_at(self, t_ns: int) -> None:
        """Shift the fed stones so the first interval starts at t_ns.

        Generating thousands of stones takes real time; feeding relative to 0
        and shifting afterwards keeps the first stones from passing unseen.
        """
        self.stones = [replace(s, t_entry_ns=s.t_entry_ns + t_ns) for s in self.stones]

    def stop_feed(self, t_ns: int) -> int:
        """The feeder stops at t_ns: stones that would enter the view later are never fed.

        A new list, not an edit in place: frames render in worker threads while this
        runs.  Returns how many stones stay fed.
        """
        self.stones = [s for s in self.stones if s.t_entry_ns <= t_ns]
        return len(self.stones)

    def feed_report(self) -> dict[str, Any]:
        """The feed rate asked for (sim.rate_per_s), the one fed (stones per second of entry
        times), and what the singulation allows: each singulated stone enters at least
        sim.min_gap_mm plus the two stones' extents along x behind the one ahead, at its
        speed, so sim.speed_mm_s / (min_gap_mm + mean stone extent) caps the rate.  `warning`
        says what caps it and what to change when the requested rate cannot be fed."""
        requested = self.sim.rate_per_s
        stones = sorted(self.stones, key=lambda s: s.t_entry_ns)
        report: dict[str, Any] = {"requested_per_s": requested, "achieved_per_s": None,
                                  "capacity_per_s": None, "capped": False, "warning": None}
        if len(stones) < 2:
            return report
        span_s = (stones[-1].t_entry_ns - stones[0].t_entry_ns) / 1e9
        achieved = (len(stones) - 1) / span_s if span_s > 0 else float("inf")
        # The shortest centre-to-centre time the singulation allows for each stone behind another.
        tightest_s = sum((self.sim.min_gap_mm + _half_extent_x(a.outline_mm, +1) + _half_extent_x(b.outline_mm, -1))
                         / a.speed_mm_s for a, b in zip(stones, stones[1:], strict=False))
        capacity = (len(stones) - 1) / tightest_s
        extent = float(np.mean([_half_extent_x(s.outline_mm, +1) + _half_extent_x(s.outline_mm, -1) for s in stones]))
        # Capped: the requested rate is beyond what the gap allows, or the feed fell well short of it
        # (20 % leaves room for the Poisson spread of a short feed).
        capped = requested > capacity or achieved < 0.8 * requested
        report.update(achieved_per_s=round(achieved, 2), capacity_per_s=round(capacity, 2), capped=capped,
                      mean_extent_mm=round(extent, 2))
        if capped:
            report["warning"] = (
                f"sim feed: requested {requested:g} stones/s (sim.rate_per_s), fed {achieved:.1f}/s: the singulation "
                f"caps it at ~{capacity:.0f}/s (sim.min_gap_mm = {self.sim.min_gap_mm:g} mm + mean stone length "
                f"{extent:.1f} mm at sim.speed_mm_s = {self.sim.speed_mm_s:g} mm/s); raise sim.speed_mm_s "
                f"(--sim-speed) or lower sim.min_gap_mm (--sim-gap), or ask for at most {0.9 * capacity:.0f}/s")
        return report

    def _class_weights(self) -> tuple[list[tuple[str, str]], np.ndarray]:
        mix = self.sim.class_mix or THAI_MELEE_MIX
        classes = [(c, k) for c in COLORS for k in CLARITIES]
        w = np.array([float(mix.get(f"{c}_{k}", 0.0)) for c, k in classes])
        if w.sum() <= 0:
            raise ValueError("sim.class_mix gives every class zero weight")
        return classes, w / w.sum()

    def _next_stone(self, i: int, color: str, clarity: str, prev: StoneSpec | None, t_prev: int) -> StoneSpec:
        size = float(self.rng.uniform(self.sim.size_min_mm, self.sim.size_max_mm))
        outline, size, length, look = make_stone_look(color, clarity, size, self.rng)
        stone = StoneSpec(sim_id=i, color=color, clarity=clarity, outline_mm=outline, size_mm=size,
                          length_mm=length, appearance=look, speed_mm_s=0.0, t_entry_ns=0, y_mm=0.0)
        return self._place(stone, prev, t_prev)

    def _place(self, stone: StoneSpec, prev: StoneSpec | None, t_prev: int) -> StoneSpec:
        """Put a drawn stone on the channel: orientation, speed, lateral position, entry time."""
        outline = _align_to_channel(stone.outline_mm, self.rng)
        speed = self.sim.speed_mm_s * max(0.5, 1.0 + self.rng.normal(0.0, self.sim.speed_spread))
        y = self.view_mm[1] / 2.0 + float(self.rng.normal(0.0, 0.4))
        if prev is None:
            t_entry = t_prev + int(self.rng.exponential(1.0 / self.sim.rate_per_s) * 1e9)
        else:
            extents = _half_extent_x(prev.outline_mm, +1) + _half_extent_x(outline, -1)
            edge_gap, speed = self._gap_and_speed(prev, speed, extents)
            centre_gap = edge_gap + extents
            t_entry = prev.t_entry_ns + int(centre_gap / prev.speed_mm_s * 1e9)
            t_entry = max(t_entry, self._no_catch_up_entry(prev, speed, centre_gap))
        return replace(stone, outline_mm=outline, speed_mm_s=speed, t_entry_ns=t_entry, y_mm=y)

    def _gap_and_speed(self, prev: StoneSpec, speed: float, extents_mm: float) -> tuple[float, float]:
        u = self.rng.random()
        if u < self.sim.touching_pair_prob:
            return float(self.rng.uniform(-0.25, -0.05)), prev.speed_mm_s
        if u < self.sim.touching_pair_prob + self.sim.close_pair_prob:
            return float(self.rng.uniform(0.3, 2.0)), prev.speed_mm_s
        # Singulated: a minimum gap plus an exponential tail sized so that the mean
        # centre-to-centre gap, hence the mean arrival rate, is sim.rate_per_s.  The dead
        # length is this pair's own extents along x (front of the one ahead, back of this one):
        # the mean sieve size it replaces is ~0.6 mm shorter, and fed ~9 % below the rate asked.
        # A rate beyond speed / (min gap + extents) cannot be fed: the tail's floor caps it
        # (World.feed_report says so).
        mean_gap_mm = self.sim.speed_mm_s / self.sim.rate_per_s
        dead_mm = self.sim.min_gap_mm + extents_mm
        tail = max(mean_gap_mm - dead_mm, 0.05 * mean_gap_mm)
        return self.sim.min_gap_mm + float(self.rng.exponential(tail)), speed

    def _no_catch_up_entry(self, prev: StoneSpec, speed: float, centre_gap: float) -> int:
        """Entry time so a faster stone is still centre_gap behind at the lip."""
        if speed <= prev.speed_mm_s:
            return 0
        t_prev_lip = prev.t_at_x_ns(self.geometry.lip_mm)
        return t_prev_lip - int((self.geometry.lip_mm - centre_gap) / speed * 1e9)

    # -- what the camera and the beam see -------------------------------------

    def placed_at(self, t_ns: int) -> list[tuple[StoneSpec, float, float]]:
        """Stones (any part) inside the camera's view at t_ns, with centroid x, y."""
        width = self.view_mm[0]
        out = []
        for i in self._in_view_index().overlapping(t_ns, t_ns + 1):
            s = self.stones[i]
            x = s.x_mm_at(t_ns)
            if -s.length_mm < x < width + s.length_mm:
                out.append((s, x, s.y_mm))
        return out

    def _in_view_index(self) -> _Spans:
        """Each stone's time in view (a little wider than the exact test above), indexed."""
        cached = self._view_index
        if cached is not None and cached[0] is self.stones and cached[1] == len(self.stones):
            return cached[2]
        width = self.view_mm[0]
        spans = [(s.t_entry_ns - int(s.length_mm / s.speed_mm_s * 1e9) - 1,
                  s.t_entry_ns + int((width + s.length_mm) / s.speed_mm_s * 1e9) + 2) for s in self.stones]
        index = _Spans(spans)
        self._view_index = (self.stones, len(self.stones), index)
        return index

    def beam_times(self, beam_x_mm: float) -> list[tuple[int, int]]:
        """(t_break_ns, t_clear_ns) for each time the beam is interrupted.

        A touching pair blocks the beam continuously, so it is one event.
        """
        return [span for span, _ in self.beam_events(beam_x_mm)]

    def beam_events(self, beam_x_mm: float) -> list[tuple[tuple[int, int], list[StoneSpec]]]:
        """Each beam interruption with the stones that made it (several if they touch)."""
        spans = []
        for s in self.stones:
            front = _half_extent_x(s.outline_mm, +1)
            back = _half_extent_x(s.outline_mm, -1)
            spans.append((s.t_at_x_ns(beam_x_mm - front), s.t_at_x_ns(beam_x_mm + back), s))
        spans.sort(key=lambda sp: sp[:2])
        merged: list[tuple[tuple[int, int], list[StoneSpec]]] = []
        for on, off, s in spans:
            if merged and on <= merged[-1][0][1]:
                (first_on, last_off), stones = merged[-1]
                merged[-1] = ((first_on, max(off, last_off)), [*stones, s])
            else:
                merged.append(((on, off), [s]))
        return merged

    # -- falling and jets -----------------------------------------------------

    def true_latency_ns(self, bin_name: str) -> int:
        ms = self.sim.valve_latency_ms.get(bin_name, self.opening_latency_ms[bin_name])
        jitter = self.rng.normal(0.0, self.sim.valve_jitter_ms) if self.sim.valve_jitter_ms else 0.0
        return int((ms + jitter) * 1e6)

    def open_jet(self, bin_name: str, command_on_ns: int, command_off_ns: int) -> tuple[int, int]:
        """A valve was commanded open over [on, off): the jet follows with its latency."""
        on = command_on_ns + self.true_latency_ns(bin_name)
        off = command_off_ns + self.true_latency_ns(bin_name)
        self.jets[bin_name].append((on, off))
        return on, off

    def nozzle_passage(self, stone: StoneSpec, bin_name: str) -> tuple[int, int]:
        drop = self.geometry.nozzle_drop_mm[bin_name]
        t_lip = stone.t_at_x_ns(self.geometry.lip_mm)
        t_c = t_lip + int(fall_time_s(drop) * self.fall_scale[stone.sim_id] * 1e9)
        return passage_window_ns(t_c, drop, stone.length_mm, self.geometry.jet_width_mm)

    def landing(self, stone: StoneSpec) -> Landing:
        for bin_name in sorted(JET_BINS, key=lambda b: self.geometry.nozzle_drop_mm[b]):
            start, end = self.nozzle_passage(stone, bin_name)
            jets = self.jets[bin_name]
            covered = sum(max(0, min(end, jets[i][1]) - max(start, jets[i][0]))
                          for i in self._jets_of(bin_name).overlapping(start, end))
            if covered >= self.sim.deflect_overlap * (end - start):
                return Landing(bin_name, f"jet {bin_name}", end)
        bottom = max(self.geometry.nozzle_drop_mm.values())
        t_end = stone.t_at_x_ns(self.geometry.lip_mm) + int(fall_time_s(bottom) * 1.2e9)
        return Landing("REJECT", "no jet", t_end)

    def _jets_of(self, bin_name: str) -> _Spans:
        jets = self.jets[bin_name]
        cached = self._jet_index.get(bin_name)
        if cached is None or cached[0] != len(jets):
            cached = (len(jets), _Spans(jets))
            self._jet_index[bin_name] = cached
        return cached[1]

    def last_landing_ns(self) -> int:
        if not self.stones:
            return 0
        bottom = max(self.geometry.nozzle_drop_mm.values())
        last = max(s.t_at_x_ns(self.geometry.lip_mm) for s in self.stones)
        return last + int(fall_time_s(bottom) * 1.2e9)


class _Spans:
    """Intervals [start, end) indexed by start: which of them may overlap a query interval."""

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        self._order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        self._starts = [spans[i][0] for i in self._order]
        self._longest = max((end - start for start, end in spans), default=0)

    def overlapping(self, start: int, end: int) -> list[int]:
        """Indexes (in the caller's order) of every span that starts before `end` and may
        still be open at `start`; a superset of those overlapping [start, end)."""
        lo = bisect.bisect_left(self._starts, start - self._longest)
        hi = bisect.bisect_left(self._starts, end)
        return sorted(self._order[lo:hi])


def _align_to_channel(outline: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Elongated stones slide lengthwise down a V channel: long axis along x, +-25 deg."""
    (_, _), (w, h), angle = cv2.minAreaRect(outline.astype(np.float32))
    long_axis = angle if w >= h else angle + 90.0
    theta = np.deg2rad(-long_axis + rng.uniform(-25.0, 25.0))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return outline @ rot.T


def _half_extent_x(outline: np.ndarray, sign: int) -> float:
    """How far the outline reaches ahead (+1) or behind (-1) its centroid."""
    xs = outline[:, 0]
    return float(xs.max()) if sign > 0 else float(-xs.min())
