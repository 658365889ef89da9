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

Kronecker factors (``fit_laplace(hessian="kron")``, see :mod:`bayes_colora.inference.kron`): the
delta is two linear maps in a row, ``u = A a`` and ``(alpha / r) B u``, applied at every location
``l`` (token, pixel) with the layer input ``a_l`` (a convolution's unfolded patch). With ``g_l`` the
gradient of the layer output at location ``l``, ``A`` sees inputs ``a_l`` and output gradients
``(alpha / r) B^T g_l``; ``B`` sees inputs ``u_l = A a_l`` and output gradients ``(alpha / r) g_l``.
:meth:`LoRALinear.kfac_input_factors` and :meth:`LoRALinear.kfac_grad_factors` return the sums of
their outer products (``LoRAConv``: ``nn.Conv2d`` with ``groups == 1`` only).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
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

    # ------------------------------------------------------------- Kronecker factors
    def kfac_parameters(self) -> tuple[str, ...]:
        """The parameters with Kronecker factors: both LoRA factors."""
        return ("lora_A", "lora_B")

    def kfac_input_factors(self, x: torch.Tensor, params: Mapping[str, torch.Tensor],
                           ) -> dict[str, tuple[torch.Tensor, int]]:
        r"""Input-side sums ``{name: (sum_l a_l a_l^T, L)}`` over the ``L`` locations of ``x``
        (``(..., in)``: every leading index is a location): ``a_l = x_l`` for ``lora_A``
        (``in x in``), ``u_l = A x_l`` for ``lora_B`` (``r x r``). ``params`` holds this layer's
        ``lora_A`` and ``lora_B`` at the linearisation point."""
        return _lora_input_factors(x.reshape(-1, x.shape[-1]), params["lora_A"])

    def kfac_grad_factors(self, grad_out: torch.Tensor, params: Mapping[str, torch.Tensor],
                          ) -> dict[str, torch.Tensor]:
        r"""Output-side sums ``{name: sum_l g_l g_l^T}`` from the gradient ``grad_out`` of the
        layer output (``(..., out)``): ``g_l = s B^T grad_l`` for ``lora_A`` (``r x r``),
        ``g_l = s grad_l`` for ``lora_B`` (``out x out``), ``s = alpha / r``."""
        return _lora_grad_factors(grad_out.reshape(-1, grad_out.shape[-1]), params["lora_B"],
                                  self.scale)


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

    # ------------------------------------------------------------- Kronecker factors
    def kfac_parameters(self) -> tuple[str, ...]:
        """Both LoRA factors around an ``nn.Conv2d`` with ``groups == 1``; none otherwise
        (transposed, grouped, 1-d and 3-d convolutions: their entries get diagonal curvature)."""
        layer = self.base_layer
        ok = isinstance(layer, nn.Conv2d) and layer.groups == 1
        return ("lora_A", "lora_B") if ok else ()

    def kfac_input_factors(self, x: torch.Tensor, params: Mapping[str, torch.Tensor],
                           ) -> dict[str, tuple[torch.Tensor, int]]:
        r"""As :meth:`LoRALinear.kfac_input_factors`, with ``a_l`` the unfolded input patch
        (``c_in k_h k_w``, ordered like a row of the kernel) at each of the ``L = B H' W'``
        output locations; ``x`` of shape ``(B, c_in, H, W)`` (or unbatched ``(c_in, H, W)``)."""
        layer = self.base_layer
        x = x if x.dim() == 4 else x[None]
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        padded = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(padded, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
        return _lora_input_factors(patches.mT.reshape(-1, patches.shape[1]), params["lora_A"])

    def kfac_grad_factors(self, grad_out: torch.Tensor, params: Mapping[str, torch.Tensor],
                          ) -> dict[str, torch.Tensor]:
        r"""As :meth:`LoRALinear.kfac_grad_factors`, with ``grad_l`` the output gradient at each
        output pixel (``grad_out`` of shape ``(B, c_out, H', W')`` or ``(c_out, H', W')``)."""
        grad_out = grad_out if grad_out.dim() == 4 else grad_out[None]
        rows = grad_out.flatten(2).mT.reshape(-1, grad_out.shape[1])
        return _lora_grad_factors(rows, params["lora_B"], self.scale)


def _lora_input_factors(a: torch.Tensor, lora_A: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """``a``: the ``(L, in)`` inputs of ``A``; ``u = a A^T`` those of ``B``."""
    u = a @ lora_A.mT
    return {"lora_A": (a.mT @ a, a.shape[0]), "lora_B": (u.mT @ u, a.shape[0])}


def _lora_grad_factors(grad: torch.Tensor, lora_B: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """``grad``: the ``(L, out)`` output gradients; ``s grad`` reach ``B``, ``s grad B`` reach ``A``."""
    g_b = scale * grad
    g_a = g_b @ lora_B
    return {"lora_A": g_a.mT @ g_a, "lora_B": g_b.mT @ g_b}


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
