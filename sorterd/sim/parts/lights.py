"""Simulated strobes: lit exactly as asked (the renderer assumes it)."""

from __future__ import annotations

import asyncio
from typing import Any

from sorterd.config import SimLightsConfig
from sorterd.parts.lights import StrobeResult, done


class SimLights:
    def __init__(self, cfg: SimLightsConfig) -> None:
        self.cfg = cfg
        self.lead_ns = int(cfg.lead_ms * 1e6)
        self.tolerance_ns = 0  # simulated edges are exact

    def strobe(self, mode: str, t_on_ns: int, t_off_ns: int) -> asyncio.Future[StrobeResult]:
        return done(StrobeResult(mode, t_on_ns, t_off_ns, "lit"))

    def timing(self) -> dict[str, Any] | None:
        """Simulated edges are exact: nothing to report."""
        return None

    def all_off(self) -> None:
        pass
