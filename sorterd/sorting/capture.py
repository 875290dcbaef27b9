"""One frame pair (§2.2): backlit strobe + frame at t0, ring light + frame at
t0 + pair_interval, every light off by t0 + lights_off.

Both strobes are scheduled before the first exposure (a controller needs them
ahead of time: t0 is `lights.lead_ns` after now).  The pair carries the
lights' reports; `lighting_fault` audits them once they are in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from sorterd.clock import Clock
from sorterd.parts.camera import Camera, FramePair
from sorterd.parts.lights import Lights, StrobeResult, check_pair

# A strobe's report may come this long after the pair had to be dark (controller
# reports travel over serial); later, the lighting is unconfirmed.
CONFIRM_GRACE_NS = 30_000_000
SWITCH_GAP_NS = 100_000  # backlight off this long before the ring light comes on


def strobe_pair(lights: Lights, t0: int, pair_interval_ns: int, lights_off_ns: int) -> list[Awaitable[StrobeResult]]:
    """Schedule one pair's strobes from t0 (StrobeError if the lights refuse one)."""
    t1 = t0 + pair_interval_ns
    # The backlight goes off a little before the ring light comes on: LED drivers take
    # microseconds to switch, and the toplit frame must see no backlight at all.
    return [lights.strobe("backlit", t0, t1 - SWITCH_GAP_NS), lights.strobe("toplit", t1, t0 + lights_off_ns)]


async def capture_pair(camera: Camera, lights: Lights, clock: Clock, seq: int, trigger_ns: int,
                       pair_interval_ns: int, lights_off_ns: int) -> FramePair:
    """Strobe and expose one pair; CameraError / StrobeError propagate (the pair is lost).

    A camera whose frames were lit when they were recorded (`prelit`: replay) gets no strobes."""
    prelit = camera.prelit
    async with camera.lock:
        t0 = clock.now_ns() + (0 if prelit else lights.lead_ns)
        reports = None if prelit else asyncio.gather(*strobe_pair(lights, t0, pair_interval_ns, lights_off_ns))
        try:
            back = await camera.grab("backlit", t0)
            top = await camera.grab("toplit", t0 + pair_interval_ns)
        except BaseException:
            if reports is not None:
                reports.cancel()
                reports.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody will read it
            raise
    return FramePair(seq, trigger_ns, back, top, strobes=reports, dark_ns=t0 + lights_off_ns)


async def lighting_fault(pair: FramePair, clock: Clock, camera: Camera, lights: Lights
                         ) -> tuple[str | None, list[StrobeResult]]:
    """Wait for the pair's strobe reports; (what was wrong or None, the reports)."""
    if pair.strobes is None:
        return None, []
    timeout = max(0.0, (pair.dark_ns + CONFIRM_GRACE_NS - clock.now_ns()) / 1e9)
    try:
        results = list(await asyncio.wait_for(asyncio.shield(pair.strobes), timeout))
    except asyncio.TimeoutError:
        return "strobe reports did not come in time", []
    fault = check_pair(results, pair.backlit.t_ns, pair.toplit.t_ns, pair.dark_ns,
                       exposures_known=camera.exposure_at_strobe, tolerance_ns=lights.tolerance_ns)
    return fault, results
