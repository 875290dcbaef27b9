"""Simulated strobes: lit exactly as asked (the renderer assumes it)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sorterd.configfile import opt
from sorterd.parts.lights import LightsOptions, StrobeResult, done
from sorterd.parts.registry import Backend, Opening


@dataclass(frozen=True)
class SimLightsConfig(LightsOptions):
    type: str = opt("sim", "Backend: sim (the simulated strobes).", choices=("sim",))

    @property
    def wall_clock(self) -> bool:
        return False


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


def _open(cfg: SimLightsConfig, opening: Opening) -> SimLights:
    return SimLights(cfg)


BACKEND = Backend("lights", "sim", SimLightsConfig, _open)
