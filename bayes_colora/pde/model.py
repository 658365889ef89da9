r"""Reduced implicit neural models: a coordinate network ``u(x; alpha)`` with continuous LoRA
layers, a hypernetwork ``h(t, mu) -> alpha``, and an equal-size baseline without adaptation.

Shapes: ``D`` spatial dimensions, ``Q`` fields, ``N`` points, ``S`` snapshots (pairs ``(t, mu)``),
``d`` online coordinates (all alphas).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.continuous import ContinuousLoRA, ContinuousLoRALinear, continuous_layers
from ..subspace import Subspace


class PeriodicEmbedding(nn.Module):
    r"""``z_f(x) = (1 / D) sum_d [a_fd cos(2 pi x_d / P_d + c_fd) + b_fd]``, ``f = 1..width``.

    Every feature is ``P_d``-periodic in ``x_d``, so the network built on it is periodic too
    (exactly periodic domains such as the RDE's ``[0, 2 pi)``; on a non-periodic domain
    ``[0, L]`` a period ``P = 2 L`` gives smooth features without forcing periodicity).
    Input ``(..., D)``, output ``(..., width)``.
    """

    def __init__(self, in_dim: int, width: int, period: float | Sequence[float]):
        super().__init__()
        period = torch.as_tensor(period, dtype=torch.float32).expand(in_dim).clone()
        if (period <= 0).any():
            raise ValueError(f"periods must be positive, got {period.tolist()}")
        self.register_buffer("omega", 2 * math.pi / period)
        std = 1.0 / math.sqrt(in_dim)
        self.a = nn.Parameter(torch.randn(width, in_dim) * std)
        self.c = nn.Parameter(torch.randn(width, in_dim) * std)
        self.b = nn.Parameter(torch.randn(width, in_dim) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a * torch.cos(self.omega * x[..., None, :] + self.c) + self.b
        return z.mean(-1)


class CoordinateNet(nn.Module):
    """``x -> u``: a periodic embedding, then ``depth`` linear layers with swish (SiLU) between.

    ``embed_activation=True`` also puts a swish between the embedding and the first linear
    layer, as the reference implementation of Berman & Peherstorfer does (its network is the
    layer list ``P, C, ..., C`` with swish after every layer but the last).
    Call :func:`colora_subspace` to turn its linear layers into continuous LoRA layers.
    Input ``(..., D)``, output ``(..., Q)``.
    """

    def __init__(self, in_dim: int, out_dim: int, width: int = 25, depth: int = 7,
                 period: float | Sequence[float] = 2 * math.pi, embed_activation: bool = False):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"need depth >= 1 and width >= 1, got {depth}, {width}")
        self.embed = PeriodicEmbedding(in_dim, width, period)
        self.act = nn.SiLU() if embed_activation else nn.Identity()
        self.layers = nn.ModuleList(nn.Linear(width, width if i < depth - 1 else out_dim)
                                    for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.embed(x))
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.silu(h)
        return h


def colora_subspace(net: nn.Module, rank: int = 3, per: str = "layer", seed: int | None = 0) -> Subspace:
    """Wrap every linear layer of ``net`` in continuous LoRA; theta = all alphas.

    ``Subspace.from_model`` freezes the network; :func:`bayes_colora.pde.train_offline`
    unfreezes it (and the factors ``A``, ``B``) while it trains.
    """
    return Subspace.from_model(net, ContinuousLoRA(rank=rank, per=per, seed=seed))


class HyperNetwork(nn.Module):
    """``h(t, mu) -> alpha``: a swish MLP on standardised ``(t, mu)``.

    ``(t, mu)`` is standardised with the mean and standard deviation of the training pairs
    (``set_normalisation``). Input ``(S, 2)``, output ``(S, d)``.
    """

    def __init__(self, out_dim: int, width: int = 15, depth: int = 3, in_dim: int = 2):
        super().__init__()
        dims = [in_dim] + [width] * depth + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))

    @torch.no_grad()
    def set_normalisation(self, tmu: torch.Tensor) -> None:
        """Standardise inputs with the statistics of ``tmu`` (``(S, 2)``)."""
        self.shift.copy_(tmu.mean(0))
        self.scale.copy_(tmu.std(0).clamp_min(1e-12))

    def forward(self, tmu: torch.Tensor) -> torch.Tensor:
        h = (tmu - self.shift) / self.scale
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.silu(h)
        return h


class ReducedModel(nn.Module):
    """Continuous CoLoRA reduced model: ``u(x; h(t, mu))``.

    ``forward(x, tmu)``: ``x`` ``(N, D)`` points, ``tmu`` ``(S, 2)`` pairs -> ``(S, N, Q)``;
    the ``S`` coefficient vectors go through one batched call (:meth:`batched_field`).
    """

    def __init__(self, sub: Subspace, hyper: HyperNetwork):
        super().__init__()
        if hyper.layers[-1].out_features != sub.dim:
            raise ValueError(f"the hypernetwork outputs {hyper.layers[-1].out_features} numbers, "
                             f"the subspace has {sub.dim} online coordinates")
        self.sub, self.hyper = sub, hyper

    def _direct_layers(self) -> list[ContinuousLoRALinear] | None:
        """The continuous LoRA layers of a :class:`CoordinateNet` whose theta is exactly their
        alphas in layer order (what :meth:`build` makes), else ``None`` (use the subspace call)."""
        net = self.sub.model
        if not isinstance(net, CoordinateNet):
            return None
        layers = list(net.layers)
        if not all(isinstance(m, ContinuousLoRALinear) and type(m.base) is nn.Linear and not m.merged
                   for m in layers):
            return None
        if self.sub.param_names != [f"layers.{i}.alpha" for i in range(len(layers))]:
            return None
        return layers

    @classmethod
    def build(cls, in_dim: int, out_dim: int, width: int = 25, depth: int = 7, rank: int = 3,
              per: str = "layer", period: float | Sequence[float] = 2 * math.pi,
              hyper_width: int = 15, hyper_depth: int = 3, seed: int = 0,
              embed_activation: bool = False) -> "ReducedModel":
        """A :class:`CoordinateNet` with continuous LoRA layers plus its hypernetwork."""
        torch.manual_seed(seed)
        net = CoordinateNet(in_dim, out_dim, width, depth, period, embed_activation)
        sub = colora_subspace(net, rank, per, seed)
        return cls(sub, HyperNetwork(sub.dim, hyper_width, hyper_depth))

    @property
    def n_online(self) -> int:
        """d, the number of online coordinates."""
        return self.sub.dim

    def offline_parameters(self) -> list[nn.Parameter]:
        """Everything trained offline: the network (W, b, A, B, embedding) and the hypernetwork;
        the alphas are excluded (the hypernetwork supplies them)."""
        alphas = {id(layer.alpha) for layer in continuous_layers(self.sub.model).values()}
        net = [p for p in self.sub.model.parameters() if id(p) not in alphas]
        return net + list(self.hyper.parameters())

    def set_normalisation(self, tmu: torch.Tensor) -> None:
        """Standardise the hypernetwork's inputs with the statistics of ``tmu``."""
        self.hyper.set_normalisation(tmu)

    def alpha(self, tmu: torch.Tensor) -> torch.Tensor:
        """``h(t, mu)``, ``(S, d)``."""
        return self.hyper(tmu)

    def field(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """``u(x; alpha)``: ``alpha`` ``(d,)`` -> ``(N, Q)``; ``(S, d)`` -> ``(S, N, Q)``.

        ``(d,)`` goes through ``sub(x, theta=alpha)`` (so ``torch.func`` transforms such as the
        Galerkin ``jacfwd`` see the subspace); ``(S, d)`` through :meth:`batched_field`.
        """
        if alpha.dim() == 2 and x.dim() == 2:
            return self.batched_field(x, alpha)
        return self.sub(x, theta=alpha)

    def batched_field(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        r"""``u(x; alpha_s)`` for ``S`` coefficient vectors at once, without ``vmap``.

        Each continuous LoRA layer ``l`` of snapshot ``s`` is one linear map with the effective
        weight ``W_l + (A_l \operatorname{diag}(c_{sl})) B_l``, ``c_{sl} = alpha_ref_l + alpha_{sl}``:
        one batched matrix product per layer, ``(S, N, in) x (S, in, out)``; the embedding of
        ``x`` is computed once for all snapshots. The same numbers as ``sub(x, theta=alpha)`` up to
        float rounding (``tests/test_pde.py`` checks), without ``vmap`` / ``functional_call``:
        1.6x faster training on the CPU (docs/continuous.md) and fewer Python-level operations
        per step. Falls back to the subspace call for networks other than :meth:`build`'s.

        Shapes: ``x`` ``(N, D)``, ``alpha`` ``(S, d)`` -> ``(S, N, Q)``.
        """
        layers = self._direct_layers()
        if layers is None:
            return self.sub(x, theta=alpha)
        if alpha.shape[-1] != self.sub.dim:
            raise ValueError(f"alpha has shape {tuple(alpha.shape)}, expected (S, {self.sub.dim})")
        net: CoordinateNet = self.sub.model
        h = net.act(net.embed(x))                                        # (N, width), shared
        sizes = [m.alpha_ref.numel() for m in layers]
        for i, (layer, a) in enumerate(zip(layers, torch.split(alpha, sizes, dim=-1))):
            coef = layer.alpha_ref + a                                   # (S, 1) or (S, r)
            base = layer.base
            w = base.weight + (layer.lora_A * coef[:, None, :]) @ layer.lora_B   # (S, out, in)
            h = torch.matmul(h, w.transpose(1, 2))                       # (S, N, out)
            if base.bias is not None:
                h = h + base.bias
            if i < len(layers) - 1:
                h = F.silu(h)
        return h

    def forward(self, x: torch.Tensor, tmu: torch.Tensor) -> torch.Tensor:
        return self.field(x, self.alpha(tmu))


class ConcatBaseline(nn.Module):
    """The same network without continuous adaptation: ``u(x, t, mu)`` with ``(t, mu)``
    (standardised) appended to the periodic embedding of ``x`` (after the optional swish, as in
    :class:`CoordinateNet`). Choose ``width`` with
    :func:`baseline_width` for a parameter count equal to a reduced model's.
    ``forward(x, tmu)``: ``(N, D)``, ``(S, 2)`` -> ``(S, N, Q)``.
    """

    def __init__(self, in_dim: int, out_dim: int, width: int, depth: int,
                 period: float | Sequence[float] = 2 * math.pi, embed_activation: bool = False):
        super().__init__()
        self.embed = PeriodicEmbedding(in_dim, width, period)
        self.act = nn.SiLU() if embed_activation else nn.Identity()
        self.layers = nn.ModuleList(nn.Linear(width + 2 if i == 0 else width,
                                              width if i < depth - 1 else out_dim)
                                    for i in range(depth))
        self.register_buffer("shift", torch.zeros(2))
        self.register_buffer("scale", torch.ones(2))

    set_normalisation = HyperNetwork.set_normalisation

    def offline_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def forward(self, x: torch.Tensor, tmu: torch.Tensor) -> torch.Tensor:
        z = self.act(self.embed(x))                              # (N, width)
        s = ((tmu - self.shift) / self.scale)                    # (S, 2)
        # first layer on the concatenation [z, s], without building it: W [z; s] = W_z z + W_s s
        first, width = self.layers[0], z.shape[-1]
        h = (z @ first.weight[:, :width].T)[None] + (s @ first.weight[:, width:].T + first.bias)[:, None, :]
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = layer(h)
            if i < len(self.layers) - 1:
                h = F.silu(h)
        return h


def n_parameters(module: nn.Module) -> int:
    """All parameters, frozen or not (buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def baseline_width(target: int, in_dim: int, out_dim: int, depth: int) -> int:
    """The width at which :class:`ConcatBaseline` has the parameter count closest to ``target``."""
    def count(w: int) -> int:
        return 3 * w * in_dim + (w + 2) * w + w + (depth - 2) * (w * w + w) + w * out_dim + out_dim
    return min(range(2, 512), key=lambda w: abs(count(w) - target))
