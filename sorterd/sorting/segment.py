"""ROI segmentation: find every object in a backlit/toplit frame pair.

Each frame is compared with the empty-channel reference of its own lighting
mode (background-referenced).  Objects are found in both frames separately,
then paired across the frames in channel order (stones cannot overtake on a
single-file channel), which gives each object's position, size and speed
from its displacement over the pair interval.

Touching stones form one connected region.  A region whose shape is not that
of one rough stone (low solidity, a deep notch between two lobes, or too
long) is reported as a *cluster* and is never classified as a stone.

Runs in a worker thread: OpenCV releases the GIL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from sorterd.data.crops import cut_window

DIFF_THRESHOLD = 18  # DN; sensor noise of a frame-minus-reference is ~3 DN
MIN_AREA_PX = 12  # below this a region is noise or dust, not an object
MASK_PX_PER_MM = 14.0  # a finer frame is first masked on a coarse grid of about this scale (70 px/mm: every 5th pixel)
CLUSTER_SOLIDITY = 0.86  # single rough stones are >= ~0.9 (see sim.appearance)
CLUSTER_NOTCH = 0.12  # convexity-defect depth / sqrt(area) that marks two lobes
# Extra cost of a pair slower than geometry.speed_min_mm_s: a tie-breaker only, well
# below the cost of leaving a blob unpaired (1.0) so that a still stone still pairs.
SLOW_PAIR_COST = 0.1


@dataclass(frozen=True)
class Blob:
    """One connected region in one frame (pixel units): what pairing needs."""

    cx: float
    cy: float
    area: float
    bbox: tuple[int, int, int, int]  # x, y, w, h
    touches_border: bool
    contour: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class Shape:
    """A region's shape, measured only for objects that will be decided."""

    size_px: float  # shorter side of the minimum-area rectangle (sieve size)
    length_px: float  # longer side
    solidity: float
    notch: float  # deepest convexity defect / sqrt(area)

    @property
    def is_cluster_shape(self) -> bool:
        return self.solidity < CLUSTER_SOLIDITY or self.notch > CLUSTER_NOTCH


@dataclass(frozen=True)
class Observation:
    """One object seen in both frames of a pair."""

    backlit: Blob
    toplit: Blob
    shapes: tuple[Shape, Shape]  # backlit, toplit
    x_mm: float  # centroid at the toplit instant, along the channel
    y_mm: float
    t_ns: int  # the toplit frame's exposure instant
    speed_mm_s: float
    size_mm: float
    length_mm: float
    cluster: bool
    reason: str = ""  # why it is a cluster / unusable, for the log
    # False when the pair cannot measure a speed (its two exposures at one instant):
    # speed_mm_s is then 0.0 and means nothing; the sorter gives it no jet.
    speed_known: bool = True
    look: np.ndarray | None = field(default=None, repr=False, compare=False)  # `look(toplit, toplit blob)`


@dataclass(frozen=True)
class Seen:
    """A paired object before its shape is measured: what `known` is asked about."""

    x_mm: float
    y_mm: float
    speed_mm_s: float | None  # None: the pair could not measure it
    area_mm2: float
    patch: np.ndarray | None = field(default=None, repr=False, compare=False)  # `look(toplit, blob)`


PATCH_PX = 24


def look(frame: np.ndarray, blob: Blob) -> np.ndarray:
    """The fine detail of the blob's box (grey, high-passed, zero-mean, unit-norm,
    PATCH_PX²): what tells a stone still lying where it was (the same texture and
    facets under fresh sensor noise) from another of like size and outline put down
    on the same spot.  Two looks' dot product is their normalised correlation."""
    x, y, w, h = blob.bbox
    box = frame[y:y + h, x:x + w]
    grey = cv2.cvtColor(box, cv2.COLOR_BGR2GRAY) if box.ndim == 3 else box
    small = cv2.resize(grey, (PATCH_PX, PATCH_PX), interpolation=cv2.INTER_AREA).astype(np.float32)
    # The silhouette (what every round stone shares) is the low frequencies: take it away.
    small = (small - cv2.GaussianBlur(small, (0, 0), 1.0)).ravel()
    small -= small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 0 else small


@dataclass(frozen=True)
class Segmentation:
    observations: list[Observation]
    unpaired: int  # regions seen in only one frame (entering/leaving the view)
    touching_border: int = 0  # paired, but cut by the frame's edge: not measured, not decided
    already_decided: int = 0  # paired, but `known` said it was decided from an earlier capture


def difference_mask(frame: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Pixels that differ from the empty channel in any colour channel (uint8, 0 = same).

    A transparent stone on the backlight differs most along its rim; taking
    only *external* contours afterwards fills whatever the rim encloses.  No
    morphology: on the simulated stones 97 % of a stone's pixels clear the
    threshold, and a full-frame closing cost a fifth of the segmentation time.
    """
    diff = cv2.absdiff(frame, reference)
    _, mask = cv2.threshold(diff, DIFF_THRESHOLD, 255, cv2.THRESH_BINARY)
    if mask.ndim == 3:
        # "Any channel differs": the gray of a 0/255 image is non-zero exactly
        # where some channel is 255 (every weight is > 0), and two fused
        # OpenCV passes are ~4x faster than splitting channels for a max.
        mask = cv2.cvtColor(mask, cv2.COLOR_BGR2GRAY)
    return mask


def find_blobs(frame: np.ndarray, reference: np.ndarray, step: int = 1) -> list[Blob]:
    """Every region that differs from the reference, at full resolution.

    step > 1 (a large frame at a fine scale, `mask_step`): the difference mask is first
    taken on every step-th pixel, and only the boxes around what it finds (with a margin
    of two coarse pixels) are masked again at full resolution for the contours: on an
    800x800 ROI at 70 px/mm the stones cover a few % of the frame, so the full-resolution
    work shrinks to their boxes.  A region smaller than a coarse pixel is missed, far
    below the smallest stone (1 mm = 70 px across at 70 px/mm, 14 coarse pixels at step 5).
    """
    h, w = frame.shape[:2]
    if step <= 1:
        return _blobs_in(frame, reference, (0, 0, w, h), w, h)
    small = cv2.resize(frame, (w // step, h // step), interpolation=cv2.INTER_NEAREST)
    coarse, _ = cv2.findContours(difference_mask(small, _coarse_reference(reference, step)),
                                 cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    margin = 2
    boxes = []
    for c in coarse:
        x, y, bw, bh = cv2.boundingRect(c)
        boxes.append((max(0, (x - margin) * step), max(0, (y - margin) * step),
                      min(w, (x + bw + margin) * step), min(h, (y + bh + margin) * step)))
    blobs = [b for box in _merge_boxes(boxes) for b in _blobs_in(frame, reference, box, w, h)]
    return sorted(blobs, key=lambda b: b.cx)


def mask_step(pixels_per_mm: float) -> int:
    """The coarse mask's pixel step for this scale: about MASK_PX_PER_MM coarse pixels per mm,
    the smallest stone (1 mm) still 14 coarse pixels across; 1 at the simulator's 20 px/mm."""
    return max(1, int(pixels_per_mm // MASK_PX_PER_MM))


def _blobs_in(frame: np.ndarray, reference: np.ndarray, box: tuple[int, int, int, int],
              width: int, height: int) -> list[Blob]:
    x0, y0, x1, y1 = box
    mask = difference_mask(frame[y0:y1, x0:x1], reference[y0:y1, x0:x1])
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0))
    blobs = [_blob(c, width, height) for c in contours if cv2.contourArea(c) >= MIN_AREA_PX]
    return sorted(blobs, key=lambda b: b.cx)


def _merge_boxes(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Overlapping boxes merged (x0, y0, x1, y1): a region is contoured in one box only."""
    merged: list[tuple[int, int, int, int]] = []
    for box in sorted(boxes):
        for i, m in enumerate(merged):
            if box[0] < m[2] and m[0] < box[2] and box[1] < m[3] and m[1] < box[3]:
                merged[i] = (min(box[0], m[0]), min(box[1], m[1]), max(box[2], m[2]), max(box[3], m[3]))
                break
        else:
            merged.append(box)
    # A merge can make a box overlap another one merged earlier: repeat until none does.
    return merged if len(merged) == len(boxes) else _merge_boxes(merged)


_COARSE_REFS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _coarse_reference(reference: np.ndarray, step: int) -> np.ndarray:
    """The reference subsampled like the frames, kept per reference (it changes only at
    calibration); the cache holds the reference itself, so an id is never reused stale."""
    key = (id(reference), step)
    got = _COARSE_REFS.get(key)
    if got is None or got[0] is not reference:
        h, w = reference.shape[:2]
        got = (reference, cv2.resize(reference, (w // step, h // step), interpolation=cv2.INTER_NEAREST))
        if len(_COARSE_REFS) > 8:
            _COARSE_REFS.clear()
        _COARSE_REFS[key] = got
    return got[1]


def _blob(contour: np.ndarray, width: int, height: int) -> Blob:
    m = cv2.moments(contour)
    area = max(m["m00"], 1e-9)
    x, y, bw, bh = cv2.boundingRect(contour)
    return Blob(
        cx=m["m10"] / area, cy=m["m01"] / area, area=area, bbox=(x, y, bw, bh),
        touches_border=x <= 0 or y <= 0 or x + bw >= width or y + bh >= height, contour=contour,
    )


def blob_shape(blob: Blob) -> Shape:
    contour = blob.contour
    (_, _), (rw, rh), _ = cv2.minAreaRect(contour)
    hull_idx = cv2.convexHull(contour, returnPoints=False)
    hull_area = max(cv2.contourArea(contour[hull_idx.ravel()]), 1e-9)
    solidity = min(1.0, blob.area / hull_area)
    # A clearly convex region needs no notch search (the costliest measurement).
    notch = _deepest_notch(contour, hull_idx, blob.area) if solidity < 0.97 else 0.0
    return Shape(size_px=min(rw, rh) + 1.0, length_px=max(rw, rh) + 1.0, solidity=solidity, notch=notch)


def _deepest_notch(contour: np.ndarray, hull_idx: np.ndarray, area: float) -> float:
    if len(contour) < 5 or len(hull_idx) < 3:
        return 0.0
    try:
        defects = cv2.convexityDefects(contour, hull_idx)
    except cv2.error:  # non-monotonic hull indices on degenerate contours
        return 0.0
    if defects is None:
        return 0.0
    return float(defects.reshape(-1, 4)[:, 3].max()) / 256.0 / math.sqrt(area)


@dataclass(frozen=True)
class PairingLimits:
    pixels_per_mm: float
    dt_s: float
    speed_min_mm_s: float
    speed_max_mm_s: float
    max_single_length_mm: float

    @classmethod
    def from_config(cls, cfg: Any, pixels_per_mm: float, pair_interval_ms: float) -> PairingLimits:
        """The limits a run's config sets, for a camera of this scale and pair interval."""
        return cls(pixels_per_mm, pair_interval_ms / 1e3, cfg.geometry.speed_min_mm_s, cfg.geometry.speed_max_mm_s,
                   cfg.decision.max_single_length_mm)


def pair_blobs(back: list[Blob], top: list[Blob], lim: PairingLimits,
               dt_s: float | None = None) -> list[tuple[int, int]]:
    """Order-preserving alignment of backlit and toplit blobs (dynamic programming).

    Stones cannot overtake on the channel, so the k-th stone in one frame is the
    k-th in the other, apart from stones entering or leaving the view; the
    alignment chooses which blobs stay unmatched.  Plain lists: n and m are a
    handful, and numpy's per-call overhead would dominate.
    """
    n, m = len(back), len(top)
    skip = 1.0
    cost = [[j * skip for j in range(m + 1)]] + [[i * skip] + [0.0] * m for i in range(1, n + 1)]
    move = [[3] * (m + 1)] + [[2] + [0] * m for _ in range(n)]  # 1 = match, 2 = skip back, 3 = skip top
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            c_match = cost[i - 1][j - 1] + _match_cost(back[i - 1], top[j - 1], lim, dt_s)
            c_b, c_t = cost[i - 1][j] + skip, cost[i][j - 1] + skip
            best = min(c_match, c_b, c_t)
            cost[i][j] = best
            move[i][j] = 1 if best == c_match else (2 if best == c_b else 3)
    return _backtrack(move, n, m)


def _backtrack(move: list[list[int]], i: int, j: int) -> list[tuple[int, int]]:
    pairs = []
    while i > 0 or j > 0:
        step = move[i][j]
        if step == 1:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif step == 2:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def _match_cost(b: Blob, t: Blob, lim: PairingLimits, dt_s: float | None = None) -> float:
    """0..~1 for a plausible pair, inf when physically impossible.

    Any speed from rest to `speed_max_mm_s` pairs (a stone placed by hand, one
    resting when the camera fired, a slow feeder: §1.2); a stone cannot go
    backwards, but a resting one's centroid jitters by a fraction of a pixel,
    hence the tolerance below zero.  A displacement slower than the channel's
    `speed_min_mm_s` costs a little more, so that when two alignments are both
    possible the one at the channel's own speeds wins.
    """
    dt = lim.dt_s if dt_s is None else dt_s
    ppm = lim.pixels_per_mm
    dx_mm = (t.cx - b.cx) / ppm
    tol_mm = 0.5
    if not -tol_mm <= dx_mm <= max(lim.speed_max_mm_s * dt, 0.0) + tol_mm:
        return math.inf
    dy_mm = abs(t.cy - b.cy) / ppm
    if dy_mm > 1.0:
        return math.inf
    area_ratio = abs(math.log(max(t.area, 1.0) / max(b.area, 1.0)))
    if area_ratio > math.log(2.5):
        return math.inf
    slow = SLOW_PAIR_COST if dx_mm < lim.speed_min_mm_s * dt - tol_mm else 0.0
    return 0.5 * area_ratio + 0.3 * dy_mm + slow


def segment_pair(
    backlit: np.ndarray,
    toplit: np.ndarray,
    ref_backlit: np.ndarray,
    ref_toplit: np.ndarray,
    t_toplit_ns: int,
    lim: PairingLimits,
    known: Callable[[Seen], bool] | None = None,
    t_backlit_ns: int | None = None,
) -> Segmentation:
    """Every object fully in view in both frames.

    known(seen) marks objects already decided (still in view from an earlier
    capture); they are skipped before their shape is measured.

    Speed: the pair's displacement over the pair's own interval, taken from its
    exposure instants when `t_backlit_ns` is given (the live camera's stamps, a
    replay's recorded frames.jsonl times), else the nominal `lim.dt_s`.  Two
    exposures at one instant measure no speed: the observation says so
    (`speed_known` False) rather than invent one.
    """
    dt_s = lim.dt_s if t_backlit_ns is None else (t_toplit_ns - t_backlit_ns) / 1e9
    step = mask_step(lim.pixels_per_mm)
    back = find_blobs(backlit, ref_backlit, step)
    top = find_blobs(toplit, ref_toplit, step)
    pairs = pair_blobs(back, top, lim, dt_s)
    ppm = lim.pixels_per_mm
    obs, border, decided = [], 0, 0
    for i, j in pairs:
        b, t = back[i], top[j]
        if b.touches_border or t.touches_border:
            border += 1
            continue
        speed = (t.cx - b.cx) / ppm / dt_s if dt_s > 0 else None
        patch = look(toplit, t)
        if known is not None and known(Seen(t.cx / ppm, t.cy / ppm, speed, t.area / ppm**2, patch)):
            decided += 1
            continue
        obs.append(replace(_observe(b, t, t_toplit_ns, lim, speed), look=patch))
    return Segmentation(obs, unpaired=len(back) + len(top) - 2 * len(pairs), touching_border=border,
                        already_decided=decided)


def _observe(b: Blob, t: Blob, t_ns: int, lim: PairingLimits, speed_mm_s: float | None) -> Observation:
    ppm = lim.pixels_per_mm
    sb, st = blob_shape(b), blob_shape(t)
    size_mm = (sb.size_px + st.size_px) / 2.0 / ppm
    length_mm = max(sb.length_px, st.length_px) / ppm
    reason = ""
    # Touching stones touch in both exposures; a notch in only one frame's mask
    # is a mask artefact (a faint rim of a tiny clear stone on the backlight).
    if sb.is_cluster_shape and st.is_cluster_shape:
        reason = "cluster: touching stones (shape is not one stone)"
    elif length_mm > lim.max_single_length_mm:
        reason = f"cluster: {length_mm:.1f} mm long, longer than any single stone"
    return Observation(
        backlit=b, toplit=t, shapes=(sb, st), x_mm=t.cx / ppm, y_mm=t.cy / ppm, t_ns=t_ns,
        speed_mm_s=0.0 if speed_mm_s is None else speed_mm_s, size_mm=size_mm, length_mm=length_mm,
        cluster=bool(reason), reason=reason, speed_known=speed_mm_s is not None,
    )


def crop_halves(
    backlit: np.ndarray, toplit: np.ndarray, obs: Observation, crop_px: int, out_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The object's backlit and toplit crops (BGR, out_size², uint8).

    Each half is centred on the object's own position in its own frame (the
    stone moved between the exposures).  The window is `sorterd.data.crops.cut_window`,
    the one way a model input is made from a frame (the trainer's crops-only path,
    `fit_crop`, lands on the same scale).
    """
    return (cut_window(backlit, obs.backlit.cx, obs.backlit.cy, crop_px, out_size),
            cut_window(toplit, obs.toplit.cx, obs.toplit.cy, crop_px, out_size))


def crop_pair(
    backlit: np.ndarray, toplit: np.ndarray, obs: Observation, crop_px: int, out_size: int
) -> np.ndarray:
    """The 6-channel model input as an image: backlit RGB then toplit RGB, HWC uint8."""
    b, t = crop_halves(backlit, toplit, obs, crop_px, out_size)
    return np.concatenate([b[:, :, ::-1], t[:, :, ::-1]], axis=2)
