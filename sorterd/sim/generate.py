"""`sorterd sim generate`: a labelled dataset in the §7.1 layout from a simulated lot.

For every capture session (at most `session_stones` stones each) the lot's
stones are fed down the simulated channel with that session's lighting drift
(`sorterd.sim.lots.SessionDrift`), the beam triggers frame pairs as on the
machine, and the daemon's own segmentation (`sorterd.sorting.segment`) finds and
crops them -- so the crops are what the sorter feeds its model.  Written:

    DIR/images/raw/<session_id>/backlit|toplit/<stone_id>.png  the frame pair
                                  reference/backlit|toplit.png  empty channel
                                  session_meta.json              §2.4 + pixels_per_mm
                                  frames.jsonl                   pair times
    DIR/images/processed/backlit|toplit/<stone_id>.png   ROI crops, crop_mm square,
                                                         at the camera's scale
    DIR/images/processed/processed_meta.json             {"crop_mm": ...}
    DIR/sessions/<session_id>.json                       copy of the meta (§7.1)
    DIR/labels.jsonl                                     §3.4, appended

Raw pairs follow `sorterd.data.session` (what `sorterd run --record` writes and
`--replay` reads): one pair per capture, named after the first new stone in
it; every stone records its pair's id in ``raw_pair`` and its toplit centroid
in that pair in ``raw_x_mm``/``raw_y_mm`` (how `sorterd.data.samples` finds
it).  Stones in a touching cluster are not labelled (the sorter never
classifies a cluster as one stone).

Appending another lot or session to an existing DIR continues the stone
numbering (§7.2 S{NNNNNN}) and the session numbering of the day.
"""

from __future__ import annotations

import fcntl
import json
import math
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dc_replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sorterd import config
from sorterd.data.dataset import DEFAULT_CROP_MM, LABELS_FILE, PROCESSED_META, DatasetError, read_labels
from sorterd.data.files import write_json_atomic, write_png_atomic
from sorterd.data.session import PairTimes, SessionMeta, SessionWriter, new_session_id
from sorterd.domain import LIGHT_MODES
from sorterd.sim.dataset import machine_captures
from sorterd.sim.lots import NOMINAL_EXPOSURE_US, Lot, MachineLook, SessionDrift
from sorterd.sim.machine import SimMachine
from sorterd.sim.parts.camera import SimCameraConfig
from sorterd.sim.stones import StoneSpec
from sorterd.sorting.segment import Observation, crop_halves

COLLECTION_RATE_PER_S = 2.0  # the feeder runs slowly while collecting (§1.2: ~1,200 stones/h)
WORKSHOP_TZ = timezone(timedelta(hours=7))  # §3.4 examples: Thailand
_FEED_MARGIN = 1.06  # clusters are not labelled: feed a few more stones than asked for

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GenerateOptions:
    out: Path
    stones: int
    lot: Lot
    seed: int = 0
    session_stones: int = 1500
    day: date | None = None  # date of the sessions (§7.2 ids); None = today
    crop_mm: float = DEFAULT_CROP_MM
    annotator: str = "sim-annotator"

    def __post_init__(self) -> None:
        if self.stones < 1:
            raise ValueError(f"stones = {self.stones}: must be >= 1")
        if self.session_stones < 1:
            raise ValueError(f"session_stones = {self.session_stones}: must be >= 1")
        if not 1.0 <= self.crop_mm <= 30.0:
            raise ValueError(f"crop_mm = {self.crop_mm}: must be in 1..30 mm")


@dataclass
class GenerateResult:
    stones: int = 0
    sessions: list[str] = field(default_factory=list)
    first_id: str = ""
    last_id: str = ""
    seconds: float = 0.0


class GenerateInterrupted(KeyboardInterrupt):
    """Ctrl-C while generating: `result` says what was written (every counted stone has its
    crops and its label line; a crop without a label may be left for the stone in hand)."""

    def __init__(self, result: GenerateResult) -> None:
        super().__init__(f"interrupted after {result.stones} stones")
        self.result = result


@dataclass
class _Writer:
    """Where the next stone goes; owned by the generating thread."""

    out: Path
    next_number: int
    labels: Any  # the open labels.jsonl (append)
    result: GenerateResult  # what is written so far (updated per stone, read when interrupted)

    def wrote(self, sid: str) -> None:
        """A stone's crops and label line are written."""
        self.next_number += 1
        self.result.stones += 1
        self.result.first_id = self.result.first_id or sid
        self.result.last_id = sid


def generate(cfg: config.Config, opts: GenerateOptions, progress: Progress | None = None) -> GenerateResult:
    """Write opts.stones labelled stones of opts.lot into opts.out (appending)."""
    started = time.perf_counter()
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    result = GenerateResult()
    try:
        _generate(cfg, opts, progress, result)
    except KeyboardInterrupt:
        # The labels file is closed (flushed) on the way out: what `result` counts is on disk.
        result.seconds = time.perf_counter() - started
        raise GenerateInterrupted(result) from None
    result.seconds = time.perf_counter() - started
    return result


def _generate(cfg: config.Config, opts: GenerateOptions, progress: Progress | None, result: GenerateResult) -> None:
    out = opts.out
    # One writer at a time per dataset: stone numbers must stay unique.
    with open(out / ".generate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _check_crop_mm(out, opts.crop_mm)
        with open(out / LABELS_FILE, "a", encoding="utf-8") as labels:
            writer = _Writer(out, _next_stone_number(out), labels, result)
            remaining, index = opts.stones, 0
            while remaining > 0:
                n = min(remaining, opts.session_stones)
                written, sid = _session(cfg, opts, writer, index, n, progress)
                if written == 0:  # every stone touched another: the feeder settings are wrong
                    raise RuntimeError(f"session {sid}: no single stone was captured")
                remaining -= written
                index += 1


def _check_crop_mm(out: Path, crop_mm: float) -> None:
    """All crops of a dataset cover the same physical square; record it once."""
    path = out / "images" / "processed" / PROCESSED_META
    if path.exists():
        have = json.loads(path.read_text()).get("crop_mm")
        if have is not None and abs(float(have) - crop_mm) > 1e-6:
            raise DatasetError(f"{path}: this dataset's crops are {have} mm; --crop-mm {crop_mm} would mix "
                               "two crop sizes")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"crop_mm": crop_mm, "cut_by": "sorterd.sorting.segment (the daemon's segmentation)"})


def _next_stone_number(out: Path) -> int:
    """1 + the highest S-number in labels.jsonl or among the processed crops."""
    numbers = [0]
    if (out / LABELS_FILE).exists():
        numbers += [_number(lab.stone_id) for lab in read_labels(out / LABELS_FILE)]
    crops = out / "images" / "processed" / "backlit"
    if crops.is_dir():
        numbers += [_number(p.stem) for p in crops.glob("S*.png")]
    return max(numbers) + 1


def _number(stone_id: str) -> int:
    return int(stone_id[1:]) if stone_id[:1] == "S" and stone_id[1:].isdigit() else 0


def _stone_id(number: int) -> str:
    return f"S{number:06d}"  # §7.2


# -- one session -------------------------------------------------------------------------


def _session(cfg: config.Config, opts: GenerateOptions, writer: _Writer, index: int, n: int,
             progress: Progress | None) -> tuple[int, str]:
    """Capture n labelled stones in a new session; (written, session_id)."""
    seed = [opts.seed, zlib.crc32(opts.lot.lot_id.encode()), index]
    rng = np.random.default_rng(seed)
    drift = opts.lot.session_drift(rng)
    sim = dc_replace(cfg.sim, seed=int(rng.integers(0, 2**31 - 1)), rate_per_s=COLLECTION_RATE_PER_S)
    # This session's machine (domain randomisation), from its own stream: a nominal lot
    # draws nothing and makes the same stones as before MachineRanges existed.
    look = MachineLook() if opts.lot.machine.nominal else opts.lot.machine.draw(np.random.default_rng([*seed, 1]))
    cfg = _session_config(cfg, sim, look)
    machine = SimMachine(cfg)
    if not opts.lot.machine.nominal:
        machine.optics = look.optics(machine.optics)
    machine.optics = drift.optics(machine.optics)
    machine.world.feed(math.ceil(n * _FEED_MARGIN) + 3, 0, lot=look.lot(opts.lot))
    framing = np.random.default_rng([*seed, 2])
    day = opts.day or date.today()
    session_id = new_session_id(writer.out, datetime(day.year, day.month, day.day))
    start = datetime(day.year, day.month, day.day, 9, 0, tzinfo=WORKSHOP_TZ) + timedelta(hours=2 * index)
    refs = {m: machine.render_reference(m) for m in LIGHT_MODES}
    meta = _session_meta(cfg, opts, session_id, start, drift, refs["backlit"])
    session = SessionWriter(writer.out, meta)
    writer.result.sessions.append(session_id)
    _write_meta(writer.out, session, meta, opts, drift, look)
    for mode, image in refs.items():
        session.write_reference(mode, image)
    written = 0
    for cap in _captures(machine, cfg, refs):
        pair_id = _stone_id(writer.next_number)
        session.write_pair(pair_id, cap.backlit, cap.toplit, cap.times)
        for obs, stone in cap.found:
            if written == n:
                break
            sid = _stone_id(writer.next_number)
            at = (obs.x_mm, obs.y_mm)  # where the segmentation found it, before the crop's framing offset
            obs = _reframe(obs, look.framing_mm * cfg.camera.pixels_per_mm, framing)
            _write_stone(writer, opts, cfg, cap, obs, stone, sid, pair_id, session_id, start, at)
            writer.wrote(sid)
            written += 1
        if progress is not None and (written % 100 == 0 or written == n):
            progress(f"session {session_id} ({opts.lot.lot_id}): {written}/{n} stones")
        if written == n:
            break
    writer.labels.flush()
    return written, session_id


def _session_meta(cfg: config.Config, opts: GenerateOptions, session_id: str, start: datetime,
                  drift: SessionDrift, ref_backlit: np.ndarray) -> SessionMeta:
    """§2.4 fields as the session-start checklist would record them."""
    h, w = ref_backlit.shape[:2]
    centre = ref_backlit[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    b, g, r = drift.wb_gains
    return SessionMeta(
        session_id=session_id, timestamp_start=start.isoformat(timespec="seconds"),
        lot_id=opts.lot.lot_id, lot_description=opts.lot.description,
        backlight_exposure_us=NOMINAL_EXPOSURE_US["backlit"],
        ringlight_exposure_us=round(NOMINAL_EXPOSURE_US["toplit"] * drift.ring_gain, 1),
        camera_gain=1.0,
        white_balance_matrix=[[round(r, 4), 0.0, 0.0], [0.0, round(g, 4), 0.0], [0.0, 0.0, round(b, 4)]],
        reference_backlight_intensity=round(float(centre.mean()), 1),
        reference_check_passed=drift.worst_deviation < 0.05,  # §2.4: > 5 % drift = re-calibrate
        ambient_temp_c=28.0,
        notes=f"simulated ({opts.lot.origin}); stones dry",
        pixels_per_mm=cfg.camera.pixels_per_mm,
        pair_interval_ms=cfg.lights.pair_interval_ms,
    )


def _session_config(cfg: config.Config, sim: config.SimConfig, look: MachineLook) -> config.Config:
    """The session's configuration: its sim seed, and the camera at the drawn machine's scale
    (the frame keeps its size in mm) and noise -- what the session's calibration would record."""
    cam = cfg.camera
    if look == MachineLook():
        return config.replace(cfg, sim=sim)
    if not isinstance(cam, SimCameraConfig):
        raise ValueError(f"camera.type = {cam.type!r}: generating a dataset needs the simulated camera (sim)")
    k = look.px_per_mm / float(cam.pixels_per_mm)
    cam = dc_replace(cam, pixels_per_mm=look.px_per_mm, width_px=max(64, round(cam.width_px * k)),
                     height_px=max(32, round(cam.height_px * k)), noise_sigma=look.noise_dn * look.gain)
    return config.replace(cfg, sim=sim, camera=cam)


def _reframe(obs: Observation, max_px: float, rng: np.random.Generator) -> Observation:
    """The observation with its crop centre moved by up to max_px per axis (crop framing):
    the same offset in both frames, as one capture program's framing would be."""
    if max_px <= 0:
        return obs
    dx, dy = (float(v) for v in rng.uniform(-max_px, max_px, 2))
    return dc_replace(obs, backlit=dc_replace(obs.backlit, cx=obs.backlit.cx + dx, cy=obs.backlit.cy + dy),
                      toplit=dc_replace(obs.toplit, cx=obs.toplit.cx + dx, cy=obs.toplit.cy + dy))


def _write_meta(out: Path, session: SessionWriter, meta: SessionMeta, opts: GenerateOptions,
                drift: SessionDrift, look: MachineLook) -> None:
    """session_meta.json with what the simulator knows on top, and the §7.1 sessions/ copy."""
    full = asdict(meta) | {"sim": {"lot": opts.lot.name, "seed": opts.seed, "drift": asdict(drift),
                                   "crop_mm": opts.crop_mm, "machine": asdict(look)}}
    write_json_atomic(session.dir / "session_meta.json", full)
    (out / "sessions").mkdir(exist_ok=True)
    write_json_atomic(out / "sessions" / f"{meta.session_id}.json", full)


def _write_stone(writer: _Writer, opts: GenerateOptions, cfg: config.Config, cap: _Capture, obs: Observation,
                 stone: StoneSpec, sid: str, pair_id: str, session_id: str, start: datetime,
                 at: tuple[float, float]) -> None:
    crop_px = round(opts.crop_mm * cfg.camera.pixels_per_mm)
    # Native scale (out_size = crop_px): consumers resize to their model's input.
    halves = crop_halves(cap.backlit, cap.toplit, obs, crop_px, crop_px)
    for mode, image in zip(LIGHT_MODES, halves, strict=True):
        path = writer.out / "images" / "processed" / mode / f"{sid}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png_atomic(path, image)
    writer.labels.write(json.dumps(_label(opts, obs, stone, sid, pair_id, session_id, start, cap, at)) + "\n")


def _label(opts: GenerateOptions, obs: Observation, stone: StoneSpec, sid: str, pair_id: str,
           session_id: str, start: datetime, cap: _Capture, at: tuple[float, float]) -> dict[str, Any]:
    """§3.4 fields (+ size_mm as segmented, the raw pair and the stone's toplit centroid in it,
    `sorterd.data.samples`' link, and the simulator's truth)."""
    color, clarity = stone.human_label()
    stamp = start + timedelta(microseconds=cap.times.t_toplit_ns / 1e3)
    return {
        "stone_id": sid, "color": color, "clarity": clarity, "lot_id": stone.lot_id,
        "session_id": session_id, "annotator": opts.annotator, "timestamp": stamp.isoformat(timespec="seconds"),
        "uncertain": "uncertain" in stone.flags, "mixed": "mixed" in stone.flags,
        "damaged": "damaged" in stone.flags, "reject": "reject" in stone.flags, "notes": stone.notes,
        "size_mm": round(obs.size_mm, 3), "raw_pair": pair_id,
        "raw_x_mm": round(at[0], 4), "raw_y_mm": round(at[1], 4),
        "sim": {"color": stone.color, "clarity": stone.clarity, "sieve_mm": round(stone.size_mm, 3)},
    }


# -- captures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Capture:
    backlit: np.ndarray
    toplit: np.ndarray
    times: PairTimes
    found: list[tuple[Observation, StoneSpec]]  # new single stones, matched to the truth


def _captures(machine: SimMachine, cfg: config.Config, refs: dict[str, np.ndarray]) -> Iterator[_Capture]:
    """One frame pair per beam edge, as the machine triggers; only pairs with a new stone."""
    for cap in machine_captures(machine, cfg, refs):
        if cap.found:
            yield _Capture(cap.backlit, cap.toplit, PairTimes(cap.t_edge_ns, cap.t_backlit_ns, cap.t_toplit_ns),
                           cap.found)
