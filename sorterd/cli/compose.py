"""Opens every hardware part through the backend its config section names."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sorterd.clock import Clock
from sorterd.config import Config
from sorterd.parts.camera import Camera
from sorterd.parts.lights import Lights
from sorterd.parts.trigger import Trigger
from sorterd.parts.valves import Valves

if TYPE_CHECKING:
    from sorterd.sorting.summary import RunTruth

log = logging.getLogger(__name__)


class SimulatedMachine(Protocol):
    """What `sorterd run` does with the simulated machine: the one seam to the world (sorterd.sim.machine)."""

    def feed(self, n: int) -> None: ...

    def start_at(self, t_ns: int) -> None: ...

    def fed_by(self, t_ns: int) -> int: ...

    def last_landing_ns(self) -> int: ...

    def truth(self) -> RunTruth: ...


@dataclass
class Parts:
    camera: Camera
    lights: Lights
    trigger: Trigger
    valves: Valves
    machine: SimulatedMachine | None = None  # when any part is simulated

    def close(self) -> None:
        # Valves first: whatever else fails, the jets must end up off.
        closers = [self.valves.close, self.trigger.close, self.camera.close, self.lights.all_off]
        for close in closers:
            try:
                close()
            except Exception:  # noqa: BLE001 -- one failing part must not stop the others closing
                log.exception("closing %s failed", close)


def open_parts(cfg: Config, clock: Clock) -> Parts:
    machine = None
    if cfg.simulated:
        from sorterd.sim.machine import SimMachine

        machine = SimMachine(cfg)
    replay = _replay_source(cfg, clock)
    opened: list[Any] = []
    try:
        # Valves first (the mcu lights are outputs of the same controller); the
        # vision trigger watches the camera's previews.
        valves = _valves(cfg, machine, clock)
        opened.append(valves.close)
        lights = _lights(cfg, valves, clock)
        opened.append(lights.all_off)
        camera = _camera(cfg, machine, clock, replay)
        opened.append(camera.close)
        trigger = _trigger(cfg, machine, clock, replay, camera, lights)
    except BaseException:
        for close in opened:
            try:
                close()
            except Exception:  # noqa: BLE001 -- the first error is the one to report
                log.exception("closing a part after a failed start")
        raise
    return Parts(camera=camera, lights=lights, trigger=trigger, valves=valves, machine=machine)


def _replay_source(cfg: Config, clock: Clock) -> Any:
    """The recorded session shared by the replay camera and trigger."""
    if cfg.camera.type != "replay":
        return None
    from pathlib import Path

    from sorterd.parts.camera.replay import ReplaySource

    interval = cfg.trigger.interval_ms if cfg.trigger.type == "replay" else 100.0
    return ReplaySource(Path(cfg.camera.session).expanduser(), clock, interval)


def _camera(cfg: Config, machine: Any, clock: Clock, replay: Any) -> Camera:
    if cfg.camera.type == "replay":
        from sorterd.parts.camera.replay import ReplayCamera

        return ReplayCamera(replay)
    if cfg.camera.type == "opencv":
        from sorterd.parts.camera.opencv import OpenCVCamera

        return OpenCVCamera(cfg.camera, clock)
    from sorterd.sim.parts.camera import SimCamera

    return SimCamera(cfg.camera, machine, clock)


def _lights(cfg: Config, valves: Valves, clock: Clock) -> Lights:
    if cfg.lights.type == "mcu":
        from sorterd.parts.lights.pulsed import open_mcu_lights

        return open_mcu_lights(cfg.lights, valves, clock)
    if cfg.lights.type == "gpio":
        from sorterd.parts.lights.pulsed import open_gpio_lights

        return open_gpio_lights(cfg.lights, clock)
    from sorterd.sim.parts.lights import SimLights

    return SimLights(cfg.lights)


def _trigger(cfg: Config, machine: Any, clock: Clock, replay: Any, camera: Camera, lights: Lights) -> Trigger:
    if cfg.trigger.type == "replay":
        from sorterd.parts.camera.replay import ReplayTrigger

        if replay is None:
            raise ValueError("trigger.type = 'replay' needs camera.type = 'replay' (the session to replay)")
        return ReplayTrigger(replay)
    if cfg.trigger.type == "vision":
        from sorterd.parts.trigger.vision import VisionTrigger

        return VisionTrigger(cfg.trigger, camera, lights, clock,
                             stop_at=machine.all_past_ns if machine is not None else None,
                             max_speed_mm_s=cfg.geometry.speed_max_mm_s,
                             reopen_backoff_ms=getattr(cfg.camera, "reopen_backoff_ms", 200.0))
    if cfg.trigger.type == "beam":
        from sorterd.parts.trigger.beam import BeamTrigger

        return BeamTrigger(cfg.trigger, clock)
    from sorterd.sim.parts.trigger import SimTrigger

    return SimTrigger(cfg.trigger, machine, clock)


def _valves(cfg: Config, machine: Any, clock: Clock) -> Valves:
    if cfg.valves.type == "dry":
        from sorterd.parts.valves.dry import DryValves

        return DryValves(clock)
    if cfg.valves.type == "mcu":
        return _mcu_valves(cfg, machine, clock)
    if cfg.valves.type in ("jetson", "gpiod"):
        from sorterd.controller.gpio import open_gpio_valves

        # Lines driving the simulated machine: their actual edges open its jets.
        return open_gpio_valves(cfg.valves, clock, machine.open_jet if machine is not None else None)
    from sorterd.sim.parts.valves import SimValves

    return SimValves(cfg.valves, machine, clock)


def _mcu_valves(cfg: Config, machine: Any, clock: Clock) -> Valves:
    """The controller firmware over serial; port 'sim' = its host build on a pty,
    whose pin edges open the simulated machine's jets."""
    from sorterd.controller.mcu import McuValves

    if clock.virtual:
        raise ValueError("valves.type = 'mcu' talks to real-time firmware: it needs the wall clock, "
                         "not the virtual one (sim.clock = 'wall')")
    port, truth, closers = cfg.valves.port, None, []
    if port == "sim":
        from sorterd.sim.firmware import start_simulated_controller

        ctl = start_simulated_controller(cfg.valves, machine, clock)
        port, truth, closers = ctl.port, ctl.truth, [ctl.close]
    extra = {}
    if cfg.lights.type == "mcu":
        from sorterd.parts.lights.pulsed import mcu_outputs

        extra = mcu_outputs(cfg.lights)
    valves = McuValves(cfg.valves, clock, port, truth=truth, on_close=closers, extra_outputs=extra)
    try:
        valves.start_blocking(cfg.valves.connect_timeout_s)  # startup: nothing else runs yet
    except BaseException:
        valves.close()
        raise
    return valves
