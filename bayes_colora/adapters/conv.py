r"""Convolutional CoLoRA adapters: kernel updates built from small factors.

Every adapter here adds a kernel update ``dW`` of the base kernel's shape ``(c0, c1, *k)``
(``Conv``: ``c0 = out``, ``c1 = in / groups``; ``ConvTranspose``: ``c0 = in``, ``c1 = out / groups``)
and runs it with the layer's own stride, padding, dilation and groups:
``y = base(x) + conv(x, dW)``. Merge: ``W <- W + dW``.

Forward, folded: a convolution is linear in its kernel, ``conv(x, W) + conv(x, dW) = conv(x, W + dW)``,
so when the adapter wraps the plain layer the forward runs *one* convolution with the kernel
``W + dW`` (and the layer's bias) instead of two. The backward then computes the gradient of the
loss with respect to the whole kernel, ``g_W = sum over positions of x-patch x output-grad`` (the
weight gradient a full fine-tuning of this layer would compute, of shape ``(c0, c1, *k)``), and
chains it to the factors through ``dW``; the frozen ``W`` receives none. The two-convolution form
stays where folding would change the function or skip code: a stacked adapter below (``base`` is an
adapter), a conv subclass with its own ``forward`` (timm's ``Conv2dSame``, weight-standardised
convolutions), and hooks on the base layer. ``layer.fold = False`` forces it (benchmarks).

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


#: the ``forward`` methods that compute exactly ``conv(x, weight) + bias``: only these fold
_PLAIN_FORWARDS = frozenset(c.forward for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                                nn.ConvTranspose2d, nn.ConvTranspose3d))
#: a base layer with any of these hooks keeps the two-convolution forward, which calls it
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class ConvDeltaLayer(AdapterLayer):
    """A conv adapter defined by its kernel update: ``y = base(x) + conv(x, delta_weight())``,
    computed as ``conv(x, W + delta_weight()) + b`` where that is the same function (module
    docstring).

    Attributes:
        fold: ``True`` (default) runs the folded single convolution where it applies; ``False``
            always runs ``base(x) + conv(x, dW)`` (for timing the two, or debugging).
    """

    fold: bool = True

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The kernel update, shaped like the base layer's weight."""

    def adapted_weight(self) -> torch.Tensor:
        """``W + dW``, the kernel of the folded forward (subclasses may fuse the sum)."""
        return self.base_layer.weight + self.delta_weight()

    def folds(self) -> bool:
        """Whether the forward runs the single folded convolution (see the module docstring)."""
        base = self.base
        return (self.fold and type(base).forward in _PLAIN_FORWARDS
                and not any(getattr(base, h) for h in _HOOKS))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folds():
            return conv_apply(self.base, x, self.adapted_weight(), self.base.bias)
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

    def _factor_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``P`` as ``(c0, c1, 1, ...)`` and ``D`` as ``(c0, 1, *k)``: their product is ``dW``."""
        depth = self.depthwise
        return self.pointwise.reshape(*self.pointwise.shape, *([1] * (depth.dim() - 1))), depth.unsqueeze(1)

    def delta_weight(self) -> torch.Tensor:
        point, depth = self._factor_views()
        return point * depth

    def adapted_weight(self) -> torch.Tensor:
        """``W + P * D`` in one fused ``addcmul``."""
        return torch.addcmul(self.base_layer.weight, *self._factor_views())


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
