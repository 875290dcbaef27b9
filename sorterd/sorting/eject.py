"""Ejection timing: when a stone passes its bin's nozzle, and the pulse for it.

Timing model (host monotonic ns throughout):
  t_lip    = t_obs + (lip_mm - x_mm) / speed          (slides at measured speed)
  t_nozzle = t_lip + sqrt(2 * drop_mm / g)            (free fall from the lip)
  passage  = t_nozzle -+ (length_mm + jet_mm) / 2 / (g * t_fall)
             (a cluster's members are spread along the channel: its passage is
             widened by -+ spread_mm / 2 / speed)
  jet on   = passage widened by margin_ms each side
  command  = jet on shifted earlier by the valve's opening latency
The pulse is a command with absolute times; the valve backend (simulated
hardware, controller firmware or an RT thread) fires it.  A pulse whose
command start is less than min_lead_ms away is never sent: the stone is a
deadline miss and falls to REJECT.

`Planner` also prevents co-deflection: a jet that would also catch another
stone's predicted passage is not fired; both stones take the safe route.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sorterd.config import EjectionConfig, GeometryConfig
from sorterd.controller.outputs import Pulse
from sorterd.domain import JET_BINS
from sorterd.sorting.physics import fall_time_s, passage_window_ns
from sorterd.sorting.track import Track


def lip_time_ns(track: Track, geometry: GeometryConfig) -> int:
    return track.t_obs_ns + int((geometry.lip_mm - track.x_mm) / track.speed_mm_s * 1e9)


def nozzle_passage(track: Track, bin_name: str, geometry: GeometryConfig) -> tuple[int, int]:
    drop = geometry.nozzle_drop_mm[bin_name]
    t_c = lip_time_ns(track, geometry) + int(fall_time_s(drop) * 1e9)
    start, end = passage_window_ns(t_c, drop, track.length_mm, geometry.jet_width_mm)
    spread = int(track.spread_mm / 2.0 / track.speed_mm_s * 1e9)
    return start - spread, end + spread


def plan_pulse(track: Track, bin_name: str, geometry: GeometryConfig, ejection: EjectionConfig) -> Pulse:
    """The command that puts the jet over the stone's whole passage, plus margins."""
    start, end = nozzle_passage(track, bin_name, geometry)
    margin = int(ejection.margin_ms * 1e6)
    latency = int(ejection.opening_latency_ms[bin_name] * 1e6)
    on, off = start - margin - latency, end + margin - latency
    off = min(off, on + int(ejection.max_pulse_ms * 1e6))
    return Pulse(bin_name, on, off, track.stone_id)


def jet_interval(pulse: Pulse, ejection: EjectionConfig) -> tuple[int, int]:
    """When the jet itself is expected to blow for a command."""
    latency = int(ejection.opening_latency_ms[pulse.valve] * 1e6)
    return pulse.start_ns + latency, pulse.end_ns + latency


def nozzles_passed(target: str, geometry: GeometryConfig) -> list[str]:
    """Nozzles a stone bound for `target` falls past (top to bottom, inclusive)."""
    order = sorted(JET_BINS, key=lambda b: geometry.nozzle_drop_mm[b])
    if target not in order:  # REJECT: falls past all of them
        return order
    return order[: order.index(target) + 1]


@dataclass
class Planner:
    """Predicted passages of recent stones and the pulses planned for them.

    Owned by the event-loop thread (the pipeline's consumer task).
    """

    geometry: GeometryConfig
    ejection: EjectionConfig
    tracks: dict[str, Track] = field(default_factory=dict)
    pulses: dict[str, Pulse] = field(default_factory=dict)

    def add(self, track: Track) -> None:
        self.tracks[track.stone_id] = track

    def forget_before(self, t_ns: int) -> None:
        """Drop stones that have passed every nozzle before t_ns."""
        bottom = max(self.geometry.nozzle_drop_mm, key=lambda b: self.geometry.nozzle_drop_mm[b])
        for sid in [s for s, tr in self.tracks.items() if nozzle_passage(tr, bottom, self.geometry)[1] < t_ns]:
            self.tracks.pop(sid, None)
            self.pulses.pop(sid, None)

    def conflicts(self, pulse: Pulse) -> list[str]:
        """Other stones whose passage at this nozzle the jet would also catch."""
        on, off = jet_interval(pulse, self.ejection)
        return [
            sid for sid, tr in self.tracks.items()
            if sid != pulse.stone_id and _overlaps(nozzle_passage(tr, pulse.valve, self.geometry), (on, off))
        ]

    def caught_by(self, track: Track, target: str) -> list[str]:
        """Stones whose planned pulses would catch `track` on its way to `target`."""
        hits = []
        for sid, p in self.pulses.items():
            if sid == track.stone_id or p.valve not in nozzles_passed(target, self.geometry):
                continue
            if _overlaps(nozzle_passage(track, p.valve, self.geometry), jet_interval(p, self.ejection)):
                hits.append(sid)
        return hits

    def iter_pulses(self) -> Iterator[Pulse]:
        return iter(self.pulses.values())


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]
