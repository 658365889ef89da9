"""Facts about base layer kinds that several adapters need: channel axes and functional calls.

Layer families: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 style, weight stored as
``(in, out)``) map the last axis; convolutions ``nn.ConvNd`` and ``nn.ConvTransposeNd`` and the
normalisation layers put channels in axis 1, except ``nn.LayerNorm`` (trailing axes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

NORM_TYPES: tuple[type, ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm)
CONV_TYPES: tuple[type, ...] = (_ConvNd,)
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,)


def is_hf_conv1d(layer: nn.Module) -> bool:
    """transformers' ``Conv1D`` (a linear layer whose weight is stored transposed)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def channels_last(layer: nn.Module) -> bool:
    """Whether ``layer``'s output has its channel axis last (Linear, Conv1D, LayerNorm).

    A LayerNorm subclass whose name ends in ``2d`` (timm's ``LayerNorm2d``) is channels-first.
    """
    if isinstance(layer, nn.LayerNorm):
        return not type(layer).__name__.endswith(("2d", "3d"))
    return isinstance(layer, nn.Linear) or is_hf_conv1d(layer)


def channel_view(vec: torch.Tensor, layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel tensor ``vec`` so that it broadcasts against ``out``, the output of
    ``layer``: unchanged for channels-last layers, ``(C, 1, ..., 1)`` for channels-first ones."""
    if channels_last(layer):
        return vec
    return vec.reshape(*vec.shape, *([1] * (out.dim() - 1 - vec.dim())))


def out_channel_axis(layer: nn.Module) -> int:
    """Axis of ``layer.weight`` that indexes output channels (transposed conv: 1, Conv1D: 1)."""
    if isinstance(layer, _ConvTransposeNd) or is_hf_conv1d(layer):
        return 1
    return 0


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(fan-in, fan-out) of a linear-like layer: ``nn.Linear`` or transformers' ``Conv1D``."""
    if is_hf_conv1d(layer):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def conv_apply(layer: _ConvNd, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``layer``'s convolution (stride, padding, padding mode, dilation, groups, output
    padding kept) with another ``weight`` and ``bias`` (default: no bias)."""
    if isinstance(layer, _ConvTransposeNd):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[weight.dim() - 2]
        return fn(x, weight, bias, layer.stride, layer.padding, layer.output_padding,
                  layer.groups, layer.dilation)
    return layer._conv_forward(x, weight, bias)
