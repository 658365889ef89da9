r"""A compact NAFNet-style restoration network (Chen et al., "Simple Baselines for Image
Restoration", ECCV 2022) with a heteroscedastic output.

A NAF block on ``x`` of shape ``(B, c, H, W)``:

.. math::  y = x + \beta \cdot W_3\,\mathrm{SCA}(\mathrm{SG}(D\,W_1\,\mathrm{LN}(x))), \qquad
           z = y + \gamma \cdot W_5\,\mathrm{SG}(W_4\,\mathrm{LN}(y)),

with ``LN`` a layer norm over channels per pixel, ``W_1`` (``c -> 2c``), ``W_3``, ``W_4``
(``c -> 2c``), ``W_5`` 1x1 convolutions, ``D`` a depthwise 3x3 convolution, ``SG(u) = u_1 * u_2``
the *simple gate* (the two channel halves multiplied, no activation function) and
``SCA(u) = u * W_a avgpool(u)`` the simplified channel attention. ``beta``, ``gamma`` (per channel)
start at zero, so every block starts as the identity.

The network is a small U-Net: a 3x3 intro conv to ``width`` channels, ``len(enc_blocks)`` encoder
levels (blocks, then a stride-2 2x2 conv doubling the channels), ``middle_blocks`` blocks, the
mirrored decoder (1x1 conv + pixel shuffle, skip added), and a 3x3 ending conv to ``2 C``
channels: a residual ``r`` and a log-variance ``s``. The output is ``cat(x + r, s)`` along the
channel axis, shape ``(B, 2C, H, W)``, the layout ``bc.Gaussian(heteroscedastic=True, dim=1)``
reads as (mean, log variance). ``H`` and ``W`` must be multiples of ``2 ** len(enc_blocks)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """Layer norm over the channel axis of ``(B, C, H, W)``, per pixel, with affine weights."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) / (var + self.eps).sqrt() * self.weight[:, None, None] + self.bias[:, None, None]


class SimpleGate(nn.Module):
    """``SG(u) = u[:, :c] * u[:, c:]`` for ``u`` with ``2c`` channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """One NAF block with ``c`` channels; see the module docstring."""

    def __init__(self, c: int):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm2d(c), LayerNorm2d(c)
        self.conv1 = nn.Conv2d(c, 2 * c, 1)
        self.conv2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.sca = nn.Conv2d(c, c, 1)
        self.conv3 = nn.Conv2d(c, c, 1)
        self.conv4 = nn.Conv2d(c, 2 * c, 1)
        self.conv5 = nn.Conv2d(c, c, 1)
        self.gate = SimpleGate()
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.gate(self.conv2(self.conv1(self.norm1(x))))
        u = u * self.sca(F.adaptive_avg_pool2d(u, 1))
        y = x + self.beta * self.conv3(u)
        return y + self.gamma * self.conv5(self.gate(self.conv4(self.norm2(y))))


class NAFNet(nn.Module):
    """Compact NAFNet with a mean and a log-variance output; see the module docstring.

    Args:
        channels: image channels ``C`` (3 for RGB).
        width: channels of the first level (doubled at each encoder level).
        enc_blocks: NAF blocks per encoder level (its length is the number of levels).
        middle_blocks: NAF blocks at the bottom.
        dec_blocks: NAF blocks per decoder level, from the bottom up; default ``enc_blocks``
            reversed.
    """

    def __init__(self, channels: int = 3, width: int = 16, enc_blocks: Sequence[int] = (1, 1),
                 middle_blocks: int = 1, dec_blocks: Sequence[int] | None = None):
        super().__init__()
        dec_blocks = list(enc_blocks)[::-1] if dec_blocks is None else list(dec_blocks)
        if len(dec_blocks) != len(enc_blocks):
            raise ValueError(f"dec_blocks {dec_blocks} needs one entry per encoder level "
                             f"({len(enc_blocks)}, enc_blocks={list(enc_blocks)})")
        self.channels = channels
        self.factor = 2 ** len(enc_blocks)
        self.intro = nn.Conv2d(channels, width, 3, padding=1)
        self.ending = nn.Conv2d(width, 2 * channels, 3, padding=1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        c = width
        for n in enc_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(c) for _ in range(n)]))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
            c *= 2
        self.middle = nn.Sequential(*[NAFBlock(c) for _ in range(middle_blocks)])
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for n in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(c) for _ in range(n)]))
        with torch.no_grad():  # start near the identity with unit log-variance scale
            self.ending.weight.mul_(0.1)
            self.ending.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"NAFNet expects images of shape (B, {self.channels}, H, W), got "
                             f"{tuple(x.shape)}")
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of {self.factor} "
                             f"(2 ** encoder levels); crop or pad the images")
        h = self.intro(x)
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            h = enc(h)
            skips.append(h)
            h = down(h)
        h = self.middle(h)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            h = dec(up(h) + skip)
        out = self.ending(h)
        residual, log_var = out.chunk(2, dim=1)
        return torch.cat([x + residual, log_var], dim=1)


def nafnet(size: str = "small", channels: int = 3) -> NAFNet:
    """Named configurations: ``"tiny"`` (width 8, 2 levels, one block each; CPU tests and
    ``--quick``) and ``"small"`` (width 16, 2 levels, 1-2 blocks; the GPU study)."""
    configs = {"tiny": dict(width=8, enc_blocks=(1, 1), middle_blocks=1),
               "small": dict(width=16, enc_blocks=(1, 2), middle_blocks=2)}
    if size not in configs:
        raise ValueError(f"unknown NAFNet size {size!r}; choose one of {sorted(configs)}")
    return NAFNet(channels=channels, **configs[size])
