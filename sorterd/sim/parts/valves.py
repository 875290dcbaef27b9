"""Simulated valves: ideal hardware timers that open the world's jets.

A real controller fires from a hardware timer; so does this backend: the
jet opens at the commanded instant plus the valve's true (simulated)
latency, whatever the event loop is doing.  It refuses a pulse whose start
is closer than the command latency, like the firmware refuses a late one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sorterd.clock import Clock
from sorterd.configfile import opt
from sorterd.controller.outputs import Pulse, PulseOutcome, ValveStats
from sorterd.parts.registry import Backend, Opening
from sorterd.parts.valves import ValveOptions

if TYPE_CHECKING:
    from sorterd.sim.machine import SimMachine


@dataclass(frozen=True)
class SimValvesConfig(ValveOptions):
    type: str = opt("sim", "Backend: sim (ideal hardware-timed valves in the simulated machine).", choices=("sim",))
    command_latency_ms: float = opt(
        1.0, "Time for a pulse command to reach the valve timer; later pulses are refused.",
        minval=0.0, maxval=50.0,
    )

    @property
    def wall_clock(self) -> bool:
        return False


class SimValves:
    def __init__(self, cfg: SimValvesConfig, machine: SimMachine, clock: Clock) -> None:
        self.machine = machine
        self.clock = clock
        self.command_latency_ns = int(cfg.command_latency_ms * 1e6)
        # Futures of scheduled pulses until their outcome is collected; loop thread only.
        self._pending: dict[Pulse, asyncio.Future[PulseOutcome]] = {}

    def schedule(self, pulse: Pulse) -> str | None:
        lead = pulse.start_ns - self.clock.now_ns()
        if lead < self.command_latency_ns:
            return f"refused: start {lead / 1e6:.2f} ms ahead, needs {self.command_latency_ns / 1e6:.2f} ms"
        fut: asyncio.Future[PulseOutcome] = asyncio.get_running_loop().create_future()
        self._pending[pulse] = fut
        asyncio.get_running_loop().create_task(self._fire_at(pulse, fut))
        return None

    async def _fire_at(self, pulse: Pulse, fut: asyncio.Future[PulseOutcome]) -> None:
        await self.clock.sleep_until(pulse.start_ns)
        if fut.done():  # cancelled meanwhile
            return
        self.machine.world.open_jet(pulse.valve, pulse.start_ns, pulse.end_ns)  # the air follows, later
        # Like a controller, report the drive edges (exactly on time here), not the jet.
        fut.set_result(PulseOutcome(pulse, True, pulse.start_ns, pulse.end_ns, "fired"))

    def cancel(self, pulse: Pulse) -> bool:
        fut = self._pending.get(pulse)
        if fut is None or fut.done() or pulse.start_ns - self.clock.now_ns() < self.command_latency_ns:
            return False
        fut.set_result(PulseOutcome(pulse, False, None, None, "cancelled"))
        return True

    async def outcome(self, pulse: Pulse) -> PulseOutcome:
        fut = self._pending.get(pulse)
        if fut is None:
            raise KeyError(f"pulse for {pulse.stone_id} was never scheduled")
        try:
            return await asyncio.shield(fut)
        finally:
            if fut.done():
                self._pending.pop(pulse, None)

    def stats(self) -> ValveStats | None:
        """Ideal timers fire exactly when commanded: nothing to measure."""
        return None

    def close(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()


def _open(cfg: SimValvesConfig, opening: Opening) -> SimValves:
    return SimValves(cfg, opening.machine, opening.clock)


BACKEND = Backend("valves", "sim", SimValvesConfig, _open)
