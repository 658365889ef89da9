r"""Convolutional CoLoRA adapters: kernel updates built from small factors.

Every adapter here adds a kernel update ``dW`` of the base kernel's shape ``(c0, c1, *k)``
(``Conv``: ``c0 = out``, ``c1 = in / groups``; ``ConvTranspose``: ``c0 = in``, ``c1 = out / groups``)
and runs it with the layer's own stride, padding, dilation and groups:
``y = base(x) + conv(x, dW)``. Merge: ``W <- W + dW``.

``ConvCoLoRA`` (convolutional CoLoRA): a pointwise part ``P`` (``c0 x c1``, Glorot) times one
depthwise kernel per ``c0`` channel ``D`` (``c0 x k``, zeros):

.. math::  dW[o, i, \dots] = P[o, i]\, D[o, \dots], \qquad c_0 c_1 + c_0 \prod k \text{ parameters}.

``TuckerCoLoRA``: a Tucker-2 update on the two channel modes, core ``G`` of shape
``(r0, r1, *k)`` and factors ``U0`` (``c0 x r0``, zeros) and ``U1`` (``c1 x r1``):

.. math::  dW = G \times_1 U_0 \times_2 U_1, \qquad r_0 r_1 \prod k + c_0 r_0 + c_1 r_1 \text{ parameters}.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from typing import Sequence

import torch
from torch import nn

from .base import AdapterLayer, AdapterSpec
from .layers import CONV_TYPES, conv_apply


class ConvDeltaLayer(AdapterLayer):
    """A conv adapter defined by its kernel update: ``y = base(x) + conv(x, delta_weight())``."""

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The kernel update, shaped like the base layer's weight."""

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + conv_apply(self.base_layer, x, self.delta_weight())

    def _merge_into_base(self, sign: float) -> None:
        self.base_layer.weight.add_(sign * self.delta_weight())


class ConvCoLoRALayer(ConvDeltaLayer):
    """``dW[o, i] = P[o, i] D[o]``; see the module docstring."""

    def __init__(self, base: nn.Module):
        super().__init__(base)
        weight = self.base_layer.weight
        c0, c1, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
        self.pointwise = nn.Parameter(torch.empty(c0, c1, dtype=weight.dtype, device=weight.device))
        self.depthwise = nn.Parameter(torch.zeros(c0, *kernel, dtype=weight.dtype, device=weight.device))
        self.reset_factors()

    def reset_factors(self, generator: torch.Generator | None = None) -> None:
        """P Glorot-uniform, D zero: the delta is zero again."""
        with torch.no_grad():
            c0, c1 = self.pointwise.shape
            bound = math.sqrt(6.0 / (c0 + c1))
            self.pointwise.copy_(torch.rand(c0, c1, generator=generator) * 2 * bound - bound)
            self.depthwise.zero_()

    def delta_weight(self) -> torch.Tensor:
        depth = self.depthwise
        return self.pointwise.reshape(*self.pointwise.shape, *([1] * (depth.dim() - 1))) * depth.unsqueeze(1)


class TuckerCoLoRALayer(ConvDeltaLayer):
    """``dW = G x1 U0 x2 U1``; see the module docstring."""

    def __init__(self, base: nn.Module, ranks: tuple[int, int]):
        super().__init__(base)
        weight = self.base_layer.weight
        c0, c1, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
        r0, r1 = min(ranks[0], c0), min(ranks[1], c1)
        opts = {"dtype": weight.dtype, "device": weight.device}
        self.core = nn.Parameter(torch.empty(r0, r1, *kernel, **opts))
        self.factor_out = nn.Parameter(torch.zeros(c0, r0, **opts))
        self.factor_in = nn.Parameter(torch.empty(c1, r1, **opts))
        self.reset_factors()

    def reset_factors(self, generator: torch.Generator | None = None) -> None:
        """Core and input factor random (unit-variance fan-in scaling), output factor zero."""
        with torch.no_grad():
            fan_in = self.core[0].numel()
            self.core.copy_(torch.randn(self.core.shape, generator=generator) / math.sqrt(fan_in))
            self.factor_in.copy_(torch.randn(self.factor_in.shape, generator=generator)
                                 / math.sqrt(self.factor_in.shape[0]))
            self.factor_out.zero_()

    def delta_weight(self) -> torch.Tensor:
        core = self.core.flatten(2)  # (r0, r1, K)
        delta = torch.einsum("abk,oa,ib->oik", core, self.factor_out, self.factor_in)
        return delta.reshape(self.base_layer.weight.shape)


class _ConvSpec(AdapterSpec):
    supported = CONV_TYPES


class ConvCoLoRA(_ConvSpec):
    """Convolutional CoLoRA on conv / transposed-conv layers (any dimension, any groups).

    ``merge_and_reset()`` on the subspace (:meth:`bayes_colora.Subspace.merge_and_reset`) folds the
    update into the kernel and starts a fresh zero update: the published recipe does this at the
    end of every epoch.
    """

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        return ConvCoLoRALayer(layer)


class TuckerCoLoRA(_ConvSpec):
    """Tucker-2 conv update with channel ranks ``ranks = (r_out, r_in)`` (clipped to the channels)."""

    def __init__(self, ranks: tuple[int, int] = (8, 8), targets: str | Sequence[str] | None = None,
                 types: Sequence[type] | None = None):
        super().__init__(targets, types)
        if len(ranks) != 2 or any(int(r) != r or r < 1 for r in ranks):
            raise ValueError(f"TuckerCoLoRA ranks must be two positive integers, got {ranks!r}")
        self.ranks = (int(ranks[0]), int(ranks[1]))

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        return TuckerCoLoRALayer(layer, self.ranks)

    def __repr__(self) -> str:
        return f"TuckerCoLoRA(ranks={self.ranks}, targets={self.targets})"
