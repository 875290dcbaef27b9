"""The backends of every hardware part: a `type` key, its options class and its opener.

Each backend module declares its own `Backend` record next to its options and
its class; this module gathers the real ones.  The simulator's backends are
listed in `sorterd/sim/parts/__init__.py`, and the composition root
(`sorterd/cli/compose.py`) merges both -- so nothing here, and nothing that
parses a config, imports the simulator.

Config parsing needs only the options classes (`options_table`); opening a
part calls its backend's opener with the part's options and an `Opening`:
the config, the clock and the parts opened before it (valves first: the `mcu`
lights are outputs of the valve controller; the `vision` trigger watches the
camera's previews).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sorterd.clock import Clock
    from sorterd.config import Config
    from sorterd.parts.camera import Camera
    from sorterd.parts.lights import Lights
    from sorterd.parts.valves import Valves

PARTS = ("camera", "lights", "trigger", "valves", "inference")

# Old spellings refused with the new one: (part, type) -> what to write instead.
RENAMED: dict[tuple[str, str], str] = {
    ("valves", "jetson"): "valves.type = 'gpio' with valves.library = 'jetson'",
    ("valves", "gpiod"): "valves.type = 'gpio' with valves.library = 'gpiod'",
}


@dataclass
class Opening:
    """What an opener may use: the whole config, the clock, and what is already open.

    `machine` is whatever the composition root made for simulated backends
    (the simulated machine); real backends never read it.  `stop_at`, when
    set, says when the run's stones are all past (a simulated run's end) for
    triggers that would otherwise watch forever.  `edge_observer`, when set, is
    told every output edge a host-driven backend (GPIO lines) actually drove (the
    simulated machine's jets listen to it).  `shared` holds things two backends
    of one source share (the replayed session)."""

    cfg: Config
    clock: Clock
    machine: Any = None
    valves: Valves | None = None
    lights: Lights | None = None
    camera: Camera | None = None
    stop_at: Callable[[], int | None] | None = None
    edge_observer: Callable[[str, int, int], object] | None = None
    shared: dict[str, Any] | None = None


@dataclass(frozen=True)
class Backend:
    """One backend of one part: `[part] type = "type"` parses into `options` and is opened by
    `open(options, opening)` (None: the part is opened by its user, as inference is by `run`)."""

    part: str
    type: str
    options: builtins.type
    open: Callable[[Any, Opening], Any] | None = None


Registry = dict[str, dict[str, Backend]]


def build_registry(*groups: Iterable[Backend]) -> Registry:
    """part -> type -> Backend from backend lists; the first backend of a part is its default.

    A type listed twice is a programming error (two backends answering one key)."""
    out: Registry = {p: {} for p in PARTS}
    for group in groups:
        for b in group:
            if b.part not in out:
                raise ValueError(f"backend {b.type!r}: unknown part {b.part!r}; parts are {', '.join(PARTS)}")
            if b.type in out[b.part]:
                raise ValueError(f"{b.part}.type = {b.type!r} is registered twice")
            out[b.part][b.type] = b
    return out


def options_table(registry: Registry) -> dict[str, dict[str, type]]:
    """part -> type -> options class: what config parsing needs."""
    return {part: {kind: b.options for kind, b in backends.items()} for part, backends in registry.items()}


def real_backends() -> list[Backend]:
    """The backends that drive (or replay) real hardware, gathered from their modules."""
    from sorterd.parts.camera import opencv, replay
    from sorterd.parts.inference import onnxruntime, tensorrt
    from sorterd.parts.lights import pulsed
    from sorterd.parts.trigger import beam, vision
    from sorterd.parts.valves import dry, gpio, mcu

    return [replay.CAMERA_BACKEND, opencv.BACKEND, pulsed.MCU_BACKEND, pulsed.GPIO_BACKEND,
            replay.TRIGGER_BACKEND, beam.BACKEND, vision.BACKEND, dry.BACKEND, mcu.BACKEND, gpio.BACKEND,
            onnxruntime.BACKEND, tensorrt.BACKEND]
