r"""LoRA: a low-rank update of a layer's weight matrix.

For a linear layer ``y = W x + b`` with ``W`` of shape ``(out, in)``:

.. math::  y = W x + b + \frac{\alpha}{r} B A x, \qquad A \in \mathbb{R}^{r \times in},\;
           B \in \mathbb{R}^{out \times r},

with ``B = 0`` at initialisation (so the adapted layer equals the base layer) and ``A`` drawn
Kaiming-uniform. Parameters: ``r (in + out)``.

For a convolution with weight ``W`` of shape ``(c0, c1, *k)`` (``c0 = out, c1 = in / groups`` for
``Conv``; ``c0 = in, c1 = out / groups`` for ``ConvTranspose``) the update acts on the matrix view
``W.reshape(c0, c1 * prod(k))``: ``dW = (alpha / r) B A`` with ``A`` of shape
``(r, c1 prod(k))`` and ``B`` of shape ``(c0, r)``, applied with the layer's own stride, padding,
dilation and groups. Parameters: ``r (c0 + c1 prod(k))``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .base import AdapterLayer, AdapterSpec
from .conv import ConvDeltaLayer
from .layers import CONV_TYPES, LINEAR_TYPES, in_out_features, is_hf_conv1d


class LoRALinear(AdapterLayer):
    """LoRA around ``nn.Linear`` or transformers' ``Conv1D``; see the module docstring."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__(base)
        fan_in, fan_out = in_out_features(self.base_layer)
        ref = self.base_layer.weight
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in, dtype=ref.dtype, device=ref.device))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, rank, dtype=ref.dtype, device=ref.device))
        self.reset_factors()

    def reset_factors(self, generator: torch.Generator | None = None) -> None:
        """A Kaiming-uniform, B zero: the delta is zero."""
        _reset_lora(self.lora_A, self.lora_B, generator)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A`` in the base layer's weight layout."""
        delta = self.scale * (self.lora_B @ self.lora_A)
        return delta.T if is_hf_conv1d(self.base_layer) else delta

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_A.T) @ self.lora_B.T)

    def _merge_into_base(self, sign: float) -> None:
        self.base_layer.weight.add_(sign * self.delta_weight())


class LoRAConv(ConvDeltaLayer):
    """LoRA around a convolution or transposed convolution; see the module docstring."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__(base)
        weight = self.base_layer.weight
        c0, c1k = weight.shape[0], weight[0].numel()
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, c1k, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(c0, rank, dtype=weight.dtype, device=weight.device))
        self.reset_factors()

    def reset_factors(self, generator: torch.Generator | None = None) -> None:
        """A Kaiming-uniform, B zero: the delta is zero."""
        _reset_lora(self.lora_A, self.lora_B, generator)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A`` reshaped to the base kernel's shape."""
        return (self.scale * (self.lora_B @ self.lora_A)).reshape(self.base_layer.weight.shape)


@torch.no_grad()
def _reset_lora(lora_A: torch.Tensor, lora_B: torch.Tensor, generator: torch.Generator | None) -> None:
    """Kaiming-uniform A (gain for a = sqrt(5): bound 1 / sqrt(fan_in)), zero B."""
    bound = 1.0 / math.sqrt(lora_A.shape[1])
    lora_A.copy_(torch.rand(lora_A.shape, generator=generator) * 2 * bound - bound)
    lora_B.zero_()


class LoRA(AdapterSpec):
    """LoRA adapters of rank ``rank`` and scale ``alpha / rank`` on linear and conv layers.

    Args:
        rank: the rank ``r`` of every update.
        alpha: scale numerator; ``None`` means ``alpha = rank`` (scale 1).
        targets, types: which layers; see :class:`AdapterSpec`.
    """

    supported = LINEAR_TYPES + CONV_TYPES

    def __init__(self, rank: int = 4, alpha: float | None = None,
                 targets: str | Sequence[str] | None = None, types: Sequence[type] | None = None):
        super().__init__(targets, types)
        if int(rank) != rank or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)

    def _supports_by_name(self, layer: nn.Module) -> bool:
        return is_hf_conv1d(layer)

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        base = layer.base_layer if isinstance(layer, AdapterLayer) else layer
        cls = LoRAConv if isinstance(base, CONV_TYPES) else LoRALinear
        return cls(layer, self.rank, self.alpha)

    def __repr__(self) -> str:
        return f"LoRA(rank={self.rank}, alpha={self.alpha}, targets={self.targets})"
