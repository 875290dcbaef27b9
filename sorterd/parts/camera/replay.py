"""Replay: a recorded session folder fed through the live pipeline.

One recorded pair per trigger.  When the session has recorded times
(frames.jsonl) the triggers and exposures happen at the same relative
instants as when it was recorded, so tracking, neighbour checks and decisions
repeat exactly; a hand-written session is spaced `interval_ms` apart.  The
session's own reference frames and scale are used: replay needs no
calibration of the day.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sorterd.clock import Clock
from sorterd.configfile import ConfigError, opt
from sorterd.data.session import SessionError, SessionReader
from sorterd.parts.camera import CameraError, CameraOptions, Frame, RecordedFrameError, RecordedPair
from sorterd.parts.registry import Backend, Opening
from sorterd.parts.trigger import TriggerEvent, TriggerOptions

REPLAY_BOTH = "a replay needs both camera.type and trigger.type = 'replay' (one trigger per recorded pair)"


def _replay_mismatch(sections: dict[str, Any]) -> list[str]:
    cam, trig = sections["camera"].type, sections["trigger"].type
    if (cam == "replay") != (trig == "replay"):
        return [f"camera.type = {cam!r} with trigger.type = {trig!r}: {REPLAY_BOTH}"]
    return []


@dataclass(frozen=True)
class ReplayCameraConfig(CameraOptions):
    type: str = opt("replay", "Backend: replay a recorded session folder (§7.1 images/raw/<session>/).", choices=("replay",))
    session: str = opt("", "The session folder (with session_meta.json, reference/, backlit/, toplit/).")

    def __post_init__(self) -> None:
        if not self.session:
            raise ConfigError(["camera.session is required with camera.type = 'replay': the session folder to replay"])

    @property
    def wall_clock(self) -> bool:
        return False

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        return _replay_mismatch(sections)


@dataclass(frozen=True)
class ReplayTriggerConfig(TriggerOptions):
    type: str = opt("replay", "Backend: one trigger per recorded pair, at its recorded time.", choices=("replay",))
    interval_ms: float = opt(
        100.0, "Spacing of pairs when the session has no recorded times (a hand-written session).",
        minval=1.0, maxval=10_000.0,
    )

    @property
    def wall_clock(self) -> bool:
        return False

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        return _replay_mismatch(sections)


class ReplaySource:
    """The session and the mapping of its times onto this run's clock (loop thread only)."""

    def __init__(self, session_dir: Path, clock: Clock, interval_ms: float) -> None:
        self.reader = SessionReader(session_dir)
        self.clock = clock
        self.interval_ns = int(interval_ms * 1e6)
        self.dt_ns = int(self.reader.meta.pair_interval_ms * 1e6)
        self.start_ns: int | None = None  # this run's time of the first recorded trigger

    def _recorded(self, i: int) -> tuple[int, int, int]:
        """(trigger, backlit, toplit) of pair i, relative to the first trigger."""
        ids = self.reader.stone_ids
        if self.reader.times is None:
            t = i * self.interval_ns
            return t, t, t + self.dt_ns
        first = self.reader.times[ids[0]].t_trigger_ns
        rec = self.reader.times[ids[i]]
        return rec.t_trigger_ns - first, rec.t_backlit_ns - first, rec.t_toplit_ns - first

    def mapped(self, i: int) -> tuple[int, int, int]:
        if self.start_ns is None:
            self.start_ns = self.clock.now_ns() + 20_000_000
        return tuple(self.start_ns + t for t in self._recorded(i))  # type: ignore[return-value]


class ReplayTrigger:
    def __init__(self, source: ReplaySource) -> None:
        self.source = source
        self._next = 0

    async def next(self) -> TriggerEvent | None:
        if self._next >= len(self.source.reader.stone_ids):
            return None
        t_trigger = self.source.mapped(self._next)[0]
        self._next += 1
        await self.source.clock.sleep_until(t_trigger)
        return TriggerEvent(t_trigger)

    def set_reference(self, backlit: np.ndarray) -> None:
        """Recorded pairs come at their recorded times: nothing to compare with."""

    def close(self) -> None:
        pass


class ReplayCamera:
    prelit = True  # the frames were lit when they were recorded: nothing is strobed
    exposure_at_strobe = True  # the recorded times are the exposure instants (no strobes to check anyway)

    def __init__(self, source: ReplaySource) -> None:
        self.source = source
        self.pixels_per_mm = source.reader.meta.pixels_per_mm
        self.pair_interval_ms: float | None = source.reader.meta.pair_interval_ms
        self.lock = asyncio.Lock()
        self._index = -1
        self._pair: tuple[np.ndarray, np.ndarray] | None = None

    def reference(self, mode: str) -> np.ndarray:
        return self.source.reader.references[mode]

    async def grab(self, mode: str, t_ns: int) -> Frame:
        """The recorded frame, stamped with its recorded instant on this run's clock."""
        if mode == "backlit":
            self._index += 1
            self._pair = None
            self._pair = await asyncio.get_running_loop().run_in_executor(None, self._load, self._index)
        if self._pair is None:
            raise CameraError("replay: toplit frame requested before a backlit one")
        _, t_back, t_top = self.source.mapped(self._index)
        t_frame = t_back if mode == "backlit" else t_top
        await self.source.clock.sleep_until(t_frame)
        ids = self.source.reader.stone_ids
        recorded = RecordedPair(ids[self._index], ids[self._index + 1] if self._index + 1 < len(ids) else None)
        return Frame(self._pair[0] if mode == "backlit" else self._pair[1], t_frame, mode, recorded)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.source.reader.stone_ids
        if i >= len(ids):
            raise CameraError(f"replay: session {self.source.reader.dir} has only {len(ids)} pairs")
        try:  # an unreadable pair is skipped (counted by the pipeline); the replay goes on
            return self.source.reader.read_pair(ids[i])
        except SessionError as exc:
            raise RecordedFrameError(str(exc)) from exc

    def reopen(self) -> None:
        """A session folder cannot come and go; nothing to reopen."""

    def close(self) -> None:
        pass


def _open_camera(cfg: ReplayCameraConfig, opening: Opening) -> ReplayCamera:
    """The session's frames; its source is shared with the replay trigger, opened next."""
    trig = opening.cfg.trigger
    interval = trig.interval_ms if isinstance(trig, ReplayTriggerConfig) else 100.0
    source = ReplaySource(Path(cfg.session).expanduser(), opening.clock, interval)
    opening.shared = {**(opening.shared or {}), "replay": source}
    return ReplayCamera(source)


def _open_trigger(cfg: ReplayTriggerConfig, opening: Opening) -> ReplayTrigger:
    source = (opening.shared or {}).get("replay")
    if source is None:
        raise ValueError("trigger.type = 'replay' needs camera.type = 'replay' (the session to replay)")
    return ReplayTrigger(source)


CAMERA_BACKEND = Backend("camera", "replay", ReplayCameraConfig, _open_camera)
TRIGGER_BACKEND = Backend("trigger", "replay", ReplayTriggerConfig, _open_trigger)
