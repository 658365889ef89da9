r"""BitFit: train only the biases.

The adapted layer is ``y = base(x) + db`` with ``db`` broadcast along the channel axis, which
equals replacing the bias ``b`` by ``b + db`` because every supported layer (linear,
convolution, transposed convolution, BatchNorm / InstanceNorm, LayerNorm, GroupNorm) adds its
bias last. ``db = 0`` at initialisation. Parameters: the number of bias entries,
``out`` per layer.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import AdapterLayer, AdapterSpec
from .layers import CONV_TYPES, LINEAR_TYPES, NORM_TYPES, channel_view, is_hf_conv1d


class BitFitLayer(AdapterLayer):
    """``base(x) + db``; see the module docstring."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.bias_delta = nn.Parameter(torch.zeros_like(self.base_layer.bias))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + channel_view(self.bias_delta, self.base_layer, out)

    def _merge_into_base(self, sign: float) -> None:
        self.base_layer.bias.add_(sign * self.bias_delta)


class BitFit(AdapterSpec):
    """BitFit on every matched layer that has a bias (layers without one are skipped)."""

    supported = LINEAR_TYPES + CONV_TYPES + NORM_TYPES

    def accepts(self, layer: nn.Module) -> str | None:
        reason = super().accepts(layer)
        if reason is None and not isinstance(getattr(layer, "bias", None), torch.Tensor):
            reason = f"{type(layer).__name__} has no bias"
        return reason

    def _supports_by_name(self, layer: nn.Module) -> bool:
        return is_hf_conv1d(layer)

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        return BitFitLayer(layer)
