r"""DiffFit: a per-output-channel scale and a bias shift.

The adapted layer is ``y = (1 + g) * base(x) + db``, channel-wise: ``g`` (the scale minus one,
so the scale starts at 1 and the prior centred at 0 is centred at the pretrained model) and
``db`` (only where the layer has a bias) start at zero. On a normalisation layer this is exactly
a change of its affine parameters (``w -> (1 + g) w``, ``b -> (1 + g) b + db``), on a linear or
conv layer a scale of its output channels, as DiffFit scales each block's residual branches.
Parameters: ``2 out`` per layer with a bias, ``out`` without.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from .base import AdapterLayer, AdapterSpec
from .layers import (CONV_TYPES, LINEAR_TYPES, NORM_TYPES, channel_view, is_hf_conv1d,
                     out_channel_axis)


class DiffFitLayer(AdapterLayer):
    """``(1 + g) * base(x) + db``; see the module docstring."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        layer = self.base_layer
        weight = layer.weight
        shape = weight.shape if isinstance(layer, NORM_TYPES) else (_out_channels(layer),)
        self.scale_delta = nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))
        bias = getattr(layer, "bias", None)
        self.bias_delta = nn.Parameter(torch.zeros_like(bias)) if isinstance(bias, torch.Tensor) else None

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        layer = self.base_layer
        out = out * channel_view(1 + self.scale_delta, layer, out)
        if self.bias_delta is not None:
            out = out + channel_view(self.bias_delta, layer, out)
        return out

    def _merge_into_base(self, sign: float) -> None:
        layer = self.base_layer
        factor = 1 + self.scale_delta
        if sign < 0:  # undo: b = (b' - db) / (1 + g), w = w' / (1 + g)
            if self.bias_delta is not None:
                layer.bias.sub_(self.bias_delta).div_(factor)
            _scale_out_channels(layer, 1 / factor)
        else:
            _scale_out_channels(layer, factor)
            if self.bias_delta is not None:
                layer.bias.mul_(factor).add_(self.bias_delta)


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, _ConvTransposeNd):
        return layer.weight.shape[1] * layer.groups
    return layer.weight.shape[out_channel_axis(layer)]


def _scale_out_channels(layer: nn.Module, factor: torch.Tensor) -> None:
    """Multiply ``layer.weight`` by ``factor`` along its output channels, in place."""
    weight = layer.weight
    if isinstance(layer, NORM_TYPES):
        weight.mul_(factor)
    elif isinstance(layer, _ConvTransposeNd):  # (in, out/g, *k): output channel = g * out/g + j
        g = layer.groups
        view = weight.view(g, weight.shape[0] // g, weight.shape[1], *weight.shape[2:])
        view.mul_(factor.reshape(g, 1, weight.shape[1], *([1] * (weight.dim() - 2))))
    else:
        axis = out_channel_axis(layer)
        shape = [1] * weight.dim()
        shape[axis] = -1
        weight.mul_(factor.reshape(shape))


class DiffFit(AdapterSpec):
    """DiffFit on linear, conv and (affine) normalisation layers."""

    supported = LINEAR_TYPES + CONV_TYPES + NORM_TYPES

    def accepts(self, layer: nn.Module) -> str | None:
        reason = super().accepts(layer)
        if reason is None and not isinstance(getattr(layer, "weight", None), torch.Tensor):
            reason = f"{type(layer).__name__} has no affine weight"
        return reason

    def _supports_by_name(self, layer: nn.Module) -> bool:
        return is_hf_conv1d(layer)

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        return DiffFitLayer(layer)
