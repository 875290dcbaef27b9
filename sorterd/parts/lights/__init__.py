"""Strobe lights: backlight and ring light (and, optionally, the camera's trigger input).

Backends (`[lights] type`):
  * `sim`   the simulated strobes (the renderer lights each frame as asked);
  * `mcu`   strobe outputs of the valve controller (hw/): pulses at absolute
            controller-clock times, fired by its hardware timer, reported back
            with their actual edges (`sorterd/lights/pulsed.py`);
  * `gpio`  strobe lines driven by the same real-time thread design as the
            GPIO valves (`sorterd/lights/pulsed.py`).

`strobe()` schedules one light over [t_on, t_off) in host time and returns a
future `StrobeResult` (the vision trigger looks whether it is in yet): the actual on/off instants as the device reports
them (never the requested ones), or why the light did not come on.  A strobe
that cannot be scheduled raises `StrobeError` at once.  The pipeline checks
every pair's results before its stones are sorted (§2.2: each frame lit by
its own light, everything dark by t0 + 20 ms); a pair whose lighting failed is
not classified and its stones take the safe route.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from sorterd.configfile import ConfigError, opt
from sorterd.domain import LIGHT_MODES


@dataclass(frozen=True)
class LightsOptions:
    """What every `[lights]` backend's options declare: the pair timing the pipeline,
    calibration and the simulator read."""

    type: str = opt("", "Backend.")
    pair_interval_ms: float = opt(10.0, "Backlit frame at t0, toplit frame at t0 + this.", minval=1.0, maxval=50.0)
    lights_off_ms: float = opt(20.0, "All lights off by t0 + this.", minval=2.0, maxval=100.0)
    lead_ms: float = opt(0.0, "A pair's t0 is this far after the trigger is taken (time for the strobe commands to arrive).",
                         minval=0.0, maxval=50.0)

    def __post_init__(self) -> None:
        if self.lights_off_ms <= self.pair_interval_ms:
            raise ConfigError([f"lights.lights_off_ms = {self.lights_off_ms} must be above lights.pair_interval_ms = "
                               f"{self.pair_interval_ms}: the ring light is on from t0 + pair_interval_ms until then"])

    @property
    def camera_pin(self) -> int:
        """The output pulsing the camera's trigger input (camera.trigger = 'hardware'); -1 = none."""
        return -1

    @property
    def wall_clock(self) -> bool:
        """The backend drives real lights on real time."""
        return True

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        """Problems of this backend with the other sections (all built); none by default."""
        return []


class StrobeError(RuntimeError):
    """A strobe could not be scheduled (too late, controller not ready, lines failed)."""


@dataclass(frozen=True)
class StrobeResult:
    mode: str  # backlit | toplit | camera
    on_ns: int | None  # actual edges, host monotonic ns
    off_ns: int | None
    status: str  # "lit", or what went wrong ("refused: ...", "unknown: ...", "cancelled")
    camera_ns: int | None = None  # actual edge of the camera trigger pulse, when the lights drive it

    @property
    def lit(self) -> bool:
        return self.status == "lit" and self.on_ns is not None and self.off_ns is not None

    def covers(self, t_ns: int, tolerance_ns: int = 0) -> bool:
        """The light was on at t_ns (an exposure instant), coming on at most tolerance_ns late."""
        return self.lit and self.on_ns <= t_ns + tolerance_ns and t_ns < self.off_ns  # type: ignore[operator]


class Lights(Protocol):
    """What capture, the vision trigger, calibration and the run summary use of the strobes."""

    lead_ns: int  # a pair's t0 must be at least this far ahead when its strobes are scheduled
    tolerance_ns: int  # the latest an edge may fire (later ones are refused by the backend)

    def strobe(self, mode: str, t_on_ns: int, t_off_ns: int) -> asyncio.Future[StrobeResult]:
        """Light `mode` over [t_on_ns, t_off_ns) (host time); StrobeError if it cannot be scheduled."""
        ...

    def timing(self) -> dict[str, Any] | None:
        """The edges' timing for the run summary (strobe_error_us, strobe_refusals); None: not measured."""
        ...

    def all_off(self) -> None: ...


EDGE_KEYS = ("backlit_on_ns", "backlit_off_ns", "toplit_on_ns", "toplit_off_ns")


def strobe_edges(results: list[StrobeResult]) -> dict[str, int | None]:
    """A pair's actual light edges under the names the stone log and frames.jsonl use."""
    by_mode = {r.mode: r for r in results}
    return {f"{m}_{e}_ns": getattr(by_mode[m], f"{e}_ns") if m in by_mode else None
            for m in LIGHT_MODES for e in ("on", "off")}


def done(result: StrobeResult) -> asyncio.Future[StrobeResult]:
    """An already-known result (backends that learn the outcome at once)."""
    fut: asyncio.Future[StrobeResult] = asyncio.get_running_loop().create_future()
    fut.set_result(result)
    return fut


def check_pair(results: list[StrobeResult], t_backlit: int, t_toplit: int, t_dark: int,
               exposures_known: bool = True, tolerance_ns: int = 0) -> str | None:
    """§2.2 audit of one pair's lighting: None if right, else what was wrong.

    `exposures_known`: the frames' timestamps are the exposure instants the
    lights were timed for (simulated or hardware-triggered cameras); a
    free-running camera's timestamps mark its own frame clock, so only the
    strobes themselves are checked.  `tolerance_ns`: how late an edge the
    lights' backend lets fire (its late limit; later ones it refuses) -- the
    cost is that much less light at the start of the exposure."""
    by_mode = {r.mode: r for r in results}
    for mode, t in (("backlit", t_backlit), ("toplit", t_toplit)):
        r = by_mode.get(mode)
        if r is None or not r.lit:
            return f"{mode} strobe {r.status if r else 'missing'}"
        if exposures_known and not r.covers(t, tolerance_ns):
            return f"{mode} strobe on [{r.on_ns}, {r.off_ns}) missed its exposure at {t}"
    for r in results:
        if r.mode in LIGHT_MODES and r.off_ns is not None and r.off_ns > t_dark + tolerance_ns:
            return f"{r.mode} strobe still on {(r.off_ns - t_dark) / 1e6:.2f} ms after t0 + lights_off_ms"
    back = by_mode["backlit"]
    if back.off_ns is not None and back.off_ns > t_toplit + tolerance_ns:
        return f"backlight still on at the toplit exposure ({(back.off_ns - t_toplit) / 1e3:.0f} us over)"
    return None
