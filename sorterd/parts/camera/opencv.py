"""OpenCV capture: V4L2 devices, GStreamer pipelines (incl. Jetson CSI), video files, image sequences.

Exposure, gain and white balance are fixed per lighting mode and never auto
(§2.1): before each frame the mode's settings are applied (a no-op when they
are unchanged).  With `trigger = "hardware"` the camera exposes on the strobe
controller's pulse and `grab` only collects the frame; with "software" the
frame is read right after the strobe is lit.

Timestamps are converted to host monotonic ns here, at the edge:
  * `timestamps = "driver"`: CAP_PROP_POS_MSEC is the V4L2 buffer timestamp,
    which Linux takes from CLOCK_MONOTONIC (the same clock as the host's);
  * `timestamps = "host"`: the host's clock when the frame arrived, minus the
    configured readout delay (for sources without a usable timestamp).

A camera that fails (unplugged, pipeline error, end of a file) raises
CameraError; the pipeline counts the gap and calls `reopen()` with backoff.
Jetson CSI example source (GStreamer):
  nvarguscamerasrc sensor-id=0 exposuretimerange="1000000 1000000" gainrange="1 1"
  wbmode=0 ! video/x-raw(memory:NVMM),width=1920,height=1080 ! nvvidconv !
  video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sorterd.clock import Clock
from sorterd.configfile import opt
from sorterd.domain import LIGHT_MODES
from sorterd.parts.camera import CameraError, CameraOptions, Frame
from sorterd.parts.registry import Backend, Opening

log = logging.getLogger(__name__)

APIS = {"any": cv2.CAP_ANY, "v4l2": cv2.CAP_V4L2, "gstreamer": cv2.CAP_GSTREAMER,
        "ffmpeg": cv2.CAP_FFMPEG, "images": cv2.CAP_IMAGES}


@dataclass(frozen=True)
class OpenCVCameraConfig(CameraOptions):
    type: str = opt("opencv", "Backend: OpenCV VideoCapture (V4L2, GStreamer incl. Jetson CSI, files).", choices=("opencv",))
    source: str = opt("0", "Device index ('0'), device path ('/dev/video0'), GStreamer pipeline, video file or image pattern ('f_%04d.png').")
    api: str = opt("any", "OpenCV capture API.", choices=("any", "v4l2", "gstreamer", "ffmpeg", "images"))
    width_px: int = opt(0, "Requested frame width; 0 = the source's own.", minval=0, maxval=16384)
    height_px: int = opt(0, "Requested frame height; 0 = the source's own.", minval=0, maxval=16384)
    pixels_per_mm: float = opt(20.0, "Image scale (from calibration: the 2 mm CUT rule depends on it).", minval=2.0, maxval=500.0)
    backlit_exposure_us: float = opt(1000.0, "Fixed exposure under the backlight (§2.2: 500-2000 µs); 0 = leave as is.", minval=0.0, maxval=100_000.0)
    toplit_exposure_us: float = opt(3000.0, "Fixed exposure under the ring light (§2.2: 1000-5000 µs); 0 = leave as is.", minval=0.0, maxval=100_000.0)
    gain: float = opt(0.0, "Fixed gain, as low as possible (§2.1); 0 = leave as is.", minval=0.0, maxval=1000.0)
    wb_temperature_k: float = opt(0.0, "Fixed white-balance temperature; 0 = leave as is (auto WB is always off).", minval=0.0, maxval=15000.0)
    manual_exposure_value: float = opt(1.0, "Value of CAP_PROP_AUTO_EXPOSURE meaning 'manual' for this driver (V4L2: 1).", minval=0.0, maxval=3.0)
    trigger: str = opt("software", "software = read after the strobe; hardware = the strobe controller triggers the exposure.", choices=("software", "hardware"))
    timestamps: str = opt("driver", "driver = V4L2 buffer time (CLOCK_MONOTONIC); host = arrival time minus readout_delay_us.", choices=("driver", "host"))
    readout_delay_us: float = opt(0.0, "Exposure-to-arrival delay subtracted from host timestamps.", minval=0.0, maxval=1_000_000.0)
    reference_dir: str = opt("", "Folder with backlit.png and toplit.png of the empty channel (from calibration).")

    def with_reference_dir(self, path: str) -> CameraOptions:
        """Calibration's reference frames, unless this config names its own folder."""
        return self if self.reference_dir else dataclasses.replace(self, reference_dir=path)

    def cross_check(self, sections: dict[str, Any]) -> list[str]:
        problems = []
        if sections["trigger"].type == "sim":
            problems.append("camera.type = 'opencv' with trigger.type = 'sim': a real camera needs a real trigger: "
                            "trigger.type = 'beam' (a break-beam sensor on GPIO) or 'vision' (preview frames)")
        if self.trigger == "hardware" and sections["lights"].camera_pin < 0:
            problems.append("camera.trigger = 'hardware' needs a strobe backend that pulses the camera's trigger input: "
                            "lights.type = 'mcu' or 'gpio' with lights.camera_pin set")
        return problems


class OpenCVCamera:
    def __init__(self, cfg: OpenCVCameraConfig, clock: Clock) -> None:
        self.cfg = cfg
        self.clock = clock
        self.pixels_per_mm = float(cfg.pixels_per_mm)
        # Hardware-triggered: the strobe controller starts each exposure, so the frame
        # must fall inside its strobe; free-running: only the strobes can be checked.
        self.exposure_at_strobe = cfg.trigger == "hardware"
        self.prelit = False
        self.pair_interval_ms: float | None = None
        self.lock = asyncio.Lock()
        self._cap: cv2.VideoCapture | None = None  # used by one worker at a time (grabs are sequential)
        self._mode: str | None = None
        self._refs: dict[str, np.ndarray] = {}
        self.reopens = 0
        self.open()
        self._refs = self._load_references()

    # -- opening --------------------------------------------------------------

    def open(self) -> None:
        source: str | int = int(self.cfg.source) if self.cfg.source.isdigit() else self.cfg.source
        cap = cv2.VideoCapture(source, APIS[self.cfg.api])
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"camera.source = {self.cfg.source!r}: cannot open with api {self.cfg.api!r}")
        if self.cfg.width_px:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width_px)
        if self.cfg.height_px:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height_px)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a stale one
        self._cap, self._mode = cap, None

    def reopen(self) -> None:
        self.close()
        self.reopens += 1
        self.open()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _load_references(self) -> dict[str, np.ndarray]:
        """Empty-channel frames written by `sorterd calibrate` (or by hand)."""
        if not self.cfg.reference_dir:
            return {}
        refs = {}
        for mode in LIGHT_MODES:
            path = Path(self.cfg.reference_dir).expanduser() / f"{mode}.png"
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise CameraError(f"camera.reference_dir: {path} missing or unreadable")
            refs[mode] = image
        return refs

    def reference(self, mode: str) -> np.ndarray:
        if mode not in self._refs:
            raise CameraError(f"no {mode} reference frame: set camera.reference_dir (written by sorterd calibrate)")
        return self._refs[mode]

    # -- grabbing ---------------------------------------------------------------

    async def grab(self, mode: str, t_ns: int) -> Frame:
        await self.clock.sleep_until(t_ns)
        image, t_frame = await asyncio.get_running_loop().run_in_executor(None, self._read, mode)
        return Frame(image, t_frame, mode)

    def _read(self, mode: str) -> tuple[np.ndarray, int]:
        """Worker thread: apply the mode's settings, read one frame, stamp it."""
        cap = self._cap
        if cap is None:
            raise CameraError("camera is closed")
        self._apply_mode(cap, mode)
        t_host = time.monotonic_ns()
        ok, image = cap.read()
        if not ok or image is None:
            raise CameraError(f"camera.source = {self.cfg.source!r}: no frame (disconnected or end of stream)")
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        return image, self._timestamp(cap, t_host)

    def _apply_mode(self, cap: cv2.VideoCapture, mode: str) -> None:
        if mode == self._mode:
            return
        settings = {"backlit": self.cfg.backlit_exposure_us, "toplit": self.cfg.toplit_exposure_us}
        cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, self.cfg.manual_exposure_value)
        cap.set(cv2.CAP_PROP_AUTO_WB, 0)
        if settings[mode]:
            # V4L2 exposure_absolute is in 100 µs units.
            cap.set(cv2.CAP_PROP_EXPOSURE, settings[mode] / 100.0)
        if self.cfg.gain:
            cap.set(cv2.CAP_PROP_GAIN, self.cfg.gain)
        if self.cfg.wb_temperature_k:
            cap.set(cv2.CAP_PROP_WB_TEMPERATURE, self.cfg.wb_temperature_k)
        self._mode = mode

    def _timestamp(self, cap: cv2.VideoCapture, t_host_ns: int) -> int:
        if self.cfg.timestamps == "driver":
            ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            if ms > 0:
                return int(ms * 1e6)
            log.debug("driver timestamp unavailable; using host time")
        return t_host_ns - int(self.cfg.readout_delay_us * 1e3)


def _open(cfg: OpenCVCameraConfig, opening: Opening) -> OpenCVCamera:
    return OpenCVCamera(cfg, opening.clock)


BACKEND = Backend("camera", "opencv", OpenCVCameraConfig, _open)
