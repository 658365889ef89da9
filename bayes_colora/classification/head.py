r"""A full update of a (new) classification head, as an adapter: ``y = (W + dW) x + (b + db)``.

A classifier head created for the task's ``C`` classes has nothing pretrained to preserve, so it is
trained whole (PEFT's ``modules_to_save``). As an adapter it lives in theta like every other
update, and every engine treats it alike. ``dW`` (``C x F``) and ``db`` (``C``) start at zero;
parameters ``C (F + 1)``. A low-rank update of a zero head (LoRA's ``B A`` with ``B = 0``) would
instead start at a saddle of the loss: its logits move ``O(sqrt(F))`` times slower under Adam.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import AdapterLayer, AdapterSpec


class DenseDeltaLayer(AdapterLayer):
    """``base(x) + dW x + db`` around an ``nn.Linear``."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        layer = self.base_layer
        self.weight_delta = nn.Parameter(torch.zeros_like(layer.weight))
        self.bias_delta = nn.Parameter(torch.zeros_like(layer.bias)) if layer.bias is not None else None

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(x, self.weight_delta, self.bias_delta)

    def _merge_into_base(self, sign: float) -> None:
        self.base_layer.weight.add_(sign * self.weight_delta)
        if self.bias_delta is not None:
            self.base_layer.bias.add_(sign * self.bias_delta)


class DenseDelta(AdapterSpec):
    """Train every matched ``nn.Linear`` in full (weight and bias deltas); meant for the head."""

    supported = (nn.Linear,)

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        return DenseDeltaLayer(layer)
