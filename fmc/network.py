"""RUNet (3-D residual U-Net) and a PatchGAN-style 3-D discriminator (docs/task.md, Method).

RUNet layout (the topology of the authors' public RUNet), for ``L = len(channels)`` levels:

* encoder level ``i``: ``blocks[i]`` residual blocks (the first maps the previous width to
  ``channels[i]``), then a stride-2 4^3 convolution (kernel 4, stride 2, padding 1) + GroupNorm + LeakyReLU
  that halves every axis. The input is therefore downsampled ``L`` times;
* decoder level ``i`` (``L-1 .. 0``): ``blocks[i]`` residual blocks (mirroring the encoder) on the
  **concatenation** [upsampled deeper level, encoder output of level ``i``] (the deepest level takes the
  bottleneck alone), then a stride-2 4^3 transposed convolution (4/2/1) + GroupNorm + LeakyReLU. Skips are
  concatenated rather than added so the decoder can weigh encoder features freely; it also gives the
  paper's size: the ``paper`` preset has 53,931,297 parameters with 2 input channels (~54 M);
* head: 1x1x1 conv ``channels[0] -> out_channels``; with ``residual=True`` the input's first
  ``out_channels`` channels are added (global residual), so the network learns the correction
  fused - view, which trains faster than predicting intensities from scratch.

Residual block: conv3-GN-LReLU-conv3-GN + identity (1x1x1 conv + GN when the channel count changes)
-> LReLU. Any spatial size works: the input is replicate-padded to a multiple of ``2**L`` (split evenly
between both sides) and the output cropped back, so odd sizes come back exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

NEGATIVE_SLOPE = 0.01  # LeakyReLU slope of the generator (nnU-Net's default)
DISC_NEGATIVE_SLOPE = 0.2  # LeakyReLU slope of the discriminator (pix2pix / PatchGAN default)


@dataclass(frozen=True)
class RUNetConfig:
    """Everything needed to rebuild a RUNet; stored in the model card, so it must round trip JSON."""

    in_channels: int = 1
    out_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128, 256, 256)
    blocks: tuple[int, ...] = (1, 1, 2, 2, 2)
    groups: int = 8  # GroupNorm groups, clamped per layer to a divisor of its channel count
    residual: bool = True  # output = input[:, c:c + out_channels] + network(input), c = residual_channel
    # Step 2 adds its correction to channel 1, the step-1 prediction, and starts as exactly that
    # prediction (zero-initialized head): training refines step 1 instead of first relearning it.
    residual_channel: int = 0
    # Zero-initialize the head for a residual on channel 0 too: the untrained network is then the
    # identity of its input (fmc.method's "correction" step 1, the patch-only step 2).
    zero_head: bool = False

    def __post_init__(self) -> None:
        # JSON turns tuples into lists; normalize so configs compare equal after a round trip.
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"in/out channels must be >= 1, got {self.in_channels}/{self.out_channels}")
        if len(self.channels) < 1 or len(self.channels) != len(self.blocks):
            raise ValueError(
                f"channels {self.channels} and blocks {self.blocks} must be non-empty and the same length"
            )
        if min(self.channels) < 1 or min(self.blocks) < 0:
            raise ValueError(f"channels must be >= 1 and blocks >= 0, got {self.channels} / {self.blocks}")
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if self.residual and self.in_channels < self.residual_channel + self.out_channels:
            raise ValueError(
                f"a global residual from channel {self.residual_channel} needs in_channels >= "
                f"{self.residual_channel + self.out_channels}, got {self.in_channels}"
            )
        if self.residual_channel < 0:
            raise ValueError(f"residual_channel must be >= 0, got {self.residual_channel}")

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def multiple(self) -> int:
        """Spatial sizes the body accepts are multiples of this (forward pads to it)."""
        return 2**self.levels

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RUNetConfig:
        """Build from a (JSON) dict; unknown keys are an error so a card from another version fails loudly."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RUNetConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, RUNetConfig] = {
    # The paper's size: encoder 32-64-128-256-256, residual blocks 1,1,2,2,2 (decoder mirrors), ~54 M.
    "paper": RUNetConfig(channels=(32, 64, 128, 256, 256), blocks=(1, 1, 2, 2, 2)),
    # Default bundled weights: small enough to train on a CPU (resources/weights/MODEL_CARD.md).
    "small": RUNetConfig(channels=(16, 24, 32, 48, 48), blocks=(1, 1, 1, 1, 1)),
    # Unit tests: tiny and fast, three levels (inputs padded to a multiple of 8).
    "tiny": RUNetConfig(channels=(4, 8, 8), blocks=(1, 1, 1), groups=2),
}


def preset(name: str, in_channels: int = 1) -> RUNetConfig:
    """A named size preset with the given number of input channels (1 for step 1, 2 for step 2, ...)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown RUNet preset {name!r}; choose one of {sorted(PRESETS)}") from None
    d = base.to_dict()
    d["in_channels"] = int(in_channels)
    return RUNetConfig.from_dict(d)


def _groups(channels: int, groups: int) -> int:
    """Largest group count <= ``groups`` dividing ``channels`` (GroupNorm needs an exact divisor)."""
    return math.gcd(channels, groups)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels, groups), channels)


class ResidualBlock(nn.Module):
    """conv3-GN-LReLU-conv3-GN + identity (1x1x1 projection + GN if channels change) -> LReLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = _norm(out_channels, groups)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels, groups)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)
        self.skip: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.skip = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, bias=False), _norm(out_channels, groups)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


def _stage(in_channels: int, out_channels: int, count: int, groups: int) -> nn.Sequential:
    """``count`` residual blocks; the first maps in -> out (a 1x1x1 projection if they differ)."""
    layers: list[nn.Module] = []
    for i in range(count):
        layers.append(ResidualBlock(in_channels if i == 0 else out_channels, out_channels, groups))
    if count == 0 and in_channels != out_channels:
        layers.append(nn.Conv3d(in_channels, out_channels, 1))
    return nn.Sequential(*layers)


def _conv_norm_act(conv: nn.Module, channels: int, groups: int) -> nn.Sequential:
    """A (transposed) resampling convolution followed by GroupNorm and LeakyReLU."""
    return nn.Sequential(conv, _norm(channels, groups), nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True))


class RUNet(nn.Module):
    """3-D residual U-Net; ``forward`` maps (B, in, Z, Y, X) -> (B, out, Z, Y, X) for any Z, Y, X."""

    def __init__(self, config: RUNetConfig) -> None:
        super().__init__()
        self.config = config
        ch, nb, g = config.channels, config.blocks, config.groups
        self.encoders = nn.ModuleList()
        previous = config.in_channels
        for c, n in zip(ch, nb, strict=True):
            down = _conv_norm_act(nn.Conv3d(c, c, 4, 2, 1, bias=False), c, g)
            self.encoders.append(nn.Sequential(_stage(previous, c, n, g), down))
            previous = c
        # decoders[i] serves level i; the deepest one takes the bottleneck alone, the others the
        # concatenation [upsampled deeper level, encoder output of level i].
        self.decoders = nn.ModuleList()
        for i, (c, n) in enumerate(zip(ch, nb, strict=True)):
            width = c if i == config.levels - 1 else c + ch[i + 1]
            up = _conv_norm_act(nn.ConvTranspose3d(c, c, 4, 2, 1, bias=False), c, g)
            self.decoders.append(nn.Sequential(_stage(width, c, n, g), up))
        self.head = nn.Conv3d(ch[0], config.out_channels, 1)
        if config.residual and (config.residual_channel > 0 or config.zero_head):
            nn.init.zeros_(self.head.weight)  # starts as the prediction it refines
            nn.init.zeros_(self.head.bias)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
        """Replicate-pad every spatial axis up to a multiple of 2**levels; returns the crop back."""
        m = self.config.multiple
        sizes = list(x.shape[2:])
        befores = [(-size % m) // 2 for size in sizes]
        pads: list[int] = []
        for size, before in zip(reversed(sizes), reversed(befores), strict=True):  # last axis first
            pads += [before, -size % m - before]
        crop = (slice(None), slice(None), *(slice(b, b + s) for b, s in zip(befores, sizes, strict=True)))
        if any(pads):
            x = F.pad(x, pads, mode="replicate")
        return x, crop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"RUNet expects (B, {self.config.in_channels}, Z, Y, X), got {tuple(x.shape)}")
        h, crop = self._pad(x)
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            h = encoder(h)
            skips.append(h)
        h = self.decoders[-1](skips[-1])
        for i in reversed(range(self.config.levels - 1)):
            h = self.decoders[i](torch.cat([h, skips[i]], dim=1))
        out = self.head(h)[crop]
        if self.config.residual:
            first = self.config.residual_channel
            out = out + x[:, first : first + self.config.out_channels]
        return out


class Discriminator3D(nn.Module):
    """PatchGAN-style 3-D discriminator: stride-2 4^3 convs, GroupNorm, LeakyReLU(0.2) -> patch logits.

    ``levels`` stride-2 convolutions (the first without normalization, as in pix2pix), channels doubling
    from ``base`` up to ``8*base``, then a 3^3 conv to one logit per patch: output
    (B, 1, Z/2**levels, Y/2**levels, X/2**levels) for sizes divisible by 2**levels.
    """

    def __init__(self, in_channels: int = 1, base: int = 16, levels: int = 4, groups: int = 8) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels = levels
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(levels):
            c_out = base * min(2**i, 8)
            layers.append(nn.Conv3d(c_in, c_out, 4, stride=2, padding=1, bias=i == 0))
            if i > 0:
                layers.append(_norm(c_out, groups))
            layers.append(nn.LeakyReLU(DISC_NEGATIVE_SLOPE, inplace=True))
            c_in = c_out
        layers.append(nn.Conv3d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = min(x.shape[2:])
        if small < 2**self.levels:
            raise ValueError(
                f"Discriminator3D with {self.levels} levels needs every spatial size >= {2**self.levels}, "
                f"got {tuple(x.shape[2:])}"
            )
        return self.net(x)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (no forward pass needed)."""
    return sum(p.numel() for p in module.parameters())
