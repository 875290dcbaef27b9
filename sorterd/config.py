"""The sorterd configuration schema (one TOML file).

Each dataclass is one `[section]`; the `opt()` descriptions are the config
reference (`sorterd check-config --reference` prints them).  Hardware parts
pick a backend with `type`; each backend's options class lives in its own
module, next to the backend (`sorterd/parts/*/`, the simulator's in
`sorterd/sim/parts/`), and parsing takes the registry's table of them as an
argument -- so this module imports no backend and nothing of the simulator.
The plain sections (machine, geometry, decision, ...) are here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sorterd.configfile import ConfigError, build, describe, load_toml, opt
from sorterd.domain import BINS, CLARITIES, COLORS, DEFAULT_BINS, JET_BINS
from sorterd.parts.camera import CameraOptions
from sorterd.parts.inference import InferenceOptions
from sorterd.parts.lights import LightsOptions
from sorterd.parts.registry import RENAMED
from sorterd.parts.trigger import TriggerOptions
from sorterd.parts.valves import ValveOptions


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
    on_drift: str = opt(
        "hold-cut", "While the batch's drift alarm is raised (the model's out-of-distribution gate: more than its "
        "share of recent stones out): hold-cut sends stones bound for CUT to low_confidence_bin, flagged; hold-all "
        "sends every classified stone there; alarm-only only warns.", choices=("hold-cut", "hold-all", "alarm-only"),
    )

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
    queue_size: int = opt(20000, "Rows waiting for the writer thread before overflow is counted; as many again are "
                          "held (and retried) while the disk refuses writes.", minval=10, maxval=1_000_000)
    min_free_mb: float = opt(100.0, "Free space (MB, 10^6 bytes) on the disk of the batch folder (or of run --record's "
                             "session) below which images (thumbnails, flagged frames, recorded pairs) are skipped, "
                             "counted as lost, so that rows keep their room; 0 = write images until the disk is full.",
                             minval=0.0, maxval=1_000_000.0)


@dataclass(frozen=True)
class CalibrationConfig:
    dir: str = opt("calibration", "Where `sorterd calibrate` keeps profiles (<dir>/<machine>/<date>/); relative to the working directory.")
    required: bool = opt(True, "Refuse to sort without a passing calibration of the current day (override: run --uncalibrated, logged).")
    warmup_s: float = opt(300.0, "Light warm-up before measuring (§2.4: 5 minutes); 0 = skip.", minval=0.0, maxval=3600.0)
    target_diameter_mm: float = opt(4.0, "Diameter of the calibration target's disc (the scale step measures px/mm on it).",
                                    minval=0.5, maxval=50.0)
    kit: str = opt("", "JSON-lines file of the reference stone kit's labels, in feeding order (real machines).")


@dataclass(frozen=True)
class ModelsConfig:
    dir: str = opt("models_state", "The sorter's signed-release store (releases/<N>, staging/, state.json: "
                   "sorterd.release.store); relative to the config file.")
    trusted_keys: tuple[str, ...] = opt((), "Ed25519 release public keys (.release.pub PEM files) whose "
                                        "signatures this sorter accepts; empty = no release is accepted.")
    max_release_mb: float = opt(200.0, "Largest release accepted (MB, 10^6 bytes, all files).", above=0.0,
                                maxval=100_000.0)
    min_agreement: float = opt(0.90, "QA gate: the least reference-kit agreement before a release may go "
                               "live (§8.4 item 6).", minval=0.5, maxval=1.0)
    require_kit: bool = opt(True, "QA gate: refuse a release while no reference kit is recorded (calibration's "
                            "reference-stone step writes <calibration.dir>/<machine>/<date>/kit.npz); false = "
                            "only the golden check runs then.")
    auto_activate: bool = opt(False, "A release downloaded from the trainer, verified and QA-gated, goes live "
                              "by itself (activated in the store; the running sorter swaps it in between two "
                              "frame pairs).  Off by default: the operator runs sorterd models activate N, so a "
                              "model never changes mid-lot unless someone chose it (the rows name the release "
                              "either way, and the health watch still applies).")
    poll_s: float = opt(1.0, "How often the running sorter reads state.json for a newly activated release "
                        "(sorterd.release.swap).", minval=0.05, maxval=600.0)
    prepare_timeout_s: float = opt(120.0, "How long the running sorter's helper process may take to check a newly "
                                   "activated release, or to stage one downloaded from the trainer "
                                   "(verification, golden, reference kit; at the lowest CPU priority) before that try "
                                   "is given up (tried again after 60 s, doubling to 15 min; refused as "
                                   "prepare-timeout after 5 tries).",
                                   minval=1.0, maxval=3600.0)
    health_stones: int = opt(200, "Health watch: stones compared after a swap (and of the release before it) "
                             "before the new release is committed or rolled back.", minval=10, maxval=1_000_000)
    health_max_flagged_delta: float = opt(0.15, "Health watch: largest change of the flagged rate.", minval=0.0, maxval=1.0)
    health_max_select_delta: float = opt(0.15, "Health watch: largest change of the SELECT rate.", minval=0.0, maxval=1.0)
    health_max_mix_distance: float = opt(0.25, "Health watch: largest total-variation distance between the "
                                         "(color, clarity) mixes.", minval=0.0, maxval=1.0)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = opt(True, "Serve Prometheus metrics over HTTP.")
    host: str = opt("127.0.0.1", "Bind address (localhost unless you mean it).")
    port: int = opt(9108, "Port; 0 = any free port.", minval=0, maxval=65535)
    linger_s: float = opt(0.0, "After the batch ends, keep serving its final figures this many seconds so a "
                          "scrape catches the last counts (0: stop at once; skipped on the virtual clock).",
                          minval=0.0, maxval=3600.0)


@dataclass(frozen=True)
class ServiceConfig:
    stall_s: float = opt(5.0, "Under systemd: a stage (capture, workers, record writer, valve outcomes) with work waiting "
                         "and no progress for this long stops the watchdog pings, so systemd restarts the sorter; keep "
                         "it below the unit's WatchdogSec (10 s).", minval=0.5, maxval=600.0)


# A sorter id names files and folders on the trainer (its key file, its inbox folder).
SORTER_ID_CHARS = "letters, digits, '.', '_' and '-' (not starting with '.' or '-'), at most 64"


def file_name_safe(name: str) -> bool:
    """`name` may name a file on any system: SORTER_ID_CHARS."""
    return re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}", name) is not None


@dataclass(frozen=True)
class LinkConfig:
    """The link to the trainer (§5.1): flagged stones go to a disk outbox first, then over CurveZMQ."""

    enabled: bool = opt(False, "Send flagged stones (and drift stones) to the trainer; needs link.trainer_key "
                        "and link.secret_key.")
    sorter_id: str = opt("", "This sorter's id on the trainer; empty = machine.name. File-name-safe: " + SORTER_ID_CHARS + ".")
    trainer: str = opt("tcp://127.0.0.1:5591", "The trainer's ZeroMQ endpoint (tcp://host:port).")
    trainer_key: str = opt("", "Path of the trainer's public key file (CurveZMQ).")
    secret_key: str = opt("", "Path of this sorter's secret key file (CurveZMQ; readable by this user only).")
    outbox_dir: str = opt("outbox", "Where the outbox (outbox.db) keeps records until the trainer has them; "
                          "relative to the working directory.")
    outbox_quota_mb: float = opt(2000.0, "Most payload the outbox keeps (MB, 10^6 bytes); beyond it the oldest "
                                 "drift stones go first, then the oldest flagged ones (counted, logged).",
                                 minval=1.0, maxval=1_000_000.0)
    drift_every: int = opt(0, "Also send every Nth confidently sorted stone (reason 'drift'); 0 = none.",
                           minval=0, maxval=1_000_000)
    send_window: int = opt(16, "Records sent and not yet acknowledged, at most.", minval=1, maxval=1024)
    heartbeat_s: float = opt(1.0, "Heartbeat interval to the trainer.", above=0.0, maxval=60.0)
    ack_timeout_s: float = opt(10.0, "A record not acknowledged this long is sent again.", above=0.0, maxval=3600.0)
    reconnect_max_s: float = opt(30.0, "Longest wait between reconnection attempts (backoff).", above=0.0, maxval=3600.0)

    def __post_init__(self) -> None:
        problems = []
        if self.sorter_id and not file_name_safe(self.sorter_id):
            problems.append(f"link.sorter_id = {self.sorter_id!r} is not file-name-safe: use {SORTER_ID_CHARS}")
        if not self.trainer.startswith(("tcp://", "ipc://")) or self.trainer.endswith("//"):
            problems.append(f"link.trainer = {self.trainer!r}: give a ZeroMQ endpoint, tcp://HOST:PORT (or ipc://PATH)")
        if self.enabled:
            missing = [f"link.{k}" for k in ("trainer_key", "secret_key") if not getattr(self, k)]
            if missing:
                problems.append(f"link.enabled = true needs {' and '.join(missing)}: the path(s) of the key "
                                "files (`sorterd keys generate`)")
        if problems:
            raise ConfigError(problems)


def link_sorter_id(cfg: Config) -> str:
    """The id this sorter's records carry: link.sorter_id, or machine.name."""
    return cfg.link.sorter_id or cfg.machine.name


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
    controller: str = opt("host_build", "valves.type = 'mcu' on the simulated machine: host_build = start the firmware's "
                          "host build on a pseudo-terminal, its pins opening the simulated jets; port = use the "
                          "controller on valves.port (a board on the bench, or firmware started elsewhere).",
                          choices=("host_build", "port"))
    controller_freq_hz: float = opt(12_000_000.0, "valves.type = 'mcu': the simulated controller's (the firmware's "
                                    "host build) nominal clock frequency.", minval=1e5, maxval=1e9)
    controller_drift_ppm: float = opt(37.0, "valves.type = 'mcu': its true rate error, for the clock sync to find.",
                                      minval=-1000.0, maxval=1000.0)
    controller_offset: int = opt(123_456_789_000, "valves.type = 'mcu': its clock when it starts (ticks).",
                                 minval=0, maxval=2**62)
    controller_realtime: bool = opt(True, "valves.type = 'mcu': run the firmware process SCHED_FIFO with memory "
                                    "locked, when permitted.")

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


# part -> backend type -> options class: the registry's (sorterd.parts.registry.options_table),
# given by the caller -- this module knows no backend, and nothing of the simulator.
Backends = Mapping[str, Mapping[str, type]]
PARTS = ("camera", "lights", "trigger", "valves", "inference")

PLAIN_SECTIONS: dict[str, type] = {
    "machine": MachineConfig,
    "geometry": GeometryConfig,
    "decision": DecisionConfig,
    "ejection": EjectionConfig,
    "pipeline": PipelineConfig,
    "record": RecordConfig,
    "calibration": CalibrationConfig,
    "metrics": MetricsConfig,
    "service": ServiceConfig,
    "link": LinkConfig,
    "sim": SimConfig,
    "models": ModelsConfig,
}


@dataclass(frozen=True)
class Config:
    machine: MachineConfig
    geometry: GeometryConfig
    camera: CameraOptions
    lights: LightsOptions
    trigger: TriggerOptions
    valves: ValveOptions
    inference: InferenceOptions
    decision: DecisionConfig
    ejection: EjectionConfig
    pipeline: PipelineConfig
    record: RecordConfig
    calibration: CalibrationConfig
    metrics: MetricsConfig
    sim: SimConfig
    service: ServiceConfig = dataclasses.field(default_factory=ServiceConfig)
    models: ModelsConfig = dataclasses.field(default_factory=ModelsConfig)
    link: LinkConfig = dataclasses.field(default_factory=LinkConfig)
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
        parts: tuple[tuple[str, CameraOptions | TriggerOptions | ValveOptions | LightsOptions], ...] = (
            ("camera", self.camera), ("trigger", self.trigger), ("valves", self.valves), ("lights", self.lights))
        return [f"{name}.type = {options.type!r}" for name, options in parts if options.wall_clock]

    def resolve(self, path: str) -> Path:
        """A path from the config file, relative to the file's directory."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.source is None:
            return p
        return (self.source.parent / p).resolve()


def _build_backend(part: str, raw: Any, backends: Mapping[str, type], problems: list[str]) -> Any:
    default_type = next(iter(backends))
    if not isinstance(raw, dict):
        problems.append(f"[{part}] must be a table, got {raw!r}")
        raw = {}
    kind = raw.get("type", default_type)
    if kind not in backends:
        known = ", ".join(map(repr, backends))
        renamed = RENAMED.get((part, kind))
        if renamed:
            problems.append(f"{part}.type = {kind!r} is the old spelling: write {renamed} (choose one of {known})")
        else:
            problems.append(f"{part}.type = {kind!r} is not a known backend: choose one of {known}")
        return backends[default_type]()
    return build(backends[kind], raw, part, problems)


def from_dict(raw: dict[str, Any], source: Path | None = None, *, backends: Backends) -> Config:
    """A validated Config from TOML tables; `backends` is the registry's options table."""
    problems: list[str] = []
    known = set(PARTS) | set(PLAIN_SECTIONS)
    for key in raw:
        if key not in known:
            problems.append(f"[{key}]: unknown section; valid sections are: {', '.join(sorted(known))}")
    sections: dict[str, Any] = {}
    for part in PARTS:
        sections[part] = _build_backend(part, raw.get(part, {}), backends[part], problems)
    for name, cls in PLAIN_SECTIONS.items():
        sections[name] = build(cls, raw.get(name, {}), name, problems)
    problems += _cross_checks(sections)
    problems += _link_checks(sections)
    if problems:
        raise ConfigError(problems, str(source) if source else "")
    return Config(source=source, **sections)


def _cross_checks(sections: dict[str, Any]) -> list[str]:
    """Backends that only make sense together: each part's options check themselves against
    the other sections (the check that needs one backend's options lives with them)."""
    if any(sections[name] is None for name in (*PARTS, "ejection")):
        return []  # already refused: its own problems are reported
    problems: list[str] = []
    for part in ("camera", "trigger", "lights", "valves"):
        problems += sections[part].cross_check(sections)
    return problems


def _link_checks(sections: dict[str, Any]) -> list[str]:
    """The link names this sorter machine.name when link.sorter_id is empty: then that must be safe too."""
    link, machine = sections.get("link"), sections.get("machine")
    if link is None or machine is None or not link.enabled or link.sorter_id or file_name_safe(machine.name):
        return []
    return [f"machine.name = {machine.name!r} is this sorter's id on the trainer (link.sorter_id is empty) and is "
            f"not file-name-safe: set link.sorter_id, using {SORTER_ID_CHARS}"]


def load(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None, *, backends: Backends) -> Config:
    """Load and validate a config file; `overrides` are merged section-wise (CLI flags).

    Callers use the composition root's `sorterd.cli.compose.load_config`, which passes the registry."""
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
        return from_dict(raw, path.resolve(), backends=backends)
    except ConfigError as exc:
        exc.source = str(path)
        raise


def sim_config_path() -> Path:
    """The example config for the simulated machine, shipped in the package."""
    return Path(__file__).parent / "configs" / "sim.toml"


def reference(backends: Backends) -> str:
    """Markdown config reference generated from the schema: every backend of every part, then
    the plain sections."""
    out = []
    for part in PARTS:
        for kind, cls in backends[part].items():
            out.append(f"\n### `[{part}]` type = \"{kind}\"\n")
            out += [f"- {line}" for line in describe(cls, part)]
    for name, cls in PLAIN_SECTIONS.items():
        out.append(f"\n### `[{name}]`\n")
        out += [f"- {line}" for line in describe(cls, name)]
    return "\n".join(out) + "\n"


def replace(cfg: Config, **sections: Any) -> Config:
    return dataclasses.replace(cfg, **sections)
