"""Simulated strobes: record the light intervals (the renderer assumes them)."""

from __future__ import annotations

from collections import deque

from sorterd.config import SimLightsConfig


class SimLights:
    def __init__(self, cfg: SimLightsConfig) -> None:
        self.cfg = cfg
        # (mode, on_ns, off_ns); bounded: only recent history is kept for audit.
        self.history: deque[tuple[str, int, int]] = deque(maxlen=4096)

    def strobe(self, mode: str, t_on_ns: int, t_off_ns: int) -> None:
        self.history.append((mode, t_on_ns, t_off_ns))

    def all_off(self) -> None:
        pass
