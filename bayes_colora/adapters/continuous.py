r"""Continuous LoRA (CoLoRA for reduced models): a low-rank update whose *scale* moves in time.

For a linear layer ``y = W x + b`` with ``W`` of shape ``(out, in)``:

.. math::  y = \big(W + (A \operatorname{diag}(\bar\alpha)) B\big) x + b, \qquad
           A \in \mathbb{R}^{out \times r},\; B \in \mathbb{R}^{r \times in},\;
           \bar\alpha = \alpha_{\mathrm{ref}} + \alpha,

with ``alpha`` of length 1 (one number per layer, broadcast over the rank: ``alpha A B``) or ``r``
(one per rank). ``alpha`` is the adapter's only subspace parameter (theta); the factors ``A`` and
``B`` are parameters too, but frozen (``requires_grad=False``): they are trained *offline*
together with ``W`` and ``b`` (the offline trainer of :mod:`bayes_colora.pde` unfreezes them for
that), while online only ``alpha`` moves with time and the physics parameter. Unlike LoRA both
factors start random and non-zero; ``alpha = 0`` is what makes the delta zero, so a fresh
adapter reproduces the base layer exactly.

``alpha_ref`` is a buffer, zero by default: setting it (see :func:`set_alpha_reference`) shifts
the origin of theta, so a prior ``N(0, s^2 I)`` on theta is a prior ``N(alpha_ref, s^2 I)`` on the
layer's coefficients (e.g. centred at a hypernetwork's prediction).

Parameters in theta: 1 or ``r`` per layer. Frozen factor parameters: ``r (in + out)``.
Reference: Berman & Peherstorfer, "CoLoRA: Continuous low-rank adaptation for reduced implicit
neural modeling of parameterized partial differential equations", ICML 2024.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .base import AdapterLayer, AdapterSpec
from .layers import LINEAR_TYPES

PER = ("layer", "rank")


class ContinuousLoRALinear(AdapterLayer):
    """``(W + (A * alpha) B) x + b`` around an ``nn.Linear``; see the module docstring.

    Args:
        base: the linear layer.
        rank: ``r``.
        per: ``"layer"`` (one alpha) or ``"rank"`` (``r`` alphas).
        generator: random numbers for ``A`` and ``B``.
    """

    def __init__(self, base: nn.Module, rank: int, per: str = "layer",
                 generator: torch.Generator | None = None):
        super().__init__(base)
        ref = self.base_layer.weight
        fan_out, fan_in = ref.shape
        n_alpha = 1 if per == "layer" else rank
        self.rank, self.per = rank, per
        # A ~ N(0, 1/r), B ~ N(0, 1/in): (A B) x has the scale of W x for Kaiming-like W
        a = torch.randn(fan_out, rank, generator=generator) / math.sqrt(rank)
        b = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
        self.lora_A = nn.Parameter(a.to(ref), requires_grad=False)
        self.lora_B = nn.Parameter(b.to(ref), requires_grad=False)
        self.alpha = nn.Parameter(torch.zeros(n_alpha, dtype=ref.dtype, device=ref.device))
        self.register_buffer("alpha_ref", torch.zeros(n_alpha, dtype=ref.dtype, device=ref.device))

    def coefficients(self) -> torch.Tensor:
        """``alpha_ref + alpha``, shape ``(1,)`` or ``(r,)``."""
        return self.alpha_ref + self.alpha

    def delta_weight(self) -> torch.Tensor:
        """``(A * alpha) B``, shape ``(out, in)``."""
        return (self.lora_A * self.coefficients()) @ self.lora_B

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + ((x @ self.lora_B.T) * self.coefficients()) @ self.lora_A.T

    def _merge_into_base(self, sign: float) -> None:
        self.base_layer.weight.add_(sign * self.delta_weight())


class ContinuousLoRA(AdapterSpec):
    """Continuous LoRA on linear layers: theta is one ``alpha`` per layer or per rank.

    Args:
        rank: the rank ``r`` of every update.
        per: ``"layer"`` (one online coordinate per layer) or ``"rank"`` (``r`` per layer).
        targets, types: which layers; see :class:`AdapterSpec`.
        seed: seed for the random factors ``A`` and ``B`` (``None``: torch's global generator).
    """

    supported = LINEAR_TYPES

    def __init__(self, rank: int = 3, per: str = "layer", targets: str | Sequence[str] | None = None,
                 types: Sequence[type] | None = None, seed: int | None = None):
        super().__init__(targets, types)
        if int(rank) != rank or rank < 1:
            raise ValueError(f"ContinuousLoRA rank must be a positive integer, got {rank!r}")
        if per not in PER:
            raise ValueError(f"per must be one of {PER} (one alpha per layer or per rank), got {per!r}")
        self.rank, self.per, self.seed = int(rank), per, seed
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        return ContinuousLoRALinear(layer, self.rank, self.per, self._generator)

    def __repr__(self) -> str:
        return f"ContinuousLoRA(rank={self.rank}, per={self.per!r}, targets={self.targets})"


def continuous_layers(model: nn.Module) -> dict[str, ContinuousLoRALinear]:
    """Every :class:`ContinuousLoRALinear` in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ContinuousLoRALinear)}


@torch.no_grad()
def set_alpha_reference(model: nn.Module, alpha_ref: torch.Tensor) -> None:
    """Set ``alpha_ref`` of every continuous LoRA layer of ``model`` from one vector.

    Args:
        model: a model with :class:`ContinuousLoRALinear` layers.
        alpha_ref: shape ``(n,)``, ``n`` the total number of alphas, in the order of
            ``model.named_modules()`` (the order of theta when the alphas are the subspace).
    """
    layers = list(continuous_layers(model).values())
    sizes = [layer.alpha_ref.numel() for layer in layers]
    if alpha_ref.shape != (sum(sizes),):
        raise ValueError(f"alpha_ref has shape {tuple(alpha_ref.shape)}, expected ({sum(sizes)},): "
                         f"one entry per alpha of the {len(layers)} continuous LoRA layers")
    for layer, piece in zip(layers, torch.split(alpha_ref, sizes)):
        layer.alpha_ref.copy_(piece)
