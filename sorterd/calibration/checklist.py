"""`sorterd calibrate`: the §2.4 session checklist, run step by step (`Checklist`).

Every step measures something, passes, warns or fails, and on failure says
what to do.  The result is a calibration profile (today's date, scale,
reference frames, white balance, per-valve latency) that `sorterd run` loads,
plus the §2.4 session metadata.

Steps (§2.4, §8.4):
  warm-up          lights on for `warmup_s` before measuring (skippable)
  references       empty channel in both modes, averaged: the segmentation background
  backlight        panel intensity vs the stored baseline: drift > 5 % fails
  white balance    gray card under the ring light -> WB matrix; dE > 3 vs baseline warns
  scale            a target of known size -> px/mm; > 2 % off the configured scale fails
  reference stones the kit through segmentation + model: < 90 % agreement fails; when it
                   passes, the crops fed to the model and their labels are the recorded kit
                   (`<dir>/<machine>/<date>/kit.npz`, `sorterd.release.qa`) that the release
                   QA gate judges every new release on (§8.4 item 6, issue 12 item 4)
  valve timing     test stones, pulses shifted around the plan: each valve's hit window
                   bracketed and bisected (one dropped stone per probe), its delay
                   measured and corrected in the profile

The hardware actions go through a `Rig`.  `SimRig` drives the simulated
machine (with its injected faults); `sorterd.calibration.rig.MachineRig` drives a real one
through its camera, strobe, trigger and valve backends.  A real machine needs
a person for the gray card, the target, the reference kit and the valve test
stones (`needs_operator`): a non-interactive run skips those steps, and a
skipped required step means the profile does not pass.  Before a machine has
a stored baseline (`sorterd calibrate --set-baseline`), the drift steps warn.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

import cv2
import numpy as np

from sorterd.config import Config
from sorterd.data.files import write_json_atomic, write_png_atomic
from sorterd.data.session import SessionMeta
from sorterd.domain import JET_BINS
from sorterd.parts.inference import Model
from sorterd.release.qa import KIT_FILE, RecordedKit, save_kit
from sorterd.sorting.drift import alarm_text
from sorterd.sorting.segment import PairingLimits, crop_pair, find_blobs, segment_pair

BACKLIGHT_DRIFT_MAX = 0.05  # §2.4 step 3
DELTA_E_WARN = 3.0  # §2.4 step 4
SCALE_ERROR_MAX = 0.02
AGREEMENT_MIN = 0.90  # §8.4 item 6
VALVE_SWEEP_MS = 8.0
VALVE_STEP_MS = 0.25
VALVE_COARSE_MS = 2.0  # first probes at 0, +-2, +-4, ... ms until one hits
OPTIONAL_STEPS = ("warm-up",)  # a skipped step other than these fails the profile
NO_BASELINE = "no baseline yet: run `sorterd calibrate --set-baseline` on a healthy machine"


@dataclass
class StepResult:
    name: str
    status: str  # pass | warn | fail | skip
    measured: dict[str, Any]
    message: str


@dataclass
class Baseline:
    """What a healthy machine measured when it was set up (the comparison for drift)."""

    backlight_intensity: float
    gray_bgr: list[float]
    pixels_per_mm: float


@dataclass
class Profile:
    date: str
    machine: str
    passed: bool
    pixels_per_mm: float
    white_balance_matrix: list[list[float]]
    backlight_intensity: float
    opening_latency_ms: dict[str, float]
    reference_dir: str
    steps: list[StepResult] = field(default_factory=list)
    # The reference-stone step's crops and labels when it passed (saved beside profile.json as
    # kit.npz by `save_profile`, not in the JSON).
    kit: RecordedKit | None = field(default=None, repr=False, compare=False)

    def as_json(self) -> dict[str, Any]:
        """profile.json's content (the kit is its own file)."""
        raw = asdict(replace(self, kit=None))
        del raw["kit"]
        return raw

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.as_json())

    @classmethod
    def load(cls, path: Path) -> Profile:
        raw = json.loads(path.read_text())
        raw["steps"] = [StepResult(**s) for s in raw.get("steps", [])]
        return cls(**raw)


class Rig(Protocol):
    """The hardware actions calibration needs."""

    needs_operator: bool  # gray card, target, kit and test stones are placed by a person (skipped unattended)
    instant_warmup: bool  # the lights are at temperature at once (simulated): warm-up passes with 0 s

    def warm_up(self, seconds: float, tick: Callable[[float], None]) -> None: ...
    def reference_frames(self) -> dict[str, np.ndarray]: ...
    def gray_card(self) -> np.ndarray: ...
    def target(self) -> tuple[np.ndarray, np.ndarray, float]: ...  # backlit image, reference, diameter mm
    def reference_stones(self) -> list[tuple[np.ndarray, np.ndarray, str, str]]: ...
    def valve_hit(self, bin_name: str, latency_ms: float, offset_ms: float) -> bool: ...
    def baseline(self) -> Baseline | None: ...  # None: none stored yet (the drift steps warn)


# -- measurements ---------------------------------------------------------------


def centre_mean(image: np.ndarray) -> np.ndarray:
    """Mean BGR of the central half of a frame (away from vignetting and walls)."""
    h, w = image.shape[:2]
    return image[h // 4: 3 * h // 4, w // 4: 3 * w // 4].reshape(-1, 3).mean(axis=0)


def lab(bgr: np.ndarray) -> np.ndarray:
    px = np.asarray(bgr, np.float32).reshape(1, 1, 3) / 255.0
    return cv2.cvtColor(px, cv2.COLOR_BGR2Lab).reshape(3)


def delta_e(bgr_a: np.ndarray, bgr_b: np.ndarray) -> float:
    """CIE76 colour difference."""
    return float(np.linalg.norm(lab(bgr_a) - lab(bgr_b)))


def wb_matrix(gray_bgr: np.ndarray) -> list[list[float]]:
    """Diagonal gains that make the gray card neutral, normalised to green."""
    b, g, r = (float(v) for v in gray_bgr)
    return [[g / r, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, g / b]]  # R, G, B rows (§2.4 example order)


def find_hit_window(probe: Callable[[float], bool], span_ms: float = VALVE_SWEEP_MS,
                    step_ms: float = VALVE_STEP_MS, coarse_ms: float = VALVE_COARSE_MS
                    ) -> tuple[tuple[float, float] | None, int]:
    """The offsets (ms, on the step grid within +-span) where `probe` hits: (first, last), and
    the number of probes it took; (None, n) when no coarse probe hit.

    On a real machine every probe is a dropped stone, so the window is not swept:
    offset 0 first, then +-coarse, +-2 coarse, ... until one hits; from there each
    edge is bracketed (steps of `coarse` outwards until a miss or the span's end)
    and bisected down to one grid step.  For a contiguous window (what a valve
    gives) the edges are exactly those of a full sweep of the grid.
    """
    n = int(round(span_ms / step_ms))
    c = max(1, int(round(coarse_ms / step_ms)))
    seen: dict[int, bool] = {}

    def hit(k: int) -> bool:
        if k not in seen:
            seen[k] = bool(probe(k * step_ms))
        return seen[k]

    order = [0] + [s * k for k in range(c, n + 1, c) for s in (1, -1)]
    first = next((k for k in order if hit(k)), None)
    if first is None:
        return None, len(seen)

    def edge(direction: int) -> int:
        inside = first
        while True:
            nxt = max(-n, min(n, inside + direction * c))
            if nxt == inside:  # hits up to the end of the span
                return inside
            if not hit(nxt):
                break
            inside = nxt
        outside = nxt
        while abs(outside - inside) > 1:
            mid = (inside + outside) // 2
            if hit(mid):
                inside = mid
            else:
                outside = mid
        return inside

    lo, hi = edge(-1), edge(+1)
    return (lo * step_ms, hi * step_ms), len(seen)


TARGET_RING_PX = 8  # the target's edge light loss is summed this far outside its mask


def target_diameter_px(image: np.ndarray, reference: np.ndarray) -> float:
    """Equivalent-circle diameter of the largest object (the opaque target disc on the backlight).

    Not the thresholded mask's area (its contour runs through the edge pixels'
    centres, and a defocused edge moves wherever the threshold cuts it: +5 % at
    a 2 px blur) but the light the disc takes away: each pixel's drop below the
    reference, as a fraction of the full drop inside the disc, summed over the
    disc and a ring around it.  Edge blur only spreads that sum out, so the
    area is right to a few hundredths of a pixel whatever the focus.
    """
    blobs = find_blobs(image, reference)
    if not blobs:
        raise RuntimeError("no target found in the frame")
    disc = max(blobs, key=lambda b: b.area)
    pad = TARGET_RING_PX
    x, y, w, h = disc.bbox
    height, width = image.shape[:2]
    x0, y0, x1, y1 = max(0, x - pad), max(0, y - pad), min(width, x + w + pad), min(height, y + h + pad)
    mask = np.zeros((height, width), np.uint8)
    cv2.drawContours(mask, [disc.contour], -1, 255, -1)
    mask = mask[y0:y1, x0:x1]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pad + 1, 2 * pad + 1))
    ring = cv2.dilate(mask, kernel) > 0
    # The full drop is read in the inner half of the disc, far from any blurred edge.
    inner = max(pad, int(math.sqrt(disc.area / math.pi) / 2))
    core = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * inner + 1, 2 * inner + 1))) > 0
    if not core.any():  # a disc smaller than the ring: its centre pixels are still fully dark
        small = cv2.erode(mask, np.ones((3, 3), np.uint8)) > 0
        core = small if small.any() else mask > 0
    gray = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)[y0:y1, x0:x1].astype(np.float32) for f in (reference, image)]
    drop = gray[0] - gray[1]
    full = float(drop[core].mean())  # (a median of integer levels would be off by up to half a level)
    if full <= 0:
        raise RuntimeError("the target is not darker than the empty channel: an opaque disc on the backlight is needed")
    area = float(drop[ring].sum()) / full
    return 2.0 * math.sqrt(max(area, 0.0) / math.pi)


# -- the checklist --------------------------------------------------------------


class Checklist:
    """One calibration run: the §2.4 steps in order, each result recorded and printed."""

    def __init__(self, cfg: Config, rig: Rig, out: TextIO, ask: Callable[[str], None] | None) -> None:
        self.cfg = cfg
        self.rig = rig
        self.out = out
        self.ask = ask  # None = non-interactive
        # A real machine's gray card, target, kit and test stones need a person.
        self.unattended = ask is None and rig.needs_operator
        self.results: list[StepResult] = []
        self.kit: RecordedKit | None = None  # the reference stones as fed to the model, once that step passed

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def prompt(self, text: str) -> None:
        if self.ask is not None:
            self.ask(text)

    def record(self, r: StepResult) -> StepResult:
        self.results.append(r)
        mark = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "skip"}[r.status]
        self.say(f"  [{mark}] {r.name}: {r.message}")
        return r

    def needs_operator(self, name: str, what: str) -> None:
        self.record(StepResult(name, "skip", {}, f"needs an operator ({what}): not done in a non-interactive "
                                                 "run (--yes), so the profile does not pass"))

    def warm_up(self, seconds: float) -> None:
        if seconds <= 0:
            self.record(StepResult("warm-up", "skip", {}, "skipped (LEDs need 2-3 min to stabilise, §2.4)"))
            return
        if self.rig.instant_warmup:  # no bar: nothing waits, and a full bar would claim `seconds` went by
            self.rig.warm_up(seconds, lambda done: None)
            self.record(StepResult("warm-up", "pass", {"seconds": 0}, "simulated lights are at temperature at once"))
            return

        def tick(done: float) -> None:
            bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
            print(f"\r  warming up lights [{bar}] {done * seconds:5.0f}/{seconds:.0f} s", end="",
                  file=self.out, flush=True)

        self.rig.warm_up(seconds, tick)
        print(file=self.out)
        self.record(StepResult("warm-up", "pass", {"seconds": seconds}, f"lights on for {seconds:.0f} s"))

    def run(self, model: Model, warmup_s: float) -> tuple[Profile, dict[str, np.ndarray]]:
        base = self.rig.baseline()
        self.say("sorterd calibrate: session checklist (§2.4)")
        self.warm_up(warmup_s)
        self.prompt("Empty the channel (no stones), lights on. Press Enter to capture the reference frames.")
        refs = self.rig.reference_frames()
        self.record(StepResult("reference frames", "pass", {"size": list(refs["backlit"].shape[:2])},
                               "empty channel captured in both modes (segmentation background)"))
        intensity = self.backlight(refs["backlit"], base)
        if self.unattended:
            matrix = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
            self.needs_operator("white balance", "the gray card under the ring light")
            ppm = float(self.cfg.camera.pixels_per_mm)
            self.needs_operator("scale", "the calibration target in the channel")
            self.needs_operator("reference stones", "feeding the reference stone kit")
        else:
            self.prompt("Place the gray card / ColorChecker under the ring light. Press Enter.")
            matrix = self.white_balance(base)
            self.prompt("Place the calibration target (a disc of known size) in the channel. Press Enter.")
            ppm = self.scale()
            self.prompt("Feed the reference stone kit. Press Enter.")
            self.reference_stones(model, ppm)
            self.prompt("Drop the valve test stones. Press Enter.")
        latency = self.valves()
        passed = all(r.status != "fail" and (r.status != "skip" or r.name in OPTIONAL_STEPS) for r in self.results)
        profile = Profile(date.today().isoformat(), self.cfg.machine.name, passed, ppm, matrix, intensity,
                          latency, "", self.results, self.kit)
        return profile, refs

    def backlight(self, backlit_ref: np.ndarray, base: Baseline | None) -> float:
        level = float(centre_mean(backlit_ref).mean())
        if base is None:
            self.record(StepResult("backlight", "warn", {"intensity": round(level, 1), "baseline": None}, NO_BASELINE))
            return level
        drift = level / base.backlight_intensity - 1.0
        m = {"intensity": round(level, 1), "baseline": round(base.backlight_intensity, 1), "drift": round(drift, 4)}
        if abs(drift) > BACKLIGHT_DRIFT_MAX:
            self.record(StepResult("backlight", "fail", m,
                                   f"{drift:+.1%} vs baseline (limit ±{BACKLIGHT_DRIFT_MAX:.0%}): adjust the LED "
                                   "driver current or re-calibrate the backlit exposure, then run calibrate again"))
        else:
            self.record(StepResult("backlight", "pass", m, f"{level:.1f} DN, {drift:+.1%} vs baseline"))
        return level

    def white_balance(self, base: Baseline | None) -> list[list[float]]:
        gray = centre_mean(self.rig.gray_card())
        matrix = wb_matrix(gray)
        if base is None:
            self.record(StepResult("white balance", "warn", {"gray_bgr": [round(float(v), 1) for v in gray],
                                                             "delta_e": None, "matrix": matrix}, NO_BASELINE))
            return matrix
        de = delta_e(gray, np.asarray(base.gray_bgr))
        m = {"gray_bgr": [round(float(v), 1) for v in gray], "delta_e": round(de, 2), "matrix": matrix}
        if de > DELTA_E_WARN:
            self.record(StepResult("white balance", "warn", m,
                                   f"dE {de:.1f} from the baseline gray (> {DELTA_E_WARN}): check for a dirty lens, "
                                   "ageing ring-light LEDs or a changed camera white balance"))
        else:
            self.record(StepResult("white balance", "pass", m, f"dE {de:.2f} from the baseline gray"))
        return matrix

    def scale(self) -> float:
        image, reference, diameter_mm = self.rig.target()
        ppm = target_diameter_px(image, reference) / diameter_mm
        configured = float(self.cfg.camera.pixels_per_mm)
        err = ppm / configured - 1.0
        m = {"measured_px_per_mm": round(ppm, 3), "configured": configured, "error": round(err, 4)}
        if abs(err) > SCALE_ERROR_MAX:
            self.record(StepResult("scale", "fail", m,
                                   f"{ppm:.2f} px/mm measured, {configured:.2f} configured ({err:+.1%}): the camera "
                                   f"or lens moved — check the mount and focus; if the new scale is right, set "
                                   f"camera.pixels_per_mm = {ppm:.2f} (the 2 mm CUT rule depends on it)"))
        else:
            self.record(StepResult("scale", "pass", m, f"{ppm:.2f} px/mm ({err:+.1%} vs configured)"))
        # Within tolerance the configured scale stands (measurement noise must not
        # churn it); outside it the step fails and the operator decides.
        return configured

    def reference_stones(self, model: Model, ppm: float) -> None:
        kit = self.rig.reference_stones()
        lim = PairingLimits.from_config(self.cfg, ppm, self.cfg.lights.pair_interval_ms)
        refs = self.rig.reference_frames()
        agree, seen = 0, 0
        scores: list[float] = []
        crop_px = int(round(model.manifest.crop_mm * ppm))
        crops, labels = [], []
        for backlit, toplit, color, clarity in kit:
            obs = segment_pair(backlit, toplit, refs["backlit"], refs["toplit"], 0, lim).observations
            if len(obs) != 1:
                continue
            seen += 1
            crop = crop_pair(backlit, toplit, obs[0], crop_px, model.manifest.size[0])
            crops.append(crop)
            labels.append((color, clarity))
            [pred], _ = model.predict(crop[None])
            m = model.manifest
            got = (m.color_classes[int(np.argmax(pred.p_color))], m.clarity_classes[int(np.argmax(pred.p_clarity))])
            agree += got == (color, clarity)
            if pred.ood is not None:
                scores.append(pred.ood)
        rate = agree / len(kit) if kit else 0.0
        meas = {"stones": len(kit), "found": seen, "agree": agree, "agreement": round(rate, 3)}
        spec = model.manifest.ood
        out = sum(1 for v in scores if not v <= spec.stone_limit) if spec is not None else 0
        if spec is not None and scores:
            meas["out_of_distribution"] = out
        if spec is not None and scores and out / len(scores) > spec.batch_share_limit:
            # The kit is the machine's own known stones: if the model finds them foreign, the
            # machine (light, scale, focus) is outside what it was trained on.
            self.record(StepResult("reference stones", "fail", meas, alarm_text(out / len(scores), len(scores), spec)))
        elif rate < AGREEMENT_MIN:
            self.record(StepResult("reference stones", "fail", meas,
                                   f"{agree}/{len(kit)} agree with their labels ({rate:.0%} < {AGREEMENT_MIN:.0%}, "
                                   "§8.4): stop — check the kit's labels, the lighting and the model before sorting"))
        else:
            self.record(StepResult("reference stones", "pass", meas, f"{agree}/{len(kit)} agree ({rate:.0%})"))
            self.kit = RecordedKit(np.stack(crops), labels, model.manifest.crop_mm)

    def valves(self) -> dict[str, float]:
        latency = dict(self.cfg.ejection.opening_latency_ms)
        measured = {}
        for b in JET_BINS:
            if self.unattended:
                self.needs_operator(f"valve {b}", "dropping test stones and saying where they landed")
                continue
            window, probes = find_hit_window(functools.partial(self.rig.valve_hit, b, latency[b]))
            if window is None:
                self.record(StepResult(f"valve {b}", "fail", {"latency_ms": latency[b], "probes": probes},
                                       f"no test stone deflected within ±{VALVE_SWEEP_MS} ms of the plan: check air "
                                       "pressure, the valve driver and the nozzle aim"))
                continue
            # The hit window is centred on perfect timing; its centre's offset is the latency error.
            first, last = window
            error = (first + last) / 2.0
            measured[b] = latency[b] - error
            m = {"configured_ms": latency[b], "measured_ms": round(measured[b], 2), "hit_window_ms": [first, last],
                 "probes": probes}
            if abs(error) > 0.5:
                self.record(StepResult(f"valve {b}", "pass", m, f"opens {-error:+.2f} ms vs configured: corrected "
                                       f"to {measured[b]:.2f} ms in the profile"))
            else:
                self.record(StepResult(f"valve {b}", "pass", m, f"latency {measured[b]:.2f} ms as configured"))
            latency[b] = round(measured[b], 3)
        return latency


# -- profiles on disk -----------------------------------------------------------------


def profile_dir(root: Path, machine: str) -> Path:
    return root / machine


def save_profile(root: Path, profile: Profile, refs: dict[str, np.ndarray], meta: SessionMeta) -> Path:
    """calibration/<machine>/<date>/: profile.json, session_meta.json, reference/{backlit,toplit}.png,
    and kit.npz when the reference-stone step passed (the release QA gate's kit)."""
    d = profile_dir(root, profile.machine) / profile.date
    (d / "reference").mkdir(parents=True, exist_ok=True)
    for mode, img in refs.items():
        write_png_atomic(d / "reference" / f"{mode}.png", img)
    if profile.kit is not None:
        save_kit(d / KIT_FILE, profile.kit)
    profile.reference_dir = str(d / "reference")
    profile.save(d / "profile.json")
    write_json_atomic(d / "session_meta.json", asdict(meta))
    return d


def baseline_path(root: Path, machine: str) -> Path:
    return profile_dir(root, machine) / "baseline.json"


def load_baseline(root: Path, machine: str) -> Baseline | None:
    """<dir>/<machine>/baseline.json, or None before the machine has one."""
    path = baseline_path(root, machine)
    if not path.exists():
        return None
    try:
        return Baseline(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a calibration baseline ({exc}); fix it, or delete it and run "
                         "`sorterd calibrate --set-baseline` on a healthy machine") from exc


def baseline_from(profile: Profile) -> Baseline:
    """A passing profile's measurements as the machine's baseline."""
    wb = next((s for s in profile.steps if s.name == "white balance" and s.status != "skip"), None)
    if not profile.passed or wb is None:
        raise ValueError("only a passing calibration with a white-balance measurement can become the baseline")
    return Baseline(round(profile.backlight_intensity, 2), [float(v) for v in wb.measured["gray_bgr"]],
                    float(profile.pixels_per_mm))


def save_baseline(root: Path, machine: str, base: Baseline) -> Path:
    """Store what a healthy machine measures: later sessions' drift is measured against it."""
    path = baseline_path(root, machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, asdict(base))
    return path


def todays_profile(root: Path, machine: str) -> Profile | None:
    path = profile_dir(root, machine) / date.today().isoformat() / "profile.json"
    return Profile.load(path) if path.exists() else None


def session_meta(profile: Profile, steps: list[StepResult], base: Baseline | None, cfg: Config) -> SessionMeta:
    now = datetime.now().astimezone().isoformat(timespec="seconds")
    return SessionMeta(
        session_id=f"{profile.date}_cal", timestamp_start=now,
        white_balance_matrix=profile.white_balance_matrix,
        reference_backlight_intensity=round(profile.backlight_intensity, 1),
        reference_check_passed=profile.passed, pixels_per_mm=profile.pixels_per_mm,
        pair_interval_ms=cfg.lights.pair_interval_ms,
        notes="; ".join(f"{s.name}: {s.status}" for s in steps),
    )


def apply(cfg: Config, profile: Profile) -> Config:
    """The run's config with the profile's measured valve latencies.

    The scale is only checked (a passing profile has the configured one); a
    camera that loads reference frames gets today's, unless its config names others.
    """
    cfg = replace(cfg, ejection=replace(cfg.ejection, opening_latency_ms=dict(profile.opening_latency_ms)))
    if profile.reference_dir:
        cfg = replace(cfg, camera=cfg.camera.with_reference_dir(profile.reference_dir))
    return cfg


def interactive_ask(text: str) -> None:
    if not sys.stdin.isatty():
        raise RuntimeError("calibrate needs a terminal for its prompts; use --yes for a non-interactive run")
    input(f"  > {text} ")


class CalibrationRefused(RuntimeError):
    """`run` without a passing calibration of the day, and no override."""


def run_checklist(cfg: Config, rig: Rig, model: Model, out: TextIO, interactive: bool, warmup_s: float
                ) -> tuple[Profile, dict[str, np.ndarray], Baseline | None]:
    checklist = Checklist(cfg, rig, out, interactive_ask if interactive else None)
    profile, refs = checklist.run(model, warmup_s)
    verdict = "PASSED" if profile.passed else "FAILED"
    skipped = sum(r.status == "skip" and r.name not in OPTIONAL_STEPS for r in checklist.results)
    extra = f", {skipped} required steps skipped" if skipped else ""
    checklist.say(f"calibration {verdict} ({sum(r.status == 'warn' for r in checklist.results)} warnings{extra})")
    return profile, refs, rig.baseline()


def for_run(cfg: Config, model: Model, out: TextIO, uncalibrated: bool,
            rig: Rig | None = None) -> tuple[Config, dict[str, Any]]:
    """The config a run sorts with, after today's calibration; and what to log about it.

    rig: a machine that calibrates itself now, without prompts (the composition
    root hands in the simulated machine's rig); a replayed session brings its
    own references and scale; a real machine needs a passing profile written by
    `sorterd calibrate` today.
    """
    if cfg.camera.type == "replay":
        return cfg, {"calibration": "replay: the session's own references and scale"}
    if rig is not None:
        profile, _, _ = run_checklist(cfg, rig, model, out, interactive=False,
                                    warmup_s=cfg.calibration.warmup_s)
    else:
        profile = todays_profile(Path(cfg.calibration.dir), cfg.machine.name)  # type: ignore[assignment]
    if profile is None or not profile.passed:
        why = ("no calibration of today" if profile is None
               else "today's calibration failed: " + "; ".join(s.name for s in profile.steps if s.status == "fail"))
        if uncalibrated or not cfg.calibration.required:
            print(f"sorterd: WARNING sorting without a passing calibration ({why}) -- operator override",
                  file=out)
            return cfg, {"calibration": f"OVERRIDDEN: {why}"}
        raise CalibrationRefused(f"{why}: run `sorterd calibrate`, or `sorterd run --uncalibrated` to sort "
                                 "anyway (logged in the batch)")
    return apply(cfg, profile), {"calibration": profile.as_json()}
