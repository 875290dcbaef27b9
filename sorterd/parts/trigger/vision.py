"""The `vision` trigger: cheap backlit previews of the entry zone, compared with the reference.

No sensor to wire: the camera itself watches a band of the view (the entry
zone; stones come in from the left and move right) at `preview_hz`.  Each
preview is a short backlight strobe and one frame; the zone is cut out,
shrunk by `downscale` (INTER_AREA: an average, so sensor noise drops too) and
compared with the same band of the empty-channel reference.  Pixels that
differ by more than `threshold_dn` in any channel are "something there";
columns with such pixels form runs (objects along the channel), and a run
with at least `min_area_mm2` of them is a stone.  Each stone's front (its
right end) is followed from one preview to the next: a front that no stone
of the previous preview can have moved to (at most the top speed times the
period, never backwards) is a new stone, and the trigger fires with that
preview's exposure instant as the edge time.  So stones closer together
than the zone's length are still one trigger each, and a stone that stays in
the zone for several previews is still one trigger.  `clear_frames` is how
many previews a front may go unseen (a faint stone flickering under the
threshold) before it is forgotten.

Timing: a stone is seen at most one preview period (5 ms at 200 Hz) after its
front enters the zone; the zone's far edge must leave the whole stone in view
by the time its pair is exposed (`zone_to_mm` + top speed x (period + lead +
pair interval) < view width).

The camera is shared with pair capture through its `lock`; a pair waits at
most one preview.  A camera that fails during previews is reopened here (with
backoff): stones passing meanwhile are not seen at all and, unlike with a
beam, cannot be counted -- they fall to REJECT by the default trajectory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from sorterd.clock import Clock
from sorterd.configfile import ConfigError, opt
from sorterd.parts.camera import Camera, CameraError, Frame
from sorterd.parts.lights import Lights, StrobeError
from sorterd.parts.registry import Backend, Opening
from sorterd.parts.trigger import CALLBACK_SLACK_NS, TriggerEvent, TriggerOptions

log = logging.getLogger(__name__)

GAP_COLS = 2  # changed columns this close (preview columns) are one object


@dataclass(frozen=True)
class VisionTriggerConfig(TriggerOptions):
    type: str = opt("vision", "Backend: vision -- cheap backlit preview frames compared with the reference; a stone "
                    "entering the zone starts the pair.", choices=("vision",))
    preview_hz: float = opt(200.0, "Preview frames per second (a stone must be seen while wholly in view: "
                            "zone length / top speed > 2 preview periods).", minval=10.0, maxval=2000.0)
    zone_from_mm: float = opt(6.0, "The entry zone starts this far from the view's left edge (stones come from the left).",
                              minval=0.0)
    zone_to_mm: float = opt(14.0, "... and ends here.", above=0.0)
    downscale: int = opt(4, "Previews are compared at 1/downscale of the full resolution.", minval=1, maxval=16)
    threshold_dn: float = opt(25.0, "A preview pixel differing from the reference by more than this (max over BGR) is "
                              "'something there'.", minval=1.0, maxval=255.0)
    min_area_mm2: float = opt(0.4, "That much changed area in the zone is a stone (below: noise, dust).",
                              minval=0.01, maxval=100.0)
    clear_frames: int = opt(2, "A stone's front may go unseen this many previews (flicker) before it is forgotten "
                            "and could trigger again.", minval=1, maxval=100)
    strobe_ms: float = opt(1.0, "Backlight strobe per preview frame (the camera's backlit exposure must fit in it).",
                           minval=0.05, maxval=20.0)

    def __post_init__(self) -> None:
        if self.zone_to_mm <= self.zone_from_mm:
            raise ConfigError([f"trigger.zone_to_mm = {self.zone_to_mm} must be above trigger.zone_from_mm = "
                               f"{self.zone_from_mm}"])

    @property
    def front_mm(self) -> float | None:
        return self.zone_from_mm

    @property
    def slack_ns(self) -> int:
        """A front is seen only once per preview: up to two preview periods late, plus a callback."""
        return CALLBACK_SLACK_NS + int(2e9 / self.preview_hz)

class VisionTrigger:
    def __init__(self, cfg: VisionTriggerConfig, camera: Camera, lights: Lights, clock: Clock,
                 stop_at: Callable[[], int | None] | None = None, max_speed_mm_s: float = 1000.0,
                 reopen_backoff_ms: float = 200.0) -> None:
        self.cfg = cfg
        self.camera = camera
        self.lights = lights
        self.clock = clock
        self._stop_at = stop_at  # simulation: when the fed stones are all past (None: run forever)
        self._end_ns: int | None = None
        self.period_ns = int(1e9 / cfg.preview_hz)
        self.reopen_backoff_ns = int(reopen_backoff_ms * 1e6)  # the camera's own setting, as the pipeline uses
        self.strobe_ns = int(cfg.strobe_ms * 1e6)
        self.ppm = ppm = float(camera.pixels_per_mm)
        self.x0, self.x1 = 0, 1
        self._ref: np.ndarray | None = None
        try:
            self.set_reference(camera.reference("backlit"))
        except CameraError:
            # No empty-channel frame yet (a real camera before today's calibration has taken
            # one): `sorterd calibrate` hands it over with set_reference() once it has it.
            log.info("vision trigger: waiting for a backlit reference frame")
        px_per_mm = ppm / cfg.downscale
        self.min_px = max(1, int(round(cfg.min_area_mm2 * px_per_mm * px_per_mm)))
        self.max_px_per_ns = max_speed_mm_s * px_per_mm / 1e9  # top speed in preview columns
        # (front column, when last seen, previews missed since) of stones in the zone
        self._known: list[tuple[int, int, int]] = []
        self._next_ns: int | None = None
        self._last_look_ns: int | None = None  # the last preview examined (loop thread only)
        self._more: list[TriggerEvent] = []  # further stones that entered in the same preview
        self._closed = False
        self.previews = 0
        self.triggers = 0
        self.preview_failures = 0
        self.reopens = 0

    def set_reference(self, backlit: np.ndarray) -> None:
        """The empty channel under the backlight: what 'nothing there' looks like."""
        width, cfg = backlit.shape[1], self.cfg
        if cfg.zone_from_mm * self.ppm >= width:
            raise ConfigError([f"trigger.zone_from_mm = {cfg.zone_from_mm} is outside the camera's view "
                               f"({width / self.ppm:.1f} mm wide at {self.ppm} px/mm)"])
        self.x0 = min(width - 1, int(round(cfg.zone_from_mm * self.ppm)))
        self.x1 = min(width, max(self.x0 + 1, int(round(cfg.zone_to_mm * self.ppm))))
        self._ref = self._band(backlit).astype(np.int16)
        self._known = []

    def _band(self, image: np.ndarray) -> np.ndarray:
        band = image[:, self.x0:self.x1]
        d = self.cfg.downscale
        if d == 1:
            return band
        h, w = band.shape[:2]
        return cv2.resize(band, (max(1, w // d), max(1, h // d)), interpolation=cv2.INTER_AREA)

    def occupied_px(self, image: np.ndarray) -> int:
        """Preview pixels in the zone that differ from the empty channel."""
        return int(np.count_nonzero(self._mask(image)))

    def _mask(self, image: np.ndarray) -> np.ndarray:
        if self._ref is None:
            raise CameraError("the vision trigger has no backlit reference frame: set camera.reference_dir "
                              "or run `sorterd calibrate` first")
        diff = np.abs(self._band(image).astype(np.int16) - self._ref).max(axis=2)
        return diff > self.cfg.threshold_dn

    def fronts(self, image: np.ndarray) -> list[int]:
        """Front (right end, preview columns) of each stone-sized run of changed columns."""
        per_col = self._mask(image).sum(axis=0)
        cols = np.flatnonzero(per_col)
        if cols.size == 0:
            return []
        # Runs of occupied columns; gaps of up to GAP_COLS columns belong to the same object.
        breaks = np.flatnonzero(np.diff(cols) > GAP_COLS + 1)
        starts = np.concatenate(([cols[0]], cols[breaks + 1]))
        ends = np.concatenate((cols[breaks], [cols[-1]]))
        return [int(e) for b, e in zip(starts, ends, strict=True) if per_col[b:e + 1].sum() >= self.min_px]

    def _new_stones(self, fronts: list[int], t_ns: int) -> int:
        """How many of these fronts (seen at t_ns) no known stone can have moved to; updates the known ones."""
        new = 0
        seen: list[tuple[int, int, int]] = []
        known = list(self._known)
        for f in fronts:
            # A known front can be here now if it moved forward at most at top speed since it
            # was last seen (pair captures pause the previews), and not backwards beyond jitter.
            match = next((k for k in known if -GAP_COLS <= f - k[0] <= self.max_px_per_ns * (t_ns - k[1]) + 1.0),
                         None)
            if match is None:
                new += 1
            else:
                known.remove(match)
            seen.append((f, t_ns, 0))
        # Fronts not seen this time are remembered for clear_frames previews -- counted, not
        # timed: while a pair holds the camera no preview is taken, and a front missed in the
        # first one after it must not be forgotten at once (it would trigger again: an edge
        # for a stone that does not exist).
        self._known = seen + [(c, t, missed + 1) for c, t, missed in known if missed + 1 < self.cfg.clear_frames]
        return new

    async def next(self) -> TriggerEvent | None:
        if self._ref is None:
            self.set_reference(self.camera.reference("backlit"))  # CameraError: still none
        if self._more:
            return self._more.pop()
        while not self._closed:
            now = self.clock.now_ns()
            # Asked at every preview: a stop of the run ends the feed early (the simulator caches it).
            self._end_ns = self._stop_at() if self._stop_at is not None else None
            if self._end_ns is not None and now >= self._end_ns:
                return None
            # Previews on a fixed grid; sleeping first lets a pending pair take the camera.
            self._next_ns = now if self._next_ns is None or self._next_ns < now else self._next_ns
            await self.clock.sleep_until(self._next_ns)
            self._next_ns += self.period_ns
            frame = await self._preview()
            if frame is None:
                continue
            self.previews += 1
            # A few thousand pixels: tens of microseconds, fine on the loop.
            earliest = self._earliest_crossing_ns()
            self._last_look_ns = frame.t_ns
            if new := self._new_stones(self.fronts(frame.image), frame.t_ns):
                # Several stones can enter between two previews (one held back by a pair):
                # one edge each, or the ledger finds decided stones without one.
                self.triggers += new
                self._more = [TriggerEvent(frame.t_ns, earliest)] * (new - 1)
                return TriggerEvent(frame.t_ns, earliest)
        return None

    def _earliest_crossing_ns(self) -> int | None:
        """A new front was not in the last preview, or only below min_area_mm2 (a preview
        earlier): it crossed the zone's start after that.  Previews wait while a pair holds
        the camera, so this can be far more than a preview period before the edge."""
        return None if self._last_look_ns is None else self._last_look_ns - self.period_ns

    async def _preview(self) -> Frame | None:
        async with self.camera.lock:
            t = self.clock.now_ns() + self.lights.lead_ns
            try:
                report = self.lights.strobe("backlit", t, t + self.strobe_ns)
                frame = await self.camera.grab("backlit", t)
                # An unlit preview differs from the reference everywhere: it would read as a stone.
                # (Reports that come later -- a controller's, over serial -- are not waited for.)
                if report.done() and not report.cancelled() and report.exception() is None and not report.result().lit:
                    self.preview_failures += 1
                    log.debug("preview strobe not lit: %s", report.result().status)
                    return None
                return frame
            except StrobeError as exc:
                self.preview_failures += 1
                log.debug("preview strobe refused: %s", exc)
                return None
            except CameraError as exc:
                self.preview_failures += 1
                log.error("camera lost during previews (%s): no stone can trigger until it is back", exc)
                await self._reopen()
                return None

    async def _reopen(self) -> None:
        """Called with the camera lock held: nobody else can use the camera meanwhile anyway."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                await loop.run_in_executor(None, self.camera.reopen)
                self.reopens += 1
                log.warning("camera back: previews resume")
                return
            except CameraError as exc:
                log.debug("camera reopen failed: %s", exc)
                await self.clock.sleep_until(self.clock.now_ns() + self.reopen_backoff_ns)

    def stats(self) -> dict[str, int]:
        return {"previews": self.previews, "triggers": self.triggers,
                "preview_failures": self.preview_failures, "reopens": self.reopens}

    def close(self) -> None:
        self._closed = True


def _open(cfg: VisionTriggerConfig, opening: Opening) -> VisionTrigger:
    if opening.camera is None or opening.lights is None:
        raise ValueError("trigger.type = 'vision' watches the camera's previews: open the camera and lights first")
    return VisionTrigger(cfg, opening.camera, opening.lights, opening.clock, stop_at=opening.stop_at,
                         max_speed_mm_s=opening.cfg.geometry.speed_max_mm_s,
                         reopen_backoff_ms=opening.cfg.camera.reopen_backoff_ms)


BACKEND = Backend("trigger", "vision", VisionTriggerConfig, _open)
