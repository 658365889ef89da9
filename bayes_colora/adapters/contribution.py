r"""Contribution-based LoRA (Wu et al. 2024): LoRA whose rank differs per layer, allocated from a
fixed parameter budget in proportion to each layer's contribution to the task.

A LoRA of rank ``r`` on a layer with weight matrix view ``(c0, c1 prod(k))`` costs
``r (c0 + c1 prod(k))`` parameters (``r (in + out)`` for a linear layer) and has rank at most
``min(c0, c1 prod(k))``. With scores ``s_l >= 0`` (e.g. ``bc.contribution_scores``), costs per
unit rank ``c_l`` and a budget ``P``, the continuous allocation is

.. math::  t_l = \mathrm{clip}(\lambda s_l,\ r_{min},\ r_{max,l}), \qquad
           \lambda:\ \sum_l c_l t_l = P

(found by bisection; all layers at ``r_max`` when even that fits). Integer ranks are
``floor(t_l)``, then the left-over budget goes, one rank at a time, to the layers in order of
decreasing fractional part ``t_l - floor(t_l)`` where the extra rank still fits (largest-remainder
apportionment). So ``sum_l c_l r_l <= P`` always, and ranks are exactly ``lambda s_l`` when those
are integers. Layers with rank 0 get no adapter.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from torch import nn

from .base import AdapterLayer, AdapterSpec
from .layers import CONV_TYPES, LINEAR_TYPES, in_out_features, is_hf_conv1d
from .lora import LoRAConv, LoRALinear


def lora_shape(layer: nn.Module) -> tuple[int, int]:
    """``(c0, c1 prod(k))`` of the matrix LoRA factorises for ``layer`` (``(out, in)`` for a
    linear layer): cost per unit rank ``c0 + c1 prod(k)``, maximal rank ``min`` of the two."""
    base = layer.base_layer if isinstance(layer, AdapterLayer) else layer
    if isinstance(base, CONV_TYPES):
        return base.weight.shape[0], base.weight[0].numel()
    fan_in, fan_out = in_out_features(base)
    return fan_out, fan_in


def allocate_ranks(scores: Mapping[str, float], costs: Mapping[str, int], budget: int,
                   max_ranks: Mapping[str, int] | None = None, min_rank: int = 0) -> dict[str, int]:
    """Integer ranks ``r_l`` proportional to ``scores`` with ``sum_l costs[l] r_l <= budget``
    (module docstring). ``max_ranks`` caps each layer (default: no cap); every layer gets at
    least ``min_rank``. Returns ``{layer: rank}`` in the order of ``scores``."""
    names = list(scores)
    if set(names) != set(costs) or (max_ranks is not None and set(names) != set(max_ranks)):
        raise ValueError(f"scores, costs and max_ranks must name the same layers; scores has "
                         f"{sorted(names)[:5]}, costs {sorted(costs)[:5]}")
    if not names:
        raise ValueError("allocate_ranks needs at least one layer")
    bad = [n for n in names if not (math.isfinite(scores[n]) and scores[n] >= 0)]
    if bad:
        raise ValueError(f"scores must be finite and >= 0; bad for {bad[:5]}")
    if any(int(costs[n]) != costs[n] or costs[n] < 1 for n in names):
        raise ValueError("costs must be positive integers (parameters per unit of rank)")
    cap = {n: (math.inf if max_ranks is None else int(max_ranks[n])) for n in names}
    if any(cap[n] < min_rank for n in names):
        raise ValueError(f"min_rank={min_rank} exceeds the maximal rank of some layer")
    floor_cost = sum(costs[n] * min_rank for n in names)
    if budget < floor_cost:
        raise ValueError(f"budget {budget} is below the {floor_cost} parameters that min_rank="
                         f"{min_rank} needs on every layer; raise the budget or lower min_rank")
    if sum(scores.values()) == 0:
        raise ValueError("every score is 0: nothing to allocate by; check the scores")

    def target(lam: float) -> dict[str, float]:
        return {n: min(max(lam * scores[n] if scores[n] > 0 else 0.0, min_rank), cap[n]) for n in names}

    def spent(lam: float) -> float:
        return sum(costs[n] * t for n, t in target(lam).items())

    hi = 1.0
    if all(math.isfinite(c) for c in cap.values()) and spent(math.inf) <= budget:
        t = target(math.inf)
    else:
        while spent(hi) < budget:
            hi *= 2
        lo = 0.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if spent(mid) <= budget else (lo, mid)
        t = target(lo)
    ranks = {n: int(math.floor(t[n] + 1e-9)) for n in names}
    left = budget - sum(costs[n] * ranks[n] for n in names)
    for n in sorted(names, key=lambda n: -(t[n] - ranks[n])):
        if t[n] - ranks[n] > 1e-9 and ranks[n] < cap[n] and costs[n] <= left:
            ranks[n] += 1
            left -= costs[n]
    return ranks


class ContributionLoRA(AdapterSpec):
    """LoRA with a per-layer rank from a parameter ``budget`` and per-layer ``scores``.

    Args:
        budget: the most adapter parameters in total (e.g. those of a uniform-rank LoRA, or 7% of
            the network).
        scores: ``{layer name: contribution >= 0}``, e.g. from ``bc.contribution_scores``; every
            selected layer needs one (extra names are ignored).
        targets, types: which layers (linear and conv), as for :class:`~.lora.LoRA`.
        alpha: LoRA scale numerator; ``None`` gives every layer scale 1 (``alpha = rank``).
        min_rank: the least rank of every selected layer.

    After ``bc.Subspace.from_model(model, spec)`` (or ``spec.select``) ``spec.ranks`` holds the
    allocation and :meth:`allocation` a report of it.
    """

    supported = LINEAR_TYPES + CONV_TYPES

    def __init__(self, budget: int, scores: Mapping[str, float],
                 targets: str | Sequence[str] | None = None, types: Sequence[type] | None = None,
                 alpha: float | None = None, min_rank: int = 0):
        super().__init__(targets, types)
        if int(budget) != budget or budget < 1:
            raise ValueError(f"budget must be a positive number of parameters, got {budget!r}")
        self.budget, self.scores = int(budget), dict(scores)
        self.alpha, self.min_rank = alpha, int(min_rank)
        self.ranks: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int]] = {}

    def _supports_by_name(self, layer: nn.Module) -> bool:
        return is_hf_conv1d(layer)

    def select(self, named_modules) -> list[tuple[str, nn.Module]]:
        """The layers with a positive allocated rank; allocates ``self.ranks`` over all the
        layers ``targets`` / ``types`` select."""
        chosen = super().select(named_modules)
        missing = [n for n, _ in chosen if n not in self.scores]
        if missing:
            raise ValueError(f"ContributionLoRA: no score for layers {missing[:5]}; compute scores "
                             f"for the same targets (bc.contribution_scores(..., targets=...))")
        self.shapes = {n: lora_shape(m) for n, m in chosen}
        self.ranks = allocate_ranks({n: self.scores[n] for n, _ in chosen},
                                    {n: sum(s) for n, s in self.shapes.items()}, self.budget,
                                    {n: min(s) for n, s in self.shapes.items()}, self.min_rank)
        kept = [(n, m) for n, m in chosen if self.ranks[n] > 0]
        if not kept:
            smallest = min(sum(s) for s in self.shapes.values())
            raise ValueError(f"ContributionLoRA: budget {self.budget} buys no rank-1 update "
                             f"(the cheapest costs {smallest} parameters); raise the budget")
        return kept

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        if name not in self.ranks:
            raise RuntimeError("ContributionLoRA.wrap before select: attach it with bc.Subspace.from_model")
        base = layer.base_layer if isinstance(layer, AdapterLayer) else layer
        rank = self.ranks[name]
        cls = LoRAConv if isinstance(base, CONV_TYPES) else LoRALinear
        return cls(layer, rank, float(rank) if self.alpha is None else self.alpha)

    @property
    def n_params(self) -> int:
        """Adapter parameters of the allocation, ``sum_l r_l (c0_l + c1_l prod(k_l))``."""
        return sum(r * sum(self.shapes[n]) for n, r in self.ranks.items())

    def allocation(self) -> list[dict[str, float | int | str]]:
        """One record per selected layer: ``layer``, ``score``, ``rank``, ``max_rank``, ``params``."""
        return [{"layer": n, "score": self.scores[n], "rank": r, "max_rank": min(self.shapes[n]),
                 "params": r * sum(self.shapes[n])} for n, r in self.ranks.items()]

    def __repr__(self) -> str:
        return f"ContributionLoRA(budget={self.budget}, targets={self.targets}, ranks={self.ranks})"
