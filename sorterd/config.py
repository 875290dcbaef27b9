"""The sorterd configuration schema (one TOML file).

Each dataclass is one `[section]`; the `opt()` descriptions are the config
reference (`sorterd check-config --reference` prints them).  Hardware parts
pick a backend with `type`, and each backend has its own options class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sorterd.configfile import ConfigError, build, describe, load_toml, opt
from sorterd.domain import BINS, CLARITIES, COLORS, DEFAULT_BINS, JET_BINS, LIGHT_MODES


@dataclass(frozen=True)
class MachineConfig:
    name: str = opt("sorter-1", "Name of this sorter (labels metrics and batch logs).")
    safe_route: str = opt(
        "REJECT",
        "Where a stone goes when it cannot be sorted safely (cluster, unclassifiable, "
        "neighbour conflict, queue overflow): REJECT = default trajectory (no jet), "
        "SELECT = blown to SELECT for human review when a pulse can still be planned.",
        choices=("REJECT", "SELECT"),
    )


@dataclass(frozen=True)
class GeometryConfig:
    lip_mm: float = opt(
        44.0,
        "Distance along the channel from the left edge of the camera's view to the "
        "channel lip where stones start to fall.", above=0.0, maxval=1000.0,
    )
    nozzle_drop_mm: dict = opt(
        {"CUT": 30.0, "SELECT": 45.0, "FLIP": 60.0},
        "Vertical drop from the channel lip to each bin's nozzle axis, in mm "
        "(keys CUT, SELECT, FLIP).",
    )
    jet_width_mm: float = opt(2.0, "Height of the air jet at the stone's path.", above=0.0, maxval=50.0)
    speed_min_mm_s: float = opt(
        100.0, "Slowest plausible stone speed on the channel (pairs frames).", above=0.0, maxval=5000.0
    )
    speed_max_mm_s: float = opt(
        1000.0, "Fastest plausible stone speed on the channel (pairs frames).", above=0.0, maxval=5000.0
    )

    def __post_init__(self) -> None:
        problems = []
        if set(self.nozzle_drop_mm) != set(JET_BINS):
            problems.append(
                f"geometry.nozzle_drop_mm = {self.nozzle_drop_mm!r}: needs exactly the keys "
                f"{', '.join(JET_BINS)}"
            )
        for k, v in self.nozzle_drop_mm.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 2000:
                problems.append(f"geometry.nozzle_drop_mm.{k} = {v!r}: must be a number in (0, 2000] mm")
        if self.speed_min_mm_s >= self.speed_max_mm_s:
            problems.append(
                f"geometry.speed_min_mm_s = {self.speed_min_mm_s!r} must be below "
                f"geometry.speed_max_mm_s = {self.speed_max_mm_s!r}"
            )
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class SimCameraConfig:
    type: str = opt("sim", "Backend: sim renders the simulated machine's frames.", choices=("sim",))
    width_px: int = opt(640, "Frame width (along the channel).", minval=64, maxval=8192)
    height_px: int = opt(240, "Frame height (across the channel).", minval=32, maxval=8192)
    pixels_per_mm: float = opt(20.0, "Image scale (from calibration).", minval=2.0, maxval=500.0)
    noise_sigma: float = opt(2.0, "Sensor noise in DN.", minval=0.0, maxval=50.0)


@dataclass(frozen=True)
class SimLightsConfig:
    type: str = opt("sim", "Backend: sim (the simulated strobes).", choices=("sim",))
    pair_interval_ms: float = opt(10.0, "Backlit frame at t0, toplit frame at t0 + this.", minval=1.0, maxval=50.0)
    lights_off_ms: float = opt(20.0, "All lights off by t0 + this.", minval=2.0, maxval=100.0)
    lead_ms: float = opt(0.0, "A pair's t0 is this far after the trigger is taken (time for the strobe commands to arrive).",
                         minval=0.0, maxval=50.0)

    def __post_init__(self) -> None:
        if self.lights_off_ms <= self.pair_interval_ms:
            raise ConfigError([f"lights.lights_off_ms = {self.lights_off_ms} must be above lights.pair_interval_ms = "
                               f"{self.pair_interval_ms}: the ring light is on from t0 + pair_interval_ms until then"])


@dataclass(frozen=True)
class McuLightsConfig(SimLightsConfig):
    type: str = opt("mcu", "Backend: mcu -- strobe outputs of the valve controller (hw/), timed by its hardware timer "
                    "(needs valves.type = 'mcu': one controller, one clock sync).", choices=("mcu",))
    lead_ms: float = opt(3.0, "A pair's t0 is this far after the trigger is taken: the strobe commands must reach the "
                         "controller first (at least valves.min_lead_ms).", minval=0.1, maxval=50.0)
    pins: dict = opt({"backlit": 5, "toplit": 6}, "Controller GPIO driving each light's strobe driver (keys backlit, toplit).")
    camera_pin: int = opt(-1, "Controller GPIO wired to the camera's trigger input (camera.trigger = 'hardware'); -1 = none.",
                          minval=-1, maxval=255)
    camera_pulse_us: float = opt(100.0, "Width of the camera trigger pulse.", minval=1.0, maxval=10_000.0)
    active_low: bool = opt(False, "The strobe drivers switch on at a low level.")
    max_on_ms: float = opt(25.0, "Longest a light may stay on, enforced by the firmware (at least lights_off_ms).",
                           minval=1.0, maxval=1000.0)

    def __post_init__(self) -> None:
        problems = _check_pins("lights", self.pins, LIGHT_MODES, 255, self.camera_pin)
        if self.max_on_ms < self.lights_off_ms - self.pair_interval_ms or self.max_on_ms < self.pair_interval_ms:
            problems.append(f"lights.max_on_ms = {self.max_on_ms} would cut a strobe short (pair_interval_ms = "
                            f"{self.pair_interval_ms}, lights_off_ms = {self.lights_off_ms})")
        if problems:
            raise ConfigError(problems)
        super().__post_init__()


@dataclass(frozen=True)
class GpioLightsConfig(SimLightsConfig):
    type: str = opt("gpio", "Backend: gpio -- strobe lines driven by one real-time thread on the host (Jetson.GPIO or "
                    "libgpiod).", choices=("gpio",))
    lead_ms: float = opt(3.0, "A pair's t0 is this far after the trigger is taken (at least min_lead_ms).",
                         minval=0.5, maxval=50.0)
    library: str = opt("gpiod", "GPIO library: gpiod (libgpiod v2, Raspberry Pi 5, any Linux) or jetson (Jetson.GPIO).",
                       choices=("gpiod", "jetson"))
    chip: str = opt("/dev/gpiochip0", "library = 'gpiod': GPIO character device.")
    numbering: str = opt("BOARD", "library = 'jetson': pin numbering mode.", choices=("BOARD", "BCM", "CVM", "TEGRA_SOC"))
    pins: dict = opt({"backlit": 23, "toplit": 24}, "Line (gpiod offset or Jetson header pin) of each light's strobe driver.")
    camera_pin: int = opt(-1, "Line wired to the camera's trigger input (camera.trigger = 'hardware'); -1 = none.",
                          minval=-1, maxval=1023)
    camera_pulse_us: float = opt(100.0, "Width of the camera trigger pulse.", minval=1.0, maxval=10_000.0)
    active_low: bool = opt(False, "The strobe drivers switch on at a low level.")
    max_on_ms: float = opt(25.0, "Longest a light may stay on (enforced by the thread).", minval=1.0, maxval=1000.0)
    late_limit_us: float = opt(300.0, "A strobe whose thread wakes more than this after its start is refused (the frame "
                               "would be half lit); the pair's stones take the safe route.", minval=0.0, maxval=5000.0)
    min_lead_ms: float = opt(2.0, "Strobes starting sooner than this are refused.", minval=0.5, maxval=100.0)
    spin_us: float = opt(300.0, "The thread sleeps until this long before an edge, then spins.", minval=0.0, maxval=5000.0)
    rt_priority: int = opt(50, "SCHED_FIFO priority of the strobe thread when permitted; 0 = normal scheduling.",
                           minval=0, maxval=99)
    switch_interval_us: float = opt(0.0, "Python's GIL switch interval (0 = leave it; the valve backend sets it).",
                                    minval=0.0, maxval=5000.0)

    def __post_init__(self) -> None:
        problems = _check_pins("lights", self.pins, LIGHT_MODES, 1023, self.camera_pin)
        if self.lead_ms < self.min_lead_ms:
            problems.append(f"lights.lead_ms = {self.lead_ms} is below lights.min_lead_ms = {self.min_lead_ms}: "
                            "every strobe would be refused")
        if problems:
            raise ConfigError(problems)
        super().__post_init__()


@dataclass(frozen=True)
class SimTriggerConfig:
    type: str = opt("sim", "Backend: sim (a simulated break-beam at beam_x_mm).", choices=("sim",))
    beam_x_mm: float = opt(10.0, "Where the beam crosses the channel, from the view's left edge (a whole stone must be in view when its front breaks the beam).", minval=0.0)
    latency_ms: float = opt(0.3, "Sensor-to-host latency of the trigger edge.", minval=0.0, maxval=20.0)


@dataclass(frozen=True)
class BeamTriggerConfig:
    type: str = opt("beam", "Backend: beam -- a break-beam sensor's edge on a GPIO line, time-stamped by the kernel "
                    "(gpiod) or on arrival (jetson).", choices=("beam",))
    library: str = opt("gpiod", "GPIO library: gpiod (libgpiod v2: kernel edge timestamps, CLOCK_MONOTONIC) or jetson "
                       "(Jetson.GPIO: stamped when the callback runs).", choices=("gpiod", "jetson"))
    chip: str = opt("/dev/gpiochip0", "library = 'gpiod': GPIO character device.")
    numbering: str = opt("BOARD", "library = 'jetson': pin numbering mode.", choices=("BOARD", "BCM", "CVM", "TEGRA_SOC"))
    pin: int = opt(25, "The sensor's line (gpiod offset or Jetson header pin).", minval=0, maxval=1023)
    broken_level: str = opt("low", "Line level while the beam is broken (NPN / open-collector sensors with a pull-up: low).",
                            choices=("low", "high"))
    bias: str = opt("pull_up", "Line bias (gpiod only; Jetson header pins have fixed pulls).",
                    choices=("as_is", "pull_up", "pull_down", "disabled"))
    debounce_us: float = opt(200.0, "Edges closer than this to the previous one are contact/optical bounce.",
                             minval=0.0, maxval=100_000.0)
    holdoff_ms: float = opt(5.0, "After a trigger, ignore further breaks this long (one stone's flicker is one stone).",
                            minval=0.0, maxval=1000.0)
    latency_ms: float = opt(0.0, "Sensor response time, subtracted from each edge's timestamp.", minval=0.0, maxval=20.0)
    beam_x_mm: float = opt(10.0, "Where the beam crosses the channel, from the camera view's left edge.", minval=0.0)


@dataclass(frozen=True)
class VisionTriggerConfig:
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


@dataclass(frozen=True)
class SimValvesConfig:
    type: str = opt("sim", "Backend: sim (ideal hardware-timed valves in the simulated machine).", choices=("sim",))
    command_latency_ms: float = opt(
        1.0, "Time for a pulse command to reach the valve timer; later pulses are refused.",
        minval=0.0, maxval=50.0,
    )


@dataclass(frozen=True)
class OpenCVCameraConfig:
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
    reopen_backoff_ms: float = opt(500.0, "Wait between attempts to reopen a lost camera.", minval=10.0, maxval=60_000.0)


@dataclass(frozen=True)
class ReplayCameraConfig:
    type: str = opt("replay", "Backend: replay a recorded session folder (§7.1 images/raw/<session>/).", choices=("replay",))
    session: str = opt("", "The session folder (with session_meta.json, reference/, backlit/, toplit/).")

    def __post_init__(self) -> None:
        if not self.session:
            raise ConfigError(["camera.session is required with camera.type = 'replay': the session folder to replay"])


@dataclass(frozen=True)
class ReplayTriggerConfig:
    type: str = opt("replay", "Backend: one trigger per recorded pair, at its recorded time.", choices=("replay",))
    interval_ms: float = opt(
        100.0, "Spacing of pairs when the session has no recorded times (a hand-written session).",
        minval=1.0, maxval=10_000.0,
    )


@dataclass(frozen=True)
class DryValvesConfig:
    type: str = opt("dry", "Backend: dry run -- pulses are planned and logged, no output is driven.", choices=("dry",))


def _check_pins(section: str, pins: dict[str, Any], keys: Sequence[str], hi: int, camera_pin: int = -1) -> list[str]:
    """<section>.pins: one distinct output per key (a jet bin, a lighting mode), none of them
    the camera trigger's (camera_pin, when >= 0)."""
    problems = []
    if set(pins) != set(keys):
        problems.append(f"{section}.pins = {pins!r}: needs exactly the keys {', '.join(keys)}")
    for k, v in pins.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
            problems.append(f"{section}.pins.{k} = {v!r}: must be an integer in [0, {hi}]")
    used = [str(v) for v in pins.values()] + ([str(camera_pin)] if camera_pin >= 0 else [])
    if len(set(used)) != len(used):
        camera = f", {section}.camera_pin = {camera_pin}" if camera_pin >= 0 else ""
        problems.append(f"{section}.pins = {pins!r}{camera}: every output needs its own pin")
    return problems


@dataclass(frozen=True)
class McuValvesConfig:
    type: str = opt("mcu", "Backend: mcu -- the valve-controller firmware (hw/) fires pulses from its hardware timer; "
                    "the host keeps its clock in sync over serial.", choices=("mcu",))
    port: str = opt(
        "sim",
        "Serial device of the controller, e.g. /dev/serial/by-id/usb-sorterd_valves-if00; 'sim' = the firmware's "
        "host build on a pseudo-terminal, driving the simulated machine's jets (simulated machine only).",
    )
    baudrate: int = opt(250000, "Serial speed (ignored by USB CDC boards such as the RP2040).", minval=9600, maxval=12_000_000)
    pins: dict = opt({"CUT": 2, "SELECT": 3, "FLIP": 4}, "Controller GPIO driving each bin's valve driver (keys CUT, SELECT, FLIP).")
    active_low: bool = opt(False, "The valve drivers switch on at a low level (default: high = open).")
    max_on_ms: float = opt(
        40.0, "Longest a valve may stay open, enforced by the firmware whatever the host sends "
        "(at least ejection.max_pulse_ms).", minval=1.0, maxval=1000.0,
    )
    silence_ms: float = opt(
        200.0, "Host silence after which the firmware turns every valve off and keeps it off until the host "
        "re-arms (the fail-safe against a crashed or killed daemon).", minval=10.0, maxval=5000.0,
    )
    heartbeat_ms: float = opt(50.0, "Heartbeat interval when nothing else is sent (well below silence_ms).", minval=1.0, maxval=1000.0)
    late_limit_us: float = opt(
        500.0, "A pulse whose timer runs more than this after its start is refused by the firmware, never fired "
        "late (at most ejection.margin_ms: up to that a late edge still covers the whole passage).",
        minval=0.0, maxval=5000.0,
    )
    min_lead_ms: float = opt(1.0, "Pulses starting sooner than this are refused by the host (the command must reach the controller first).", minval=0.1, maxval=100.0)
    sync_interval_ms: float = opt(50.0, "Clock-sync exchange interval once synchronised.", minval=5.0, maxval=5000.0)
    sync_timeout_ms: float = opt(3000.0, "No good clock-sync sample for this long: pulses are refused until there is one.", minval=50.0, maxval=60_000.0)
    link_timeout_ms: float = opt(300.0, "Nothing in order from the controller for this long while the host kept asking: the link is lost or out of step; reconnect.", minval=20.0, maxval=60_000.0)
    reconnect_ms: float = opt(200.0, "Wait between attempts to reopen a lost port.", minval=10.0, maxval=60_000.0)
    connect_timeout_s: float = opt(5.0, "How long startup waits for the controller to answer and synchronise.", minval=0.1, maxval=120.0)
    sim_freq_hz: float = opt(12_000_000.0, "port = 'sim': the simulated controller's nominal clock frequency.", minval=1e5, maxval=1e9)
    sim_drift_ppm: float = opt(37.0, "port = 'sim': its true rate error, for the clock sync to find.", minval=-1000.0, maxval=1000.0)
    sim_offset: int = opt(123_456_789_000, "port = 'sim': its clock when it starts (ticks).", minval=0, maxval=2**62)
    sim_realtime: bool = opt(True, "port = 'sim': run the firmware process SCHED_FIFO with memory locked, when permitted.")

    def __post_init__(self) -> None:
        problems = _check_pins("valves", self.pins, JET_BINS, 255)
        if self.heartbeat_ms * 3 > self.silence_ms:
            problems.append(f"valves.heartbeat_ms = {self.heartbeat_ms} must be at most a third of "
                            f"valves.silence_ms = {self.silence_ms} (one lost heartbeat must not trip the watchdog)")
        if self.link_timeout_ms < self.sync_interval_ms * 3:
            problems.append(f"valves.link_timeout_ms = {self.link_timeout_ms} must be at least three times "
                            f"valves.sync_interval_ms = {self.sync_interval_ms} (the controller's answers to "
                            "clock queries show the link is alive)")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class GpioValvesConfig:
    """Shared by the jetson and gpiod backends (one real-time thread on the host).

    `type` and `pins` are redefined by each backend (they keep this position)."""

    type: str = opt("", "Backend.")
    pins: dict = opt({}, "Output of each bin's valve driver (keys CUT, SELECT, FLIP).")
    max_on_ms: float = opt(40.0, "Longest a valve may stay open (enforced by the RT thread; at least ejection.max_pulse_ms).", minval=1.0, maxval=1000.0)
    late_limit_us: float = opt(500.0, "An edge whose thread wakes more than this after its start is refused, never fired late (at most ejection.margin_ms).", minval=0.0, maxval=5000.0)
    min_lead_ms: float = opt(2.0, "Pulses starting sooner than this are refused (the thread sleeps until ~spin_us before an edge).", minval=0.5, maxval=100.0)
    spin_us: float = opt(300.0, "The thread sleeps until this long before an edge, then spins.", minval=0.0, maxval=5000.0)
    rt_priority: int = opt(50, "SCHED_FIFO priority of the valve thread when permitted; 0 = normal scheduling.", minval=0, maxval=99)
    switch_interval_us: float = opt(
        200.0, "Python's GIL switch interval while the valves run (the default 5 ms would let another thread "
        "hold the GIL through an edge); 0 = leave it.", minval=0.0, maxval=5000.0,
    )
    active_low: bool = opt(False, "The valve drivers switch on at a low level.")

    def __post_init__(self) -> None:
        problems = _check_pins("valves", self.pins, JET_BINS, 1023)
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class JetsonValvesConfig(GpioValvesConfig):
    type: str = opt("jetson", "Backend: jetson -- Jetson.GPIO lines driven by a real-time thread (no fail-safe "
                    "if the process dies; see hw/README.md).", choices=("jetson",))
    pins: dict = opt({"CUT": 31, "SELECT": 33, "FLIP": 35}, "Header pin of each bin's valve driver (keys CUT, SELECT, FLIP), in `numbering`.")
    numbering: str = opt("BOARD", "Jetson.GPIO pin numbering mode.", choices=("BOARD", "BCM", "CVM", "TEGRA_SOC"))


@dataclass(frozen=True)
class GpiodValvesConfig(GpioValvesConfig):
    type: str = opt("gpiod", "Backend: gpiod -- libgpiod v2 lines driven by a real-time thread (Raspberry Pi 5, any "
                    "Linux; no fail-safe if the process dies; see hw/README.md).", choices=("gpiod",))
    chip: str = opt("/dev/gpiochip0", "GPIO character device (Raspberry Pi 5: /dev/gpiochip0 on kernels >= 6.6, gpiochip4 before).")
    pins: dict = opt({"CUT": 17, "SELECT": 27, "FLIP": 22}, "Line offset of each bin's valve driver on `chip` (keys CUT, SELECT, FLIP).")


@dataclass(frozen=True)
class OnnxInferenceConfig:
    type: str = opt("onnxruntime", "Backend: onnxruntime (CPU, or CUDA if available).", choices=("onnxruntime",))
    model: str = opt(
        "default",
        "Model bundle directory (model.onnx + manifest.json); 'default' = the bundle "
        "shipped in the repository's models/default.",
    )
    threads: int = opt(1, "onnxruntime intra-op threads per session.", minval=1, maxval=64)
    providers: tuple[str, ...] = opt(("CPUExecutionProvider",), "onnxruntime execution providers, in order.")


@dataclass(frozen=True)
class DecisionConfig:
    sort_confidence: float = opt(0.80, "Combined confidence at or above which a stone is sorted unflagged (§5.2).", minval=0.0, maxval=1.0)
    flag_confidence: float = opt(
        0.50, "Below this a stone goes to SELECT and is flagged; between this and sort_confidence it is sorted and flagged.",
        minval=0.0, maxval=1.0,
    )
    cut_min_size_mm: float = opt(2.0, "CUT needs at least this sieve size (§8.2).", minval=0.0, maxval=20.0)
    small_cut_bin: str = opt("SELECT", "Bin for a CUT-class stone below cut_min_size_mm (§8.2).", choices=BINS)
    low_confidence_bin: str = opt("SELECT", "Bin for stones below flag_confidence (§5.2).", choices=BINS)
    min_size_mm: float = opt(0.7, "Objects smaller than this are debris: safe route.", minval=0.0, maxval=20.0)
    max_size_mm: float = opt(6.0, "Single objects larger than this are unclassifiable: safe route.", above=0.0, maxval=50.0)
    bins: dict = opt(DEFAULT_BINS, "color -> clarity -> bin mapping (§8.2).")

    def __post_init__(self) -> None:
        problems = []
        if self.flag_confidence > self.sort_confidence:
            problems.append(
                f"decision.flag_confidence = {self.flag_confidence} must not exceed "
                f"decision.sort_confidence = {self.sort_confidence}"
            )
        problems += _check_bins(self.bins)
        if problems:
            raise ConfigError(problems)

    @property
    def max_single_length_mm(self) -> float:
        """Longest a single rough stone may be (1.6 x max_size_mm); longer objects are clusters or oversize."""
        return self.max_size_mm * 1.6


def _check_bins(bins: dict[str, Any]) -> list[str]:
    problems = []
    if set(bins) != set(COLORS):
        problems.append(f"decision.bins has colours {sorted(bins)}: needs exactly {', '.join(COLORS)}")
    for color, row in bins.items():
        if not isinstance(row, dict) or set(row) != set(CLARITIES):
            problems.append(f"decision.bins.{color} = {row!r}: needs exactly the keys {', '.join(CLARITIES)}")
            continue
        for clarity, b in row.items():
            if b not in BINS:
                problems.append(f"decision.bins.{color}.{clarity} = {b!r}: choose one of {', '.join(BINS)}")
    return problems


@dataclass(frozen=True)
class EjectionConfig:
    opening_latency_ms: dict = opt(
        {"CUT": 3.0, "SELECT": 3.0, "FLIP": 3.0},
        "Per-valve delay from electrical command to full jet (calibrated); pulses are sent this much early.",
    )
    margin_ms: float = opt(1.0, "Extra jet time before and after the stone's passage.", minval=0.0, maxval=20.0)
    min_lead_ms: float = opt(
        2.0, "A pulse is only sent if its start is at least this far in the future; otherwise deadline miss.",
        minval=0.0, maxval=100.0,
    )
    max_pulse_ms: float = opt(25.0, "Longest jet pulse ever sent.", above=0.0, maxval=200.0)

    def __post_init__(self) -> None:
        problems = []
        if set(self.opening_latency_ms) != set(JET_BINS):
            problems.append(f"ejection.opening_latency_ms needs exactly the keys {', '.join(JET_BINS)}")
        for k, v in self.opening_latency_ms.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
                problems.append(f"ejection.opening_latency_ms.{k} = {v!r}: must be a number in [0, 100] ms")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class PipelineConfig:
    queue_size: int = opt(8, "Capture pairs waiting for processing; overflow is counted and takes the safe route.", minval=1, maxval=1024)
    workers: int = opt(2, "Worker threads for segmentation and inference.", minval=1, maxval=32)
    track_tolerance_mm: float = opt(1.5, "How far a stone may be from its predicted position and still be the same stone.", above=0.0, maxval=20.0)


@dataclass(frozen=True)
class RecordConfig:
    log_dir: str = opt("production_logs", "Where batch folders go (§7.1 production_logs/); relative to the working directory.")
    batch: str = opt("", "Batch name; empty = <date>_<machine name>_<time>.")
    commit_interval_ms: float = opt(100.0, "Rows are committed at least this often (WAL).", minval=5.0, maxval=5000.0)
    thumbnail_px: int = opt(96, "Thumbnail height (px); 0 = none.", minval=0, maxval=512)
    flagged_images: bool = opt(True, "Save full frames of flagged stones (flagged/).")
    queue_size: int = opt(20000, "Rows waiting for the writer thread before overflow is counted.", minval=10, maxval=1_000_000)


@dataclass(frozen=True)
class CalibrationConfig:
    dir: str = opt("calibration", "Where `sorterd calibrate` keeps profiles (<dir>/<machine>/<date>/); relative to the working directory.")
    required: bool = opt(True, "Refuse to sort without a passing calibration of the current day (override: run --uncalibrated, logged).")
    warmup_s: float = opt(300.0, "Light warm-up before measuring (§2.4: 5 minutes); 0 = skip.", minval=0.0, maxval=3600.0)
    target_diameter_mm: float = opt(4.0, "Diameter of the calibration target's disc (the scale step measures px/mm on it).",
                                    minval=0.5, maxval=50.0)
    kit: str = opt("", "JSON-lines file of the reference stone kit's labels, in feeding order (real machines).")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = opt(True, "Serve Prometheus metrics over HTTP.")
    host: str = opt("127.0.0.1", "Bind address (localhost unless you mean it).")
    port: int = opt(9108, "Port; 0 = any free port.", minval=0, maxval=65535)


# name -> (min, max, meaning) of faults the simulated machine can be told to have.
SIM_FAULTS: dict[str, tuple[float, float, str]] = {
    "camera_drop_at_s": (0.0, 1e6, "seconds into the run when the camera disappears"),
    "camera_down_s": (0.0, 1e6, "how long it stays away"),
    "backlight": (-0.9, 1.0, "relative backlight drift, e.g. -0.08"),
    "ring_light": (-0.9, 1.0, "relative ring-light drift"),
    "scale": (-0.5, 0.5, "relative error of the configured px/mm, e.g. 0.10"),
    "wb_delta_e": (0.0, 50.0, "white-balance drift of the 18 % gray, as CIE76 dE"),
    "reference_mislabel": (0.0, 1.0, "fraction of the reference-stone kit whose labels are wrong"),
    "cut_valve_slow_ms": (-20.0, 50.0, "the CUT valve opens this much later than configured"),
    "select_valve_slow_ms": (-20.0, 50.0, "the SELECT valve opens this much later than configured"),
    "flip_valve_slow_ms": (-20.0, 50.0, "the FLIP valve opens this much later than configured"),
}


@dataclass(frozen=True)
class SimConfig:
    clock: str = opt("virtual", "virtual = skip idle time (fast), wall = real time (latency work).", choices=("virtual", "wall"))
    seed: int = opt(1, "Seed of the simulated world.", minval=0)
    rate_per_s: float = opt(20.0, "Mean stone arrival rate (Poisson, with singulation gap).", above=0.0, maxval=500.0)
    speed_mm_s: float = opt(400.0, "Mean stone speed on the channel.", above=0.0, maxval=5000.0)
    speed_spread: float = opt(0.08, "Relative standard deviation of stone speed.", minval=0.0, maxval=0.5)
    min_gap_mm: float = opt(4.0, "Singulation: usual smallest edge-to-edge gap between stones.", minval=0.0, maxval=100.0)
    close_pair_prob: float = opt(0.01, "Chance a stone follows its predecessor closely (gap 0.3-2 mm).", minval=0.0, maxval=1.0)
    touching_pair_prob: float = opt(0.005, "Chance a stone touches its predecessor.", minval=0.0, maxval=1.0)
    size_min_mm: float = opt(1.0, "Smallest stone (sieve size).", above=0.0, maxval=20.0)
    size_max_mm: float = opt(5.0, "Largest stone (sieve size).", above=0.0, maxval=20.0)
    class_mix: dict = opt({}, "Relative frequency per 'color_clarity' class; empty = §1.3 Thai melee mix.")
    valve_latency_ms: dict = opt({}, "True valve opening latency per bin; empty = same as ejection.opening_latency_ms.")
    valve_jitter_ms: float = opt(0.1, "Standard deviation of the valves' opening time.", minval=0.0, maxval=10.0)
    fall_jitter: float = opt(0.002, "Relative spread of each stone's fall time (air drag, spin).", minval=0.0, maxval=0.1)
    deflect_overlap: float = opt(0.5, "Fraction of a stone's passage the jet must cover to deflect it.", above=0.0, maxval=1.0)
    faults: dict = opt({}, "Injected faults and drift (also `--sim-fault NAME=VALUE`): " + ", ".join(
        f"{k} ({v[2]})" for k, v in SIM_FAULTS.items()) + ".")

    def __post_init__(self) -> None:
        problems = []
        if self.size_min_mm >= self.size_max_mm:
            problems.append(f"sim.size_min_mm = {self.size_min_mm} must be below sim.size_max_mm = {self.size_max_mm}")
        valid = {f"{c}_{k}" for c in COLORS for k in CLARITIES}
        for k, v in self.class_mix.items():
            if k not in valid:
                problems.append(f"sim.class_mix.{k}: unknown class; valid: {', '.join(sorted(valid))}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                problems.append(f"sim.class_mix.{k} = {v!r}: must be a number >= 0")
        for k, v in self.faults.items():
            if k not in SIM_FAULTS:
                problems.append(f"sim.faults.{k}: unknown fault; valid: {', '.join(SIM_FAULTS)}")
                continue
            lo, hi, _ = SIM_FAULTS[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                problems.append(f"sim.faults.{k} = {v!r}: must be a number in [{lo}, {hi}]")
        for k, v in self.valve_latency_ms.items():
            if k not in JET_BINS or isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
                problems.append(f"sim.valve_latency_ms.{k} = {v!r}: keys {', '.join(JET_BINS)}, values in [0, 100] ms")
        if problems:
            raise ConfigError(problems)


# part -> backend type -> options class
BACKENDS: dict[str, dict[str, type]] = {
    "camera": {"sim": SimCameraConfig, "replay": ReplayCameraConfig, "opencv": OpenCVCameraConfig},
    "lights": {"sim": SimLightsConfig, "mcu": McuLightsConfig, "gpio": GpioLightsConfig},
    "trigger": {"sim": SimTriggerConfig, "replay": ReplayTriggerConfig, "beam": BeamTriggerConfig,
                "vision": VisionTriggerConfig},
    "valves": {"sim": SimValvesConfig, "dry": DryValvesConfig, "mcu": McuValvesConfig,
               "jetson": JetsonValvesConfig, "gpiod": GpiodValvesConfig},
    "inference": {"onnxruntime": OnnxInferenceConfig},
}

PLAIN_SECTIONS: dict[str, type] = {
    "machine": MachineConfig,
    "geometry": GeometryConfig,
    "decision": DecisionConfig,
    "ejection": EjectionConfig,
    "pipeline": PipelineConfig,
    "record": RecordConfig,
    "calibration": CalibrationConfig,
    "metrics": MetricsConfig,
    "sim": SimConfig,
}


@dataclass(frozen=True)
class Config:
    machine: MachineConfig
    geometry: GeometryConfig
    camera: Any
    lights: Any
    trigger: Any
    valves: Any
    inference: Any
    decision: DecisionConfig
    ejection: EjectionConfig
    pipeline: PipelineConfig
    record: RecordConfig
    calibration: CalibrationConfig
    metrics: MetricsConfig
    sim: SimConfig
    source: Path | None = None

    @property
    def simulated(self) -> bool:
        """The simulated machine (its world) is needed."""
        return "sim" in (self.camera.type, self.trigger.type, self.valves.type)

    @property
    def offline(self) -> bool:
        """No real hardware at all: the run may use the virtual clock (sim.clock)."""
        return not self.real_time_parts

    @property
    def real_time_parts(self) -> list[str]:
        """The parts whose backend runs on the wall clock, as `section.type = 'x'`."""
        return [f"{p}.type = {getattr(self, p).type!r}" for p in ("camera", "trigger", "valves", "lights")
                if getattr(self, p).type not in ("sim", "replay", "dry")]

    def resolve(self, path: str) -> Path:
        """A path from the config file, relative to the file's directory."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.source is None:
            return p
        return (self.source.parent / p).resolve()


def _build_backend(part: str, raw: Any, problems: list[str]) -> Any:
    backends = BACKENDS[part]
    default_type = next(iter(backends))
    if not isinstance(raw, dict):
        problems.append(f"[{part}] must be a table, got {raw!r}")
        raw = {}
    kind = raw.get("type", default_type)
    if kind not in backends:
        problems.append(f"{part}.type = {kind!r} is not a known backend: choose one of {', '.join(map(repr, backends))}")
        return backends[default_type]()
    return build(backends[kind], raw, part, problems)


def from_dict(raw: dict[str, Any], source: Path | None = None) -> Config:
    problems: list[str] = []
    known = set(BACKENDS) | set(PLAIN_SECTIONS)
    for key in raw:
        if key not in known:
            problems.append(f"[{key}]: unknown section; valid sections are: {', '.join(sorted(known))}")
    parts: dict[str, Any] = {}
    for part in BACKENDS:
        parts[part] = _build_backend(part, raw.get(part, {}), problems)
    for name, cls in PLAIN_SECTIONS.items():
        parts[name] = build(cls, raw.get(name, {}), name, problems)
    problems += _cross_checks(parts) + _valve_checks(parts)
    if problems:
        raise ConfigError(problems, str(source) if source else "")
    return Config(source=source, **parts)


def _cross_checks(parts: dict[str, Any]) -> list[str]:
    """Backends that only make sense together."""
    cam, trig, lights, valves = parts["camera"], parts["trigger"], parts["lights"], parts["valves"]
    if cam is None or trig is None:
        return []
    if (cam.type == "replay") != (trig.type == "replay"):
        return [f"camera.type = {cam.type!r} with trigger.type = {trig.type!r}: a replay needs both "
                "camera.type and trigger.type = 'replay' (one trigger per recorded pair)"]
    problems = []
    if cam.type == "opencv" and trig.type == "sim":
        problems.append("camera.type = 'opencv' with trigger.type = 'sim': a real camera needs a real trigger: "
                        "trigger.type = 'beam' (a break-beam sensor on GPIO) or 'vision' (preview frames)")
    if cam.type == "sim" and trig.type == "beam":
        problems.append("trigger.type = 'beam' reads a real sensor, which the simulated machine's stones never break: "
                        "use trigger.type = 'sim' or 'vision' with camera.type = 'sim'")
    if lights is not None and valves is not None:
        if lights.type == "mcu" and valves.type != "mcu":
            problems.append(f"lights.type = 'mcu' uses the valve controller's strobe outputs, but valves.type = "
                            f"{valves.type!r}: set valves.type = 'mcu' (one controller, one clock sync) or lights.type = 'gpio'")
        elif lights.type == "mcu":
            if lights.lead_ms < valves.min_lead_ms:
                problems.append(f"lights.lead_ms = {lights.lead_ms} is below valves.min_lead_ms = {valves.min_lead_ms}: "
                                "the controller would refuse every strobe")
            taken = {str(p) for p in valves.pins.values()} & ({str(p) for p in lights.pins.values()}
                                                               | ({str(lights.camera_pin)} if lights.camera_pin >= 0 else set()))
            if taken:
                problems.append(f"lights.pins / lights.camera_pin reuse controller pin(s) {sorted(taken)} of valves.pins: "
                                "every output needs its own pin")
        if lights.type == "gpio" and valves.type in ("jetson", "gpiod") and lights.library != valves.type:
            problems.append(f"lights.library = {lights.library!r} with valves.type = {valves.type!r}: one board, one GPIO "
                            "library")
    if cam.type == "opencv" and cam.trigger == "hardware" and getattr(lights, "camera_pin", -1) < 0:
        problems.append("camera.trigger = 'hardware' needs a strobe backend that pulses the camera's trigger input: "
                        "lights.type = 'mcu' or 'gpio' with lights.camera_pin set")
    return problems


def _valve_checks(parts: dict[str, Any]) -> list[str]:
    """Valve backends against the ejection plan and the machine they drive."""
    valves, ejection = parts["valves"], parts["ejection"]
    if valves is None or ejection is None or parts["camera"] is None or parts["trigger"] is None:
        return []  # already refused: its own problems are reported
    problems = []
    if valves.type in ("mcu", "jetson", "gpiod") and valves.max_on_ms < ejection.max_pulse_ms:
        problems.append(f"valves.max_on_ms = {valves.max_on_ms} is below ejection.max_pulse_ms = "
                        f"{ejection.max_pulse_ms}: every long pulse would be cut; raise valves.max_on_ms")
    if valves.type in ("mcu", "jetson", "gpiod") and valves.late_limit_us > ejection.margin_ms * 1000:
        problems.append(f"valves.late_limit_us = {valves.late_limit_us} is above ejection.margin_ms = "
                        f"{ejection.margin_ms} ms: an edge that late would leave the start of the stone's passage "
                        "without jet; lower valves.late_limit_us or raise ejection.margin_ms")
    sim_parts = "sim" in (parts["camera"].type, parts["trigger"].type)
    if valves.type == "mcu" and valves.port == "sim" and not sim_parts:
        problems.append("valves.port = 'sim' runs the firmware's host build for the simulated machine, but "
                        f"camera.type = {parts['camera'].type!r} and trigger.type = {parts['trigger'].type!r} are "
                        "real: give the controller's serial device, e.g. /dev/serial/by-id/usb-sorterd_valves-if00")
    return problems


def load(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Load and validate a config file; `overrides` are merged section-wise (CLI flags)."""
    path = Path(path)
    raw = load_toml(path)
    for section, values in (overrides or {}).items():
        table = raw.setdefault(section, {})
        if isinstance(table, dict) and "type" in values and values["type"] != table.get("type", values["type"]):
            # A different backend: the file's options were for the other one.
            raw[section] = dict(values)
        elif isinstance(table, dict):
            table.update(values)
    try:
        return from_dict(raw, path.resolve())
    except ConfigError as exc:
        exc.source = str(path)
        raise


def sim_config_path() -> Path:
    """The example config for the simulated machine, shipped in the package."""
    return Path(__file__).parent / "configs" / "sim.toml"


def reference() -> str:
    """Markdown config reference generated from the schema."""
    out = []
    for part, backends in BACKENDS.items():
        for kind, cls in backends.items():
            out.append(f"\n### `[{part}]` type = \"{kind}\"\n")
            out += [f"- {line}" for line in describe(cls, part)]
    for name, cls in PLAIN_SECTIONS.items():
        out.append(f"\n### `[{name}]`\n")
        out += [f"- {line}" for line in describe(cls, name)]
    return "\n".join(out) + "\n"


def replace(cfg: Config, **sections: Any) -> Config:
    return dataclasses.replace(cfg, **sections)
