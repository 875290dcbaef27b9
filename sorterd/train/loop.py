"""Dataset-agnostic training core for the dual-head MobileNetV3-Small.

Inputs are plain arrays (`TrainData`); loading a dataset from the §7.1 layout
and the command line live elsewhere.  What this module does:

* augmentation on whole batches in torch, only the §4.1/§4.2 transforms
  (see `augment_batch`);
* inverse-frequency sampling over the 9 colour x clarity classes (§1.3), and
  optionally validating with the prior correction that turns the sampler's
  equal class mix back into the real one (`prior_correction`);
* the §9.4 schedule, adapted to training from scratch: heads only for
  ``epochs_heads`` epochs, then everything end to end with per-step cosine decay,
  early stopping on validation loss, best-by-validation-loss model kept;
  optionally judged on a moving average of the weights (``ema_epochs``);
* inference helpers for evaluation: `predict_logits`, temperature scaling
  (`fit_temperature`) and `expected_calibration_error` (numpy, from
  `sorterd.train.temperature`).

Pixel convention (shared with the exported manifest): ``x / 255`` then
``(x - mean) / std`` per channel, channels backlit R,G,B then toplit R,G,B.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sorterd.train.mobilenet import MobileNetV3Small
from sorterd.train.temperature import (  # noqa: F401  (re-exported: the trainer's public API)
    T_MAX,
    T_MIN,
    expected_calibration_error,
    fit_temperature,
    nll,
)

N_CHANNELS = 6
N_COLOR = 3
N_CLARITY = 3
N_COMBINED = N_COLOR * N_CLARITY
PIXEL_SCALE = 1.0 / 255.0
MIN_STD = 1e-3

Progress = Callable[[str], None]


@dataclass(frozen=True)
class StepEvent:
    """One training batch done: what a progress bar needs (see `train(on_step=...)`)."""

    epoch: int
    total_epochs: int
    phase: str  # "heads" or "full"
    batch: int
    n_batches: int
    loss: float  # running mean over the epoch so far
    color_acc: float
    clarity_acc: float


StepHook = Callable[[StepEvent], None]


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """Labelled stones as arrays.

    x: uint8, N x 6 x H x W (square; 128 x 128 in production), channels backlit
        R,G,B then toplit R,G,B.
    color: int64 N, 0=blue 1=light 2=inky.
    clarity: int64 N, 0=transparent 1=translucent 2=opaque.
    """

    x: np.ndarray
    color: np.ndarray
    clarity: np.ndarray

    def __post_init__(self) -> None:
        self.color = _check_labels("color", self.color, N_COLOR)
        self.clarity = _check_labels("clarity", self.clarity, N_CLARITY)
        _check_images(self.x)
        n = self.x.shape[0]
        if len(self.color) != n or len(self.clarity) != n:
            raise ValueError(
                f"TrainData: x has {n} samples but color has {len(self.color)} "
                f"and clarity has {len(self.clarity)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def combined(self) -> np.ndarray:
        """Combined class 0..8 = color * 3 + clarity."""
        return combined_class(self.color, self.clarity)


def _check_images(x: np.ndarray) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        raise ValueError(f"TrainData.x: expected a uint8 numpy array, got {_describe(x)}")
    if x.ndim != 4 or x.shape[1] != N_CHANNELS or x.shape[2] != x.shape[3]:
        raise ValueError(
            f"TrainData.x: expected shape N x {N_CHANNELS} x S x S, got {tuple(x.shape)}"
        )


def _check_labels(name: str, labels: np.ndarray, n_classes: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"TrainData.{name}: expected a 1-D integer array, got {_describe(arr)}")
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(
            f"TrainData.{name}: labels must be in 0..{n_classes - 1}, "
            f"got min {arr.min()} max {arr.max()}"
        )
    return arr.astype(np.int64, copy=False)


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {tuple(a.shape)}"
    return type(a).__name__


def combined_class(color: np.ndarray, clarity: np.ndarray) -> np.ndarray:
    """The 9-way §1.3 class index, color * 3 + clarity."""
    return np.asarray(color, dtype=np.int64) * N_CLARITY + np.asarray(clarity, dtype=np.int64)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AugmentParams:
    """Probabilities and ranges of the §4.1/§4.2 augmentations (albumentations §4.4 values).

    Geometric transforms use one matrix per sample for all 6 channels, so the
    backlit and toplit frames stay registered.  Nothing here changes hue or
    saturation: brightness is a gain and contrast acts on luminance only, both
    preserving each pixel's R:G:B ratios.
    """

    p_affine: float = 0.8  # arbitrary rotation + scale + shift (90° steps and flips always)
    max_rotation_deg: float = 180.0
    scale_range: tuple[float, float] = (0.8, 1.2)
    max_shift: float = 0.10  # fraction of the image size
    p_brightness_contrast: float = 0.3
    max_brightness: float = 0.05
    max_contrast: float = 0.05
    p_noise: float = 0.3
    noise_sigma: tuple[float, float] = (0.01, 0.03)  # in 0..1 pixel units
    p_erase: float = 0.1
    erase_area: tuple[float, float] = (0.02, 0.05)

    def __post_init__(self) -> None:
        for name in ("p_affine", "p_brightness_contrast", "p_noise", "p_erase"):
            _check_range(f"AugmentParams.{name}", getattr(self, name), 0.0, 1.0)
        _check_range("AugmentParams.max_rotation_deg", self.max_rotation_deg, 0.0, 180.0)
        _check_range("AugmentParams.max_shift", self.max_shift, 0.0, 0.10)
        # §4.2: brightness/contrast jitter ±5 % at most.
        _check_range("AugmentParams.max_brightness", self.max_brightness, 0.0, 0.05)
        _check_range("AugmentParams.max_contrast", self.max_contrast, 0.0, 0.05)
        _check_pair("AugmentParams.scale_range", self.scale_range, 0.8, 1.2)
        _check_pair("AugmentParams.noise_sigma", self.noise_sigma, 0.0, 0.03)
        _check_pair("AugmentParams.erase_area", self.erase_area, 0.0, 0.05)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (bounds checked on construction).

    mean/std: 6 per-channel values in 0..1 pixel units; None = computed from the
    training images.  threads: torch intra-op threads while training.
    bn_recalibration: before each validation, recompute BatchNorm statistics
    over this many (un-augmented) training images; 0 = off.  Training from
    scratch moves the weights faster than the running averages follow, and
    without this the eval-mode model can sit at chance while train-mode
    accuracy is high.
    ema_epochs: keep an exponential moving average of the weights over about
    this many epochs (0 = off); validation, early stopping and the returned
    model then use the averaged weights.  At a learning rate that trains a
    model from scratch in minutes the weights jitter from step to step, so
    validation accuracy swings by a few % between epochs; the average sits in
    the middle of that jitter and generalises better.
    stone_stats: the model's head also gets the stone's mean colour against
    its background (`sorterd.train.mobilenet.StoneStats`).
    stats_path / backbone_dropout: those statistics also reach the logits linearly, and the
    backbone's features of this share of training samples are dropped
    (`sorterd.train.mobilenet.MobileNetV3Small`).
    prior_correction: validate (and pick the best epoch) with the logits
    shifted by `prior_correction(train)`, i.e. for the training lots' real
    class mix rather than the sampler's equal one; the shift is returned in
    `TrainResult.prior_correction` for the exporter to fold into the heads.
    """

    epochs_heads: int = 2
    epochs_full: int = 10
    batch_size: int = 64
    lr_heads: float = 1e-3
    lr_backbone: float = 3e-4
    weight_decay: float = 1e-2
    patience: int = 4
    seed: int = 0
    width_mult: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    threads: int = 2
    augment: bool = True
    bn_recalibration: int = 1024
    ema_epochs: float = 0.0
    stone_stats: bool = False
    stats_path: bool = False
    backbone_dropout: float = 0.0
    prior_correction: bool = False
    augment_params: AugmentParams = field(default_factory=AugmentParams)

    def __post_init__(self) -> None:
        _check_int("TrainConfig.epochs_heads", self.epochs_heads, 0, 1000)
        _check_int("TrainConfig.epochs_full", self.epochs_full, 0, 1000)
        _check_int("TrainConfig.batch_size", self.batch_size, 2, 4096)
        _check_int("TrainConfig.patience", self.patience, 1, 1000)
        _check_int("TrainConfig.threads", self.threads, 1, 256)
        _check_int("TrainConfig.seed", self.seed, 0, 2**31 - 1)
        _check_int("TrainConfig.bn_recalibration", self.bn_recalibration, 0, 10**7)
        _check_range("TrainConfig.lr_heads", self.lr_heads, 1e-7, 1.0)
        _check_range("TrainConfig.lr_backbone", self.lr_backbone, 1e-7, 1.0)
        _check_range("TrainConfig.weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("TrainConfig.width_mult", self.width_mult, 0.25, 1.5)
        _check_range("TrainConfig.ema_epochs", self.ema_epochs, 0.0, 100.0)
        _check_range("TrainConfig.backbone_dropout", self.backbone_dropout, 0.0, 0.9)
        if self.backbone_dropout > 0 and not self.stone_stats:
            raise ValueError("TrainConfig: backbone_dropout > 0 needs stone_stats=True (a dropped sample would have "
                             "nothing left to sort from)")
        if self.stats_path and not self.stone_stats:
            raise ValueError("TrainConfig: stats_path=True needs stone_stats=True (the path carries the statistics)")
        if self.epochs_heads + self.epochs_full < 1:
            raise ValueError("TrainConfig: epochs_heads + epochs_full must be >= 1, got 0")
        _check_channel_values("TrainConfig.mean", self.mean, lo=0.0, hi=1.0)
        _check_channel_values("TrainConfig.std", self.std, lo=MIN_STD, hi=1.0)


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r}: must be an integer in {lo}..{hi}")


def _check_range(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r}: must be a number in {lo}..{hi}")


def _check_pair(name: str, value: tuple[float, float], lo: float, hi: float) -> None:
    if len(value) != 2 or not lo <= value[0] <= value[1] <= hi:
        raise ValueError(f"{name}={value!r}: must be (low, high) with {lo} <= low <= high <= {hi}")


def _check_channel_values(
    name: str, value: Sequence[float] | None, *, lo: float, hi: float
) -> None:
    if value is None:
        return
    if len(value) != N_CHANNELS or not all(lo <= float(v) <= hi for v in value):
        raise ValueError(
            f"{name}={value!r}: must be {N_CHANNELS} numbers in {lo}..{hi} "
            "(0..1 pixel units, backlit RGB then toplit RGB)"
        )


# --------------------------------------------------------------------------- preprocessing


def channel_stats(x: np.ndarray, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images N x C x H x W, in 0..1 units."""
    total = np.zeros(x.shape[1], dtype=np.float64)
    total_sq = np.zeros(x.shape[1], dtype=np.float64)
    for start in range(0, x.shape[0], chunk):
        block = x[start : start + chunk].astype(np.float64) * PIXEL_SCALE
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), np.maximum(std, MIN_STD).tolist()


def to_unit(x_uint8: np.ndarray | Tensor) -> Tensor:
    """uint8 pixels -> float32 in 0..1."""
    if isinstance(x_uint8, np.ndarray):
        x_uint8 = torch.from_numpy(np.ascontiguousarray(x_uint8))
    return x_uint8.to(torch.float32) * PIXEL_SCALE


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel, x in 0..1 units."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- augmentation


def augment_batch(x: Tensor, gen: torch.Generator, params: AugmentParams | None = None) -> Tensor:
    """Augment a batch N x 6 x H x W of 0..1 images; returns a new tensor in 0..1.

    Order as §4.4: geometry, brightness/contrast, noise, small erasing.
    """
    p = params or AugmentParams()
    out = warp(x, random_affine(x.shape[0], gen, p))
    out = brightness_contrast(out, gen, p)
    out = gaussian_noise(out, gen, p)
    out = random_erase(out, gen, p)
    return out.clamp_(0.0, 1.0)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _chance(n: int, prob: float, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen) < prob


def random_affine(n: int, gen: torch.Generator, p: AugmentParams) -> Tensor:
    """One N x 2 x 3 `affine_grid` matrix per sample (output coords -> input coords).

    Always: a random multiple of 90° and random h/v flips.  With p_affine: an
    arbitrary extra rotation, a scale in scale_range and a shift of up to
    max_shift of the image size.
    """
    use = _chance(n, p.p_affine, gen)
    k90 = torch.randint(0, 4, (n,), generator=gen).to(torch.float32)
    max_rot = math.radians(p.max_rotation_deg)
    angle = k90 * (math.pi / 2) + torch.where(use, _uniform(n, -max_rot, max_rot, gen), 0.0)
    scale = torch.where(use, _uniform(n, *p.scale_range, gen), 1.0)
    # Normalised coordinates span 2 units per image, so a shift of f is 2f units.
    shift = torch.where(use[:, None], _uniform(2 * n, -2 * p.max_shift, 2 * p.max_shift, gen)
                        .view(n, 2), 0.0)
    flip_x = torch.where(_chance(n, 0.5, gen), -1.0, 1.0)
    flip_y = torch.where(_chance(n, 0.5, gen), -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip_x
    theta[:, 0, 1] = -sin * flip_y
    theta[:, 1, 0] = sin * flip_x
    theta[:, 1, 1] = cos * flip_y
    theta[:, :, 2] = shift
    return theta


def border_fill(x: Tensor) -> Tensor:
    """Per-sample, per-channel median of the outermost pixel frame (the background).

    Every other frame pixel is enough for a median and halves the cost.
    """
    frame = torch.cat(
        [x[:, :, 0, ::2], x[:, :, -1, ::2], x[:, :, 1:-1:2, 0], x[:, :, 1:-1:2, -1]], dim=2
    )
    return frame.median(dim=2).values[:, :, None, None]


def warp(x: Tensor, theta: Tensor) -> Tensor:
    """Apply `theta` to all channels of each sample; uncovered area gets the background.

    The backlit background is bright and the toplit one dark, so filling with
    black (the usual default) would paint an opaque-looking rim onto backlit
    frames; we fill with each channel's border median instead.
    """
    fill = border_fill(x)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    warped = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return warped + fill


def brightness_contrast(x: Tensor, gen: torch.Generator, p: AugmentParams) -> Tensor:
    """Per-sample, per-half (backlit/toplit are separate strobes) brightness and contrast.

    Brightness is a gain; contrast stretches each pixel's luminance (mean of
    R,G,B) about the image's mean luminance and rescales R,G,B together, so no
    pixel's hue or saturation changes (§4.3).
    """
    n, _, h, w = x.shape
    halves = x.reshape(n * 2, 3, h, w)
    chosen = torch.nonzero(_chance(n * 2, p.p_brightness_contrast, gen)).flatten()
    if len(chosen) == 0:
        return x
    k = len(chosen)
    gain = _uniform(k, 1 - p.max_brightness, 1 + p.max_brightness, gen).view(k, 1, 1, 1)
    contrast = _uniform(k, 1 - p.max_contrast, 1 + p.max_contrast, gen).view(k, 1, 1, 1)
    sel = halves[chosen]
    lum = sel.mean(dim=1, keepdim=True)
    lum_mean = lum.mean(dim=(2, 3), keepdim=True)
    new_lum = (lum_mean + contrast * (lum - lum_mean)).clamp(min=0.0)
    ratio = torch.where(lum > 1e-4, new_lum / lum.clamp(min=1e-4), 1.0)
    out = halves.clone()
    out[chosen] = sel * ratio * gain
    return out.view_as(x)


def gaussian_noise(x: Tensor, gen: torch.Generator, p: AugmentParams) -> Tensor:
    """Sensor noise with a per-sample sigma in noise_sigma (0..1 pixel units)."""
    chosen = torch.nonzero(_chance(x.shape[0], p.p_noise, gen)).flatten()
    if len(chosen) == 0:
        return x
    sigma = _uniform(len(chosen), *p.noise_sigma, gen).view(-1, 1, 1, 1)
    out = x.clone()
    out[chosen] += sigma * torch.randn((len(chosen), *x.shape[1:]), generator=gen)
    return out


def random_erase(x: Tensor, gen: torch.Generator, p: AugmentParams) -> Tensor:
    """Blacken one small rectangle (dust), the same one in both frames."""
    n, _, h, w = x.shape
    use = _chance(n, p.p_erase, gen)
    if not bool(use.any()):
        return x
    area = _uniform(n, *p.erase_area, gen) * h * w
    aspect = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), gen))
    eh = (area * aspect).sqrt().clamp(1, h)
    ew = (area / aspect).sqrt().clamp(1, w)
    y0 = torch.rand(n, generator=gen) * (h - eh)
    x0 = torch.rand(n, generator=gen) * (w - ew)
    ys = torch.arange(h, dtype=x.dtype).view(1, h, 1)
    xs = torch.arange(w, dtype=x.dtype).view(1, 1, w)
    inside = ((ys >= y0.view(n, 1, 1)) & (ys < (y0 + eh).view(n, 1, 1))
              & (xs >= x0.view(n, 1, 1)) & (xs < (x0 + ew).view(n, 1, 1)))
    mask = (inside & use.view(n, 1, 1)).unsqueeze(1)
    return x.masked_fill(mask, 0.0)


# --------------------------------------------------------------------------- sampling


def prior_correction(color: np.ndarray, clarity: np.ndarray) -> dict[str, np.ndarray]:
    """Per head, log(natural / sampled) frequency of each class among these stones.

    `sample_weights` shows every colour x clarity class equally often (§1.3),
    so the trained heads answer for a lot where all nine are equally common.
    Adding this to the logits turns that back into the real mix (Blue is
    about half the stones, Inky a sixth): without it the common classes lose
    their borderline stones to the rare ones, and the §5.2 confidences are
    off for every stone of a common class.
    """
    weights = sample_weights(color, clarity)
    out = {}
    for head, labels in (("color", color), ("clarity", clarity)):
        natural = np.bincount(labels, minlength=3) / len(labels)
        sampled = np.bincount(labels, weights=weights, minlength=3) / weights.sum()
        out[head] = np.log(np.maximum(natural, 1e-6) / np.maximum(sampled, 1e-6))
    return out


def sample_weights(color: np.ndarray, clarity: np.ndarray) -> np.ndarray:
    """Per-sample weight 1 / count(its combined class), normalised to mean 1 (§1.3).

    Every class present gets the same total probability of being drawn.
    """
    combined = combined_class(color, clarity)
    counts = np.bincount(combined, minlength=N_COMBINED).astype(np.float64)
    weights = 1.0 / counts[combined]
    return weights / weights.mean()


def epoch_indices(weights: np.ndarray, gen: torch.Generator) -> Tensor:
    """len(weights) sample indices drawn with replacement, proportional to weights."""
    w = torch.from_numpy(weights)
    return torch.multinomial(w, len(weights), replacement=True, generator=gen)


def batches(indices: Tensor, batch_size: int) -> list[Tensor]:
    """Split indices into batches; a trailing batch of 1 is dropped (BatchNorm needs 2)."""
    out = list(indices.split(batch_size))
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


# --------------------------------------------------------------------------- results


@dataclass
class EpochStats:
    """What one epoch did.  phase: "heads" or "full"."""

    epoch: int
    phase: str
    train_loss: float
    train_color_acc: float
    train_clarity_acc: float
    val_loss: float
    val_color_acc: float
    val_clarity_acc: float
    lr_heads: float
    lr_backbone: float
    train_samples: int
    train_seconds: float
    seconds: float


@dataclass
class TrainResult:
    """Best model (by validation loss, eval mode) and how training went."""

    model: MobileNetV3Small
    history: list[EpochStats]
    mean: list[float]
    std: list[float]
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    seconds: float
    config: TrainConfig
    n_train: int
    n_val: int
    prior_correction: dict[str, np.ndarray] | None = None

    @property
    def samples_per_second(self) -> float:
        """Training throughput (augmentation + forward + backward), excluding validation."""
        secs = sum(h.train_seconds for h in self.history)
        return sum(h.train_samples for h in self.history) / secs if secs > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-able description for a manifest's "training" section."""
        cfg = asdict(self.config)
        cfg["mean"], cfg["std"] = self.mean, self.std
        return {
            "architecture": "mobilenet_v3_small",
            "width_mult": self.config.width_mult,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "stopped_early": self.stopped_early,
            "seconds": round(self.seconds, 3),
            "config": cfg,
        }


# --------------------------------------------------------------------------- training


@dataclass
class _Run:
    """State shared by the epochs of one `train` call (owned by the calling thread)."""

    model: MobileNetV3Small
    train: TrainData
    val: TrainData
    cfg: TrainConfig
    mean: list[float]
    std: list[float]
    weights: np.ndarray
    sample_gen: torch.Generator
    aug_gen: torch.Generator
    progress: Progress | None
    total_epochs: int
    on_step: StepHook | None = None
    ema: MobileNetV3Small | None = None  # averaged weights (cfg.ema_epochs > 0)
    ema_decay: float = 0.0
    ema_updates: int = 0
    logit_offset: dict[str, np.ndarray] | None = None  # cfg.prior_correction
    history: list[EpochStats] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None
    best_epoch: int = 0
    best_val_loss: float = math.inf


def train(
    train: TrainData,
    val: TrainData,
    cfg: TrainConfig,
    progress: Progress | None = None,
    init_state: Mapping[str, Tensor] | None = None,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train a model from scratch (or from ``init_state``) and return the best one.

    progress gets one text line per batch and per epoch; on_step gets the
    same per-batch facts as a `StepEvent` (for a progress bar).

    When fine-tuning from ``init_state``, pass the previous bundle's mean/std in
    cfg so the input normalisation the weights were trained with is kept.

    Heads only for cfg.epochs_heads epochs (backbone frozen, BatchNorm statistics
    still adapting), then all parameters for up to cfg.epochs_full epochs with
    cosine decay per step, stopping after cfg.patience epochs without a lower
    validation loss.
    """
    if len(train) < 2 or len(val) < 1:
        raise ValueError(f"train needs >= 2 samples and val >= 1, got {len(train)} and {len(val)}")
    started = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        run = _start_run(train, val, cfg, progress, init_state)
        run.on_step = on_step
        stopped = _train_phases(run)
    finally:
        torch.set_num_threads(old_threads)
    return _finish(run, stopped, time.perf_counter() - started)


def _start_run(
    train: TrainData,
    val: TrainData,
    cfg: TrainConfig,
    progress: Progress | None,
    init_state: Mapping[str, Tensor] | None,
) -> _Run:
    torch.manual_seed(cfg.seed)  # weight init and dropout
    model = MobileNetV3Small(width_mult=cfg.width_mult, stone_stats=cfg.stone_stats, stats_path=cfg.stats_path,
                             backbone_dropout=cfg.backbone_dropout)
    if init_state is not None:
        load_state(model, init_state)
    mean, std = _mean_std(train, cfg)
    run = _Run(
        model=model, train=train, val=val, cfg=cfg, mean=mean, std=std,
        weights=sample_weights(train.color, train.clarity),
        sample_gen=torch.Generator().manual_seed(cfg.seed + 1),
        aug_gen=torch.Generator().manual_seed(cfg.seed + 2),
        progress=progress, total_epochs=cfg.epochs_heads + cfg.epochs_full,
    )
    if cfg.prior_correction:
        run.logit_offset = prior_correction(train.color, train.clarity)
    if cfg.ema_epochs > 0:
        run.ema = copy.deepcopy(model)
        run.ema.requires_grad_(False)
        steps = len(batches(torch.zeros(len(train)), cfg.batch_size))
        run.ema_decay = 1.0 - 1.0 / max(1.0, cfg.ema_epochs * steps)
    return run


def _update_ema(run: _Run) -> None:
    """ema = d * ema + (1 - d) * weights, d ramping up over the first steps (no stale start).

    Parameters are averaged; buffers (BatchNorm statistics) follow the live
    model's, and with ``bn_recalibration`` are recomputed for the averaged
    weights before each validation (`_recalibrate`).  Without that copy, and
    with recalibration off, the averaged model kept its initial statistics
    (mean 0, variance 1) and sat at chance in eval mode.
    """
    if run.ema is None:
        return
    run.ema_updates += 1
    d = min(run.ema_decay, (1.0 + run.ema_updates) / (10.0 + run.ema_updates))
    with torch.no_grad():
        for avg, live in zip(run.ema.parameters(), run.model.parameters(), strict=True):
            avg.mul_(d).add_(live.detach(), alpha=1.0 - d)
        for avg_buf, live_buf in zip(run.ema.buffers(), run.model.buffers(), strict=True):
            avg_buf.copy_(live_buf)


def _judged(run: _Run) -> MobileNetV3Small:
    """The model validation judges and training returns: the average if kept."""
    return run.ema if run.ema is not None else run.model


def _mean_std(train: TrainData, cfg: TrainConfig) -> tuple[list[float], list[float]]:
    """cfg.mean/cfg.std where given, the training images' statistics otherwise."""
    if cfg.mean is not None and cfg.std is not None:
        return list(cfg.mean), list(cfg.std)
    mean, std = channel_stats(train.x)
    return (list(cfg.mean) if cfg.mean is not None else mean,
            list(cfg.std) if cfg.std is not None else std)


def load_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a previous model's state_dict, with an error that says what went wrong."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"init_state does not fit {model.__class__.__name__}: {exc}") from exc


def _train_phases(run: _Run) -> bool:
    """Run both phases; True if early stopping ended the full phase."""
    cfg, model = run.cfg, run.model
    steps = len(batches(torch.zeros(len(run.train)), cfg.batch_size))
    if cfg.epochs_heads:
        _set_backbone_trainable(model, False)
        opt = torch.optim.AdamW(_param_groups(model.head_parameters(), cfg.lr_heads, cfg),
                                lr=cfg.lr_heads)
        for _ in range(cfg.epochs_heads):
            _epoch(run, "heads", opt, None)
    _set_backbone_trainable(model, True)
    if not cfg.epochs_full:
        return False
    groups = (_param_groups(model.backbone_parameters(), cfg.lr_backbone, cfg)
              + _param_groups(model.head_parameters(), cfg.lr_heads, cfg))
    opt = torch.optim.AdamW(groups, lr=cfg.lr_heads)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(steps * cfg.epochs_full))
    stale = 0
    for _ in range(cfg.epochs_full):
        stale = 0 if _epoch(run, "full", opt, sched) else stale + 1
        if stale >= cfg.patience:
            return True
    return False


def _cosine(total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))

    return factor


def _param_groups(
    params: Iterator[nn.Parameter], lr: float, cfg: TrainConfig
) -> list[dict[str, Any]]:
    """Weight decay on weight matrices/kernels only, not on biases and BatchNorm."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for prm in params:
        (decay if prm.ndim > 1 else no_decay).append(prm)
    return [
        {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]


def _set_backbone_trainable(model: MobileNetV3Small, trainable: bool) -> None:
    for prm in model.backbone_parameters():
        prm.requires_grad_(trainable)


def _epoch(
    run: _Run,
    phase: str,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
) -> bool:
    """Train one epoch, validate, record; True if validation loss improved."""
    started = time.perf_counter()
    epoch = len(run.history) + 1
    lrs = _current_lrs(opt, phase)
    loss, color_acc, clarity_acc, n_seen = _train_epoch(run, epoch, phase, opt, sched)
    if not math.isfinite(loss):
        raise RuntimeError(f"training diverged in epoch {epoch} ({phase}): loss {loss}; "
                           "lower lr_heads/lr_backbone")
    train_secs = time.perf_counter() - started
    net = _judged(run)
    _recalibrate(run, net)
    val_loss, val_color, val_clarity = evaluate(
        net, run.val, run.mean, run.std, batch_size=max(run.cfg.batch_size, 128), logit_offset=run.logit_offset
    )
    stats = EpochStats(epoch, phase, loss, color_acc, clarity_acc, val_loss, val_color,
                       val_clarity, lrs[0], lrs[1], n_seen, train_secs,
                       time.perf_counter() - started)
    run.history.append(stats)
    _report(run, _epoch_line(run, stats))
    improved = val_loss < run.best_val_loss - 1e-4
    if improved:
        run.best_val_loss, run.best_epoch = val_loss, epoch
        run.best_state = copy.deepcopy(net.state_dict())
    return improved


def _recalibrate(run: _Run, net: nn.Module) -> None:
    n = min(run.cfg.bn_recalibration, len(run.train))
    if n < 2:
        return
    rows = torch.randperm(len(run.train), generator=run.sample_gen)[:n].sort().values.numpy()
    recalibrate_batchnorm(net, run.train.x[rows], run.mean, run.std, run.cfg.batch_size)


def recalibrate_batchnorm(
    model: nn.Module,
    x_uint8: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
) -> None:
    """Replace BatchNorm running statistics by exact averages over x ("precise BN")."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            for idx in batches(torch.arange(len(x_uint8)), batch_size):
                model(normalize(to_unit(x_uint8[idx.numpy()]), mean, std))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)


def _current_lrs(opt: torch.optim.Optimizer, phase: str) -> tuple[float, float]:
    """(heads lr, backbone lr) at the start of an epoch; backbone 0 while frozen."""
    if phase == "heads":
        return float(opt.param_groups[0]["lr"]), 0.0
    return float(opt.param_groups[2]["lr"]), float(opt.param_groups[0]["lr"])


def _train_epoch(
    run: _Run,
    epoch: int,
    phase: str,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
) -> tuple[float, float, float, int]:
    model = run.model
    model.train()
    chunks = batches(epoch_indices(run.weights, run.sample_gen), run.cfg.batch_size)
    loss_sum, color_ok, clarity_ok, seen = 0.0, 0, 0, 0
    for i, idx in enumerate(chunks, start=1):
        x, y_color, y_clarity = _training_batch(run, idx)
        color_logits, clarity_logits = model(x)
        loss = F.cross_entropy(color_logits, y_color) + F.cross_entropy(clarity_logits, y_clarity)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _update_ema(run)
        if sched is not None:
            sched.step()
        n = len(idx)
        seen += n
        loss_sum += float(loss.detach()) * n
        color_ok += int((color_logits.argmax(1) == y_color).sum())
        clarity_ok += int((clarity_logits.argmax(1) == y_clarity).sum())
        _report(run, f"epoch {epoch}/{run.total_epochs} {phase} batch {i}/{len(chunks)} "
                     f"loss {loss_sum / seen:.4f} color_acc {color_ok / seen:.3f} "
                     f"clarity_acc {clarity_ok / seen:.3f}")
        if run.on_step is not None:
            run.on_step(StepEvent(epoch, run.total_epochs, phase, i, len(chunks), loss_sum / seen,
                                  color_ok / seen, clarity_ok / seen))
    return loss_sum / seen, color_ok / seen, clarity_ok / seen, seen


def _training_batch(run: _Run, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    rows = idx.numpy()
    x = to_unit(run.train.x[rows])
    if run.cfg.augment:
        x = augment_batch(x, run.aug_gen, run.cfg.augment_params)
    x = normalize(x, run.mean, run.std)
    return x, torch.from_numpy(run.train.color[rows]), torch.from_numpy(run.train.clarity[rows])


def _epoch_line(run: _Run, s: EpochStats) -> str:
    return (f"epoch {s.epoch}/{run.total_epochs} {s.phase} done train_loss {s.train_loss:.4f} "
            f"val_loss {s.val_loss:.4f} val_color_acc {s.val_color_acc:.3f} "
            f"val_clarity_acc {s.val_clarity_acc:.3f} {s.seconds:.1f}s")


def _report(run: _Run, line: str) -> None:
    if run.progress is not None:
        run.progress(line)


def _finish(run: _Run, stopped: bool, seconds: float) -> TrainResult:
    if run.best_state is not None:
        run.model.load_state_dict(run.best_state)
    elif run.ema is not None:
        run.model.load_state_dict(run.ema.state_dict())
    run.model.eval()
    return TrainResult(
        model=run.model, history=run.history, mean=run.mean, std=run.std,
        epochs_run=len(run.history), best_epoch=run.best_epoch,
        best_val_loss=run.best_val_loss, stopped_early=stopped, seconds=seconds,
        config=run.cfg, n_train=len(run.train), n_val=len(run.val), prior_correction=run.logit_offset,
    )


# --------------------------------------------------------------------------- inference


def predict_logits(
    model: nn.Module,
    x_uint8: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(color_logits, clarity_logits), each float32 N x 3, in eval mode, no augmentation."""
    was_training = model.training
    model.eval()
    color, clarity = [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(x_uint8), batch_size):
                x = normalize(to_unit(x_uint8[start : start + batch_size]), mean, std)
                c, k = model(x)
                color.append(c.numpy())
                clarity.append(k.numpy())
    finally:
        model.train(was_training)
    if not color:
        return np.zeros((0, N_COLOR), np.float32), np.zeros((0, N_CLARITY), np.float32)
    return np.concatenate(color), np.concatenate(clarity)


def evaluate(
    model: nn.Module,
    data: TrainData,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    logit_offset: Mapping[str, np.ndarray] | None = None,
) -> tuple[float, float, float]:
    """(loss, color accuracy, clarity accuracy); loss = CE(color) + CE(clarity), unweighted.

    logit_offset: added to each head's logits first (a prior correction).
    """
    color, clarity = predict_logits(model, data.x, mean, std, batch_size)
    if logit_offset is not None:
        color, clarity = color + logit_offset["color"], clarity + logit_offset["clarity"]
    loss = nll(color, data.color) + nll(clarity, data.clarity)
    return (loss, float((color.argmax(1) == data.color).mean()),
            float((clarity.argmax(1) == data.clarity).mean()))
