"""One way to make a model input, shared by the sorter and the trainer.

The model sees a square window of `crop_mm` (its manifest's) around the stone,
at `size` px, backlit and toplit halves alike (§5.1, §7.1).  There are two
ways to get there, and both end at the same physical scale,
``size / crop_mm`` px per mm:

* `cut_window` -- from a whole frame (the sorter's pipeline, `sorterd sim
  generate`, the calibration checklist): a sub-pixel window centred on the
  stone's centroid, the frame's own pixels beyond its edge replicated.
* `fit_crop` -- from a crop someone else cut (`images/processed/` of a dataset
  made by a hand-cropping tool or another capture program: tight boxes of any
  size and aspect): scaled by the one factor that takes its `pixels_per_mm` to
  the model's, centred, padded with its own background (the colour of its
  border, not black unless the background is black) and never stretched.  A
  crop larger than the window is cut to it, as the sorter's window would cut.

Downstream tools (domain randomisation, input statistics for an
out-of-distribution gate) get the same input by calling these and nothing else.
"""

from __future__ import annotations

import cv2
import numpy as np


def cut_window(frame: np.ndarray, cx: float, cy: float, crop_px: int, out_size: int) -> np.ndarray:
    """The crop_px window centred on (cx, cy) of `frame`, at out_size² (HWC, the frame's dtype).

    Sub-pixel centred; outside the frame is filled by edge replication.  At
    crop_px == out_size (the shipped models: 6.4 mm at 20 px/mm, 128 px) the
    pixels are the frame's own, interpolated only by the sub-pixel shift.
    """
    if crop_px == out_size:
        return np.asarray(cv2.getRectSubPix(frame, (crop_px, crop_px), (cx, cy)))
    scale = out_size / crop_px
    # Affine map taking the window's centre (cx, cy) to the output's centre.
    mat = np.array([[scale, 0.0, out_size / 2.0 - scale * cx], [0.0, scale, out_size / 2.0 - scale * cy]],
                   dtype=np.float64)
    return np.asarray(cv2.warpAffine(frame, mat, (out_size, out_size), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REPLICATE))


def border_colour(image: np.ndarray) -> tuple[float, ...]:
    """The crop's background: the per-channel median of its outermost pixels.

    A crop is cut around one stone, so its rim is the empty channel (the
    backlight panel, the grey card) wherever the stone does not touch it; the
    median ignores the part where it does.
    """
    img = image if image.ndim == 3 else image[:, :, None]
    rim = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]], axis=0)
    return tuple(float(v) for v in np.median(rim.reshape(-1, img.shape[2]), axis=0))


def fit_crop(image: np.ndarray, pixels_per_mm: float | None, crop_mm: float, out_size: int) -> np.ndarray:
    """A crop of any size and aspect as the model input (out_size², HWC, the crop's dtype).

    pixels_per_mm: the crop's own scale (its session's, §2.4).  It is scaled
    by out_size / (crop_mm · pixels_per_mm), the same for both axes, so a
    3 mm stone is as many pixels wide in the output whatever the camera and
    the crop's shape; then centred on a window of the crop's border colour.
    None (scale unknown): the whole crop is fitted into the window, aspect
    kept -- the stone's size is then not physical, its shape still is.
    """
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"an empty crop ({w}x{h} px): a crop needs at least one pixel")
    if not out_size >= 1:
        raise ValueError(f"out_size = {out_size!r}: must be at least 1 px")
    if pixels_per_mm is not None and not pixels_per_mm > 0:
        raise ValueError(f"pixels_per_mm = {pixels_per_mm!r}: must be > 0 (or None when unknown)")
    if not crop_mm > 0:
        raise ValueError(f"crop_mm = {crop_mm!r}: must be > 0")
    scale = out_size / (crop_mm * pixels_per_mm) if pixels_per_mm is not None else out_size / max(h, w)
    if (h, w) == (out_size, out_size) and abs(scale - 1.0) < 1e-9:
        return image  # already the model's window (sim generate at the model's crop and scale)
    # Centre to centre: output pixel (u, v) samples the crop at ((u - out/2) / s + w/2, ...).
    mat = np.array([[scale, 0.0, out_size / 2.0 - scale * w / 2.0],
                    [0.0, scale, out_size / 2.0 - scale * h / 2.0]], dtype=np.float64)
    src = image
    if scale < 1.0:
        # Shrinking: average first (INTER_AREA), as a lens at the lower scale would, then place.
        small = (max(1, round(w * scale)), max(1, round(h * scale)))
        src = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
        sx, sy = small[0] / w, small[1] / h
        mat = np.array([[scale / sx, 0.0, out_size / 2.0 - scale * w / 2.0],
                        [0.0, scale / sy, out_size / 2.0 - scale * h / 2.0]], dtype=np.float64)
    fill = border_colour(image)
    out = cv2.warpAffine(src, mat, (out_size, out_size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=fill + (0.0,) * (4 - len(fill)))
    return np.asarray(out).reshape((out_size, out_size) + image.shape[2:])


def crop_px(crop_mm: float, pixels_per_mm: float) -> int:
    """The side in frame pixels of a crop_mm window at this scale (at least 8 px): what the
    sorter cuts from its frames, and the trainer from raw frames (`sorterd.data.samples`)."""
    return max(8, int(round(crop_mm * pixels_per_mm)))
