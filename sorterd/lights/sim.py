"""Simulated strobes: record the light intervals (the renderer assumes them)."""

from __future__ import annotations

import asyncio
from collections import deque

from sorterd.config import SimLightsConfig
from sorterd.lights import StrobeResult, done


class SimLights:
    def __init__(self, cfg: SimLightsConfig) -> None:
        self.cfg = cfg
        self.lead_ns = int(cfg.lead_ms * 1e6)
        self.tolerance_ns = 0  # simulated edges are exact
        # (mode, on_ns, off_ns); bounded: only recent history is kept for audit.
        self.history: deque[tuple[str, int, int]] = deque(maxlen=4096)

    def strobe(self, mode: str, t_on_ns: int, t_off_ns: int) -> asyncio.Future[StrobeResult]:
        self.history.append((mode, t_on_ns, t_off_ns))
        return done(StrobeResult(mode, t_on_ns, t_off_ns, "lit"))

    def all_off(self) -> None:
        pass
