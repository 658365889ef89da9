r"""DenseDelta: a full update of a linear layer's weight and bias, as an adapter.

The adapted layer is ``y = (W + dW) x + (b + db)``, computed as ``base(x) + dW x + db``, with
``dW`` (``out x in``) and ``db`` (``out``) zero at initialisation. Parameters: ``out (in + 1)``
per layer (``out in`` without a bias). Merge: ``W <- W + dW``, ``b <- b + db``.

Meant for a layer with nothing pretrained to preserve, such as a classification head created
for the task's ``C`` classes, which is trained whole (PEFT's ``modules_to_save``). As an adapter
it lives in theta like every other update, and every engine treats it alike. A low-rank update
of a zero head (LoRA's ``B A`` with ``B = 0``) would instead start at a saddle of the loss: its
logits move ``O(sqrt(in))`` times slower under Adam.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, AdapterSpec


class DenseDeltaLayer(AdapterLayer):
    """``base(x) + dW x + db`` around an ``nn.Linear``; see the module docstring."""

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
    """Train every matched ``nn.Linear`` in full (weight and bias deltas); meant for a new head."""

    supported = (nn.Linear,)

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        return DenseDeltaLayer(layer)
