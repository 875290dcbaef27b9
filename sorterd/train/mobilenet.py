"""MobileNetV3-Small with a 6-channel stem and the dual colour/clarity head.

The backbone is the torchvision ``mobilenet_v3_small`` feature trunk rebuilt in
plain torch (same block table, squeeze-excitation, hardswish, channel rounding),
so that the trainer needs no torchvision.  Protocol references: §2.2 (6-channel
input: backlit R,G,B then toplit R,G,B) and §9.4 (dual head on the pooled
backbone features).

Deliberate differences from torchvision:

* ``in_channels`` defaults to 6 (§2.2).
* torchvision's classifier (576 -> 1024 -> 1000) is replaced by the §9.4 head:
  shared Linear(576 -> 256) + ReLU + Dropout(0.3), then two Linear(256 -> 3).
* BatchNorm momentum defaults to PyTorch's 0.1 instead of torchvision's 0.01:
  we train from scratch for a few hundred to a few thousand steps, and with
  0.01 the running statistics would still be mostly their initial values
  when the model is first evaluated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

BN_EPS = 0.001
HEAD_HIDDEN = 256
HEAD_DROPOUT = 0.3
N_COLOR = 3
N_CLARITY = 3


@dataclass(frozen=True)
class BlockSpec:
    """One row of the MobileNetV3-Small bottleneck table (before width scaling)."""

    in_ch: int
    kernel: int
    expanded: int
    out_ch: int
    use_se: bool
    hardswish: bool
    stride: int


# torchvision `_mobilenet_v3_conf("mobilenet_v3_small")`, dilation 1 everywhere.
SMALL_BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(16, 3, 16, 16, True, False, 2),
    BlockSpec(16, 3, 72, 24, False, False, 2),
    BlockSpec(24, 3, 88, 24, False, False, 1),
    BlockSpec(24, 5, 96, 40, True, True, 2),
    BlockSpec(40, 5, 240, 40, True, True, 1),
    BlockSpec(40, 5, 240, 40, True, True, 1),
    BlockSpec(40, 5, 120, 48, True, True, 1),
    BlockSpec(48, 5, 144, 48, True, True, 1),
    BlockSpec(48, 5, 288, 96, True, True, 2),
    BlockSpec(96, 5, 576, 96, True, True, 1),
    BlockSpec(96, 5, 576, 96, True, True, 1),
)
STEM_CHANNELS = 16


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count the way torchvision does (never down by > 10 %)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def scaled(channels: int, width_mult: float) -> int:
    """Channel count of a layer after applying ``width_mult``."""
    return make_divisible(channels * width_mult)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + optional activation."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        *,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.Hardswish,
        bn_momentum: float = 0.1,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=bn_momentum),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """SE block: global pool, 1x1 conv down, ReLU, 1x1 conv up, hardsigmoid gate."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.relu = nn.ReLU()
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (kxk) -> [SE] -> project (1x1), residual if shapes match."""

    def __init__(self, spec: BlockSpec, width_mult: float, bn_momentum: float) -> None:
        super().__init__()
        in_ch = scaled(spec.in_ch, width_mult)
        expanded = scaled(spec.expanded, width_mult)
        out_ch = scaled(spec.out_ch, width_mult)
        act: type[nn.Module] = nn.Hardswish if spec.hardswish else nn.ReLU
        self.use_residual = spec.stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expanded != in_ch:
            layers.append(ConvBNAct(in_ch, expanded, 1, act=act, bn_momentum=bn_momentum))
        layers.append(
            ConvBNAct(
                expanded, expanded, spec.kernel, stride=spec.stride, groups=expanded,
                act=act, bn_momentum=bn_momentum,
            )
        )
        if spec.use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4)))
        layers.append(ConvBNAct(expanded, out_ch, 1, act=None, bn_momentum=bn_momentum))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_ch

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


def build_features(in_channels: int, width_mult: float, bn_momentum: float) -> nn.Sequential:
    """The torchvision ``features`` trunk: stem, 11 bottlenecks, 1x1 conv to 6x channels."""
    stem_ch = scaled(STEM_CHANNELS, width_mult)
    layers: list[nn.Module] = [
        ConvBNAct(in_channels, stem_ch, 3, stride=2, bn_momentum=bn_momentum)
    ]
    last = stem_ch
    for spec in SMALL_BLOCKS:
        block = InvertedResidual(spec, width_mult, bn_momentum)
        layers.append(block)
        last = block.out_channels
    layers.append(ConvBNAct(last, 6 * last, 1, bn_momentum=bn_momentum))
    return nn.Sequential(*layers)


class DualHead(nn.Module):
    """§9.4 head: shared Linear+ReLU+Dropout, then colour and clarity logits.

    direct: the last `direct` input features (the `StoneStats`) also reach both heads' logits
    through a linear path of their own (zero at start: `reset_direct`), beside the hidden layer.
    """

    def __init__(self, in_features: int, direct: int = 0) -> None:
        super().__init__()
        if not 0 <= direct <= in_features:
            raise ValueError(f"direct={direct!r}: must be in 0..{in_features} (the head's inputs)")
        self.direct, self._first_direct = direct, in_features - direct  # a constant: no shape arithmetic in the graph
        self.shared = nn.Sequential(
            nn.Linear(in_features, HEAD_HIDDEN), nn.ReLU(), nn.Dropout(HEAD_DROPOUT)
        )
        self.color = nn.Linear(HEAD_HIDDEN, N_COLOR)
        self.clarity = nn.Linear(HEAD_HIDDEN, N_CLARITY)
        self.color_direct = nn.Linear(direct, N_COLOR) if direct else None
        self.clarity_direct = nn.Linear(direct, N_CLARITY) if direct else None

    def reset_direct(self) -> None:
        for lin in (self.color_direct, self.clarity_direct):
            if lin is not None:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        shared = self.shared(features)
        color, clarity = self.color(shared), self.clarity(shared)
        if self.color_direct is not None and self.clarity_direct is not None:
            stats = features[:, self._first_direct:]
            color = color + self.color_direct(stats)
            clarity = clarity + self.clarity_direct(stats)
        return color, clarity


class StoneStats(nn.Module):
    """The stone's mean colour against its own background, per channel, for the head.

    The protocol's rules are about exactly this: clarity is how bright the
    stone is as a share of the backlight (§3.2.2, "> 60 % = transparent"),
    colour its hue, saturation and value under the ring light (§3.2.1).  A
    CNN trained from scratch on a few thousand crops learns textures sooner
    than such a whole-stone ratio, and on simulated lots it trailed a plain
    logistic regression on these numbers by 3 % in colour; given them, the
    head gets both.

    From the normalised input (N x C x H x W):
      background  mean of the four corner patches (the crop is centred on the
                  stone, and augmentation fills uncovered area with background);
      mask        soft stone mask, sigmoid of a learned 1x1 convolution of
                  |x - background| (initialised to "differs by ~0.5 std");
      features    masked mean of each channel, the background, and the log
                  of the stone's share of the crop: 2C + 1 numbers.
    Everything is plain ONNX (slices, abs, conv, sigmoid, sums, log).
    """

    CORNER = 8  # px: the corner patches (of a 128 x 128 crop: 0.4 mm at 20 px/mm)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.mask = nn.Conv2d(channels, 1, 1)
        self.out_features = 2 * channels + 1

    def reset(self) -> None:
        nn.init.constant_(self.mask.weight, 10.0 / self.channels)
        assert self.mask.bias is not None  # nn.Conv2d(bias=True), the default
        nn.init.constant_(self.mask.bias, -5.0)

    def forward(self, x: Tensor) -> Tensor:
        c = self.CORNER  # fixed, not from x.shape: the ONNX graph has no shape arithmetic
        corners = torch.cat([x[:, :, :c, :c], x[:, :, :c, -c:], x[:, :, -c:, :c], x[:, :, -c:, -c:]], dim=3)
        background = corners.mean(dim=(2, 3), keepdim=True)
        m = torch.sigmoid(self.mask(torch.abs(x - background)))
        stone = (x * m).sum(dim=(2, 3)) / (m.sum(dim=(2, 3)) + 1.0)
        share = torch.log(m.mean(dim=(2, 3)) + 1e-3)
        return torch.cat([stone, torch.flatten(background, 1), share], dim=1)


class MobileNetV3Small(nn.Module):
    """6-channel MobileNetV3-Small; ``forward`` returns (color_logits, clarity_logits).

    stone_stats: also feed the head the `StoneStats` of the input (2C + 1
    numbers next to the pooled backbone features); off = the plain §9.4 model.
    stats_path: the statistics also reach the logits linearly (`DualHead` direct), so the
    whole-stone numbers the protocol's rules are written in (§3.2) carry a prediction of their
    own and the CNN adds what they miss.
    backbone_dropout: in training, the pooled backbone features of this share of the samples
    are zeroed (the rest scaled by 1 / (1 - p)), so the head must also sort from the statistics
    alone.  On domain-randomised lots the CNN's features learn the machine as much as the
    stone; a logistic regression on the 13 statistics alone sorted held-out and shifted lots
    better than the CNN did (models/README.md, v005).  No effect in eval mode or in the graph.
    """

    def __init__(
        self, *, in_channels: int = 6, width_mult: float = 1.0, bn_momentum: float = 0.1,
        stone_stats: bool = False, stats_path: bool = False, backbone_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels!r}: must be >= 1")
        if not 0.1 <= width_mult <= 2.0:
            raise ValueError(f"width_mult={width_mult!r}: allowed range is 0.1..2.0")
        if stats_path and not stone_stats:
            raise ValueError("stats_path=True needs stone_stats=True (the path carries the StoneStats)")
        if not 0.0 <= backbone_dropout < 1.0:
            raise ValueError(f"backbone_dropout={backbone_dropout!r}: must be in [0, 1)")
        self.backbone_dropout = backbone_dropout
        self.in_channels = in_channels
        self.width_mult = width_mult
        self.num_features = 6 * scaled(SMALL_BLOCKS[-1].out_ch, width_mult)
        self.features = build_features(in_channels, width_mult, bn_momentum)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.stats = StoneStats(in_channels) if stone_stats else None
        extra = self.stats.out_features if self.stats is not None else 0
        self.head = DualHead(self.num_features + extra, direct=extra if stats_path else 0)
        init_weights(self)
        self.head.reset_direct()
        if self.stats is not None:
            self.stats.reset()

    def embed(self, x: Tensor) -> Tensor:
        """Pooled backbone features, N x num_features."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def head_features(self, x: Tensor) -> Tensor:
        """The head's input: pooled backbone features, then the `StoneStats` (if on); what the
        out-of-distribution gate (`sorterd.train.ood`) measures."""
        features = self.embed(x)
        if self.training and self.backbone_dropout > 0.0:
            keep = (torch.rand(features.shape[0], 1, device=features.device) >= self.backbone_dropout)
            features = features * keep.to(features.dtype) / (1.0 - self.backbone_dropout)
        if self.stats is not None:
            features = torch.cat([features, self.stats(x)], dim=1)
        return features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.head_features(x))

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained in the heads-only phase (§9.4): the head and the stone mask."""
        yield from self.head.parameters()
        if self.stats is not None:
            yield from self.stats.parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Everything except the head."""
        return self.features.parameters()


def init_weights(model: nn.Module) -> None:
    """torchvision's MobileNetV3 initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def count_parameters(params: Iterator[nn.Parameter]) -> int:
    """Number of scalar parameters in ``params``."""
    return sum(p.numel() for p in params)
