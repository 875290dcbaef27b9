"""Free fall from the channel lip past the nozzles (shared by the planner and the simulator)."""

from __future__ import annotations

import math

G_MM_S2 = 9806.65


def fall_time_s(drop_mm: float) -> float:
    """Time to fall drop_mm from rest (the stone leaves the lip with ~0 vertical speed)."""
    return math.sqrt(2.0 * drop_mm / G_MM_S2)


def passage_window_ns(t_center_ns: int, drop_mm: float, length_mm: float, jet_mm: float) -> tuple[int, int]:
    """When a stone of vertical extent length_mm overlaps a jet of height jet_mm."""
    speed = G_MM_S2 * fall_time_s(drop_mm)
    half = (length_mm + jet_mm) / 2.0 / speed
    return t_center_ns - int(half * 1e9), t_center_ns + int(half * 1e9)
