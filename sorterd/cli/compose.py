"""The composition root: the backend registry, config loading, and opening every hardware
part through the backend its config section names.

The only place that merges the real backends (`sorterd/parts/registry.py`) with
the simulator's (`sorterd/sim/parts/`), and the only place that opens parts.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sorterd import config
from sorterd.clock import Clock
from sorterd.config import Config
from sorterd.parts import Parts
from sorterd.parts.registry import Backend, Opening, Registry, build_registry, options_table, real_backends
from sorterd.parts.valves import Valves

if TYPE_CHECKING:
    from sorterd.sorting.summary import RunTruth

log = logging.getLogger(__name__)


class SimulatedMachine(Protocol):
    """What `sorterd run` does with the simulated machine: the one seam to the world (sorterd.sim.machine)."""

    def feed(self, n: int) -> None: ...

    def start_at(self, t_ns: int) -> None: ...

    def stop_feed(self, t_ns: int) -> int:
        """The feeder stops (a stop of the run): no stone enters the view after t_ns; returns the stones fed."""
        ...

    def fed_by(self, t_ns: int) -> int: ...

    def last_landing_ns(self) -> int: ...

    def truth(self, db_path: Path | None = None) -> RunTruth:
        """The world's truth against the run's records (its stones.db: the daemon keeps no rows)."""
        ...

    def all_past_ns(self) -> int:
        """When the last fed stone has left the view (the run's end)."""
        ...

    def open_jet(self, valve: str, on_ns: int, off_ns: int) -> None:
        """An output line was driven over [on, off): the simulated jet opens."""
        ...
@functools.cache
def registry() -> Registry:
    """Every backend: the simulator's first (so `sim` is each part's default), then the real ones."""
    from sorterd.sim.parts import sim_backends

    return build_registry(sim_backends(), real_backends())


def backend_options() -> dict[str, dict[str, type]]:
    """part -> type -> options class, for config parsing."""
    return options_table(registry())


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Load and validate a config file against every backend; `overrides` are CLI flags."""
    return config.load(path, overrides, backends=backend_options())


def config_from_dict(raw: dict[str, Any], source: Path | None = None) -> Config:
    """A validated Config from TOML tables already read (tests, generated configs)."""
    return config.from_dict(raw, source, backends=backend_options())


def config_reference() -> str:
    """The generated config reference (docs/config.md), every backend of every part."""
    return config.reference(backend_options())


@dataclass
class MachineParts(Parts):
    """The parts, and the simulated machine behind them when any part is simulated."""

    machine: SimulatedMachine | None = None


def open_parts(cfg: Config, clock: Clock) -> MachineParts:
    machine = None
    if cfg.simulated:
        from sorterd.sim.machine import SimMachine

        machine = SimMachine(cfg)
    opening = Opening(cfg, clock, machine=machine, stop_at=machine.all_past_ns if machine is not None else None,
                      edge_observer=machine.open_jet if machine is not None else None)
    opened: list[Any] = []
    try:
        # Valves first (the mcu lights are outputs of the same controller); the
        # vision trigger watches the camera's previews.
        valves = opening.valves = _valves(opening)
        opened.append(valves.close)
        lights = opening.lights = _open("lights", cfg.lights, opening)
        opened.append(lights.all_off)
        camera = opening.camera = _open("camera", cfg.camera, opening)
        opened.append(camera.close)
        trigger = _open("trigger", cfg.trigger, opening)
    except BaseException:
        for close in opened:
            try:
                close()
            except Exception:  # noqa: BLE001 -- the first error is the one to report
                log.exception("closing a part after a failed start")
        raise
    return MachineParts(camera=camera, lights=lights, trigger=trigger, valves=valves, machine=machine)


def _backend(part: str, kind: str) -> Backend:
    backend = registry()[part].get(kind)
    if backend is None or backend.open is None:
        known = ", ".join(k for k, b in registry()[part].items() if b.open is not None)
        raise ValueError(f"{part}.type = {kind!r} cannot be opened: choose one of {known}")
    return backend


def _open(part: str, options: Any, opening: Opening) -> Any:
    opener = _backend(part, options.type).open
    assert opener is not None  # checked by _backend
    return opener(options, opening)


def _valves(opening: Opening) -> Valves:
    """The valves' backend; with the simulated machine, the `mcu` backend talks to the
    firmware's host build on a pseudo-terminal, whose pin edges open the simulated jets
    (unless sim.controller = 'port': then to valves.port, like a real machine)."""
    from sorterd.parts.valves.mcu import McuValvesConfig, open_mcu_valves

    cfg = opening.cfg
    host_build = opening.machine is not None and cfg.sim.controller == "host_build"
    if not (host_build and isinstance(cfg.valves, McuValvesConfig)):
        return _open("valves", cfg.valves, opening)
    if opening.clock.virtual:  # refuse before starting the firmware
        raise ValueError("valves.type = 'mcu' talks to real-time firmware: it needs the wall clock, "
                         "not the virtual one (sim.clock = 'wall')")
    from sorterd.sim.firmware import start_simulated_controller

    ctl = start_simulated_controller(cfg.valves, cfg.sim, opening.machine, opening.clock)
    return open_mcu_valves(cfg.valves, opening, ctl.port, truth=ctl.truth, on_close=[ctl.close])
