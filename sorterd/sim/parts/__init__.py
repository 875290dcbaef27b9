"""The simulated machine's backends: one per part, opened on the SimMachine.

The composition root (`sorterd/cli/compose.py`) merges `sim_backends()` with
the real ones (`sorterd/parts/registry.py`); they come first, so `sim` is
each part's default type.
"""

from __future__ import annotations

from sorterd.parts.registry import Backend


def sim_backends() -> list[Backend]:
    """The sim backend of each part (imported here, not by anything real)."""
    from sorterd.sim.parts import camera, lights, trigger, valves

    return [camera.BACKEND, lights.BACKEND, trigger.BACKEND, valves.BACKEND]
