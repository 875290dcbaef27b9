"""The machine's hardware parts, one package each, every backend beside its Protocol.

camera/ lights/ trigger/ valves/ inference/ -- each `__init__` declares the part's
Protocol (what the pipeline, calibration, summary and metrics use) and the options
every backend of it has; each backend module holds its `type`, its options class
and its opener (`registry.Backend`).  The composition root (`sorterd/cli/compose.py`)
merges these with the simulator's backends and opens them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sorterd.parts.camera import Camera
from sorterd.parts.lights import Lights
from sorterd.parts.trigger import Trigger
from sorterd.parts.valves import Valves

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """One machine's open parts (the pipeline and the calibration rig use them)."""

    camera: Camera
    lights: Lights
    trigger: Trigger
    valves: Valves

    def close(self) -> None:
        # Valves first: whatever else fails, the jets must end up off.
        closers = [self.valves.close, self.trigger.close, self.camera.close, self.lights.all_off]
        for close in closers:
            try:
                close()
            except Exception:  # noqa: BLE001 -- one failing part must not stop the others closing
                log.exception("closing %s failed", close)
