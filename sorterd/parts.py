"""Opens every hardware part through the backend its config section names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sorterd.camera import Camera
from sorterd.clock import Clock
from sorterd.config import Config
from sorterd.lights import Lights
from sorterd.trigger import Trigger
from sorterd.valves import Valves


@dataclass
class Parts:
    camera: Camera
    lights: Lights
    trigger: Trigger
    valves: Valves
    machine: Any = None  # the SimMachine when any part is simulated

    def close(self) -> None:
        # Valves first: whatever else fails, the jets must end up off.
        for part in (self.valves, self.trigger, self.camera, self.lights):
            try:
                part.close() if part is not self.lights else self.lights.all_off()
            except Exception:  # noqa: BLE001 -- one failing part must not stop the others closing
                import logging

                logging.getLogger(__name__).exception("closing %s failed", type(part).__name__)


def open_parts(cfg: Config, clock: Clock) -> Parts:
    machine = None
    if cfg.simulated:
        from sorterd.sim.machine import SimMachine

        machine = SimMachine(cfg)
    return Parts(
        camera=_camera(cfg, machine, clock),
        lights=_lights(cfg),
        trigger=_trigger(cfg, machine, clock),
        valves=_valves(cfg, machine, clock),
        machine=machine,
    )


def _camera(cfg: Config, machine: Any, clock: Clock) -> Camera:
    from sorterd.camera.sim import SimCamera

    return SimCamera(cfg.camera, machine, clock)


def _lights(cfg: Config) -> Lights:
    from sorterd.lights.sim import SimLights

    return SimLights(cfg.lights)


def _trigger(cfg: Config, machine: Any, clock: Clock) -> Trigger:
    from sorterd.trigger.sim import SimTrigger

    return SimTrigger(cfg.trigger, machine, clock)


def _valves(cfg: Config, machine: Any, clock: Clock) -> Valves:
    from sorterd.valves.sim import SimValves

    return SimValves(cfg.valves, machine, clock)
