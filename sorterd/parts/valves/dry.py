"""Dry-run valves: pulses are planned, checked for lateness and logged; nothing is driven.

For replaying recorded sessions and for commissioning a sorter with the air off.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sorterd.clock import Clock
from sorterd.configfile import opt
from sorterd.controller.outputs import Pulse, PulseOutcome, ValveStats
from sorterd.parts.registry import Backend, Opening
from sorterd.parts.valves import ValveOptions


@dataclass(frozen=True)
class DryValvesConfig(ValveOptions):
    type: str = opt("dry", "Backend: dry run -- pulses are planned and logged, no output is driven.", choices=("dry",))

    @property
    def wall_clock(self) -> bool:
        return False


class DryValves:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        # Loop thread only.
        self._cancelled: set[Pulse] = set()

    def schedule(self, pulse: Pulse) -> str | None:
        if pulse.start_ns <= self.clock.now_ns():
            return "refused: start already passed"
        return None

    def cancel(self, pulse: Pulse) -> bool:
        if pulse.start_ns <= self.clock.now_ns():
            return False
        self._cancelled.add(pulse)
        return True

    async def outcome(self, pulse: Pulse) -> PulseOutcome:
        await self.clock.sleep_until(pulse.end_ns)
        if pulse in self._cancelled:
            self._cancelled.discard(pulse)
            return PulseOutcome(pulse, False, None, None, "cancelled")
        await asyncio.sleep(0)
        return PulseOutcome(pulse, False, None, None, "dry run")

    def stats(self) -> ValveStats | None:
        """Nothing is driven, so there are no edges to time."""
        return None

    def close(self) -> None:
        self._cancelled.clear()


def _open(cfg: DryValvesConfig, opening: Opening) -> DryValves:
    return DryValves(opening.clock)


BACKEND = Backend("valves", "dry", DryValvesConfig, _open)
