r"""SWAG: a Gaussian fitted to the iterates of constant-learning-rate SGD on theta.

After ``swa_start`` epochs, snapshots ``theta_1 .. theta_K`` of the iterates are collected (once
per epoch, or every ``n`` optimiser steps). With running moments

.. math::  \bar\theta_K = \frac1K \sum_i \theta_i, \qquad
           \overline{\theta^2}_K = \frac1K \sum_i \theta_i^2,

and the deviation of each snapshot from the running mean *at its collection time*,
``D_i = theta_i - bar theta_i`` (the mean including ``theta_i``), the last ``R = rank`` of which are
kept as the columns of ``D`` (shape ``(d, min(K, R))``), the posterior is

.. math::  q(\theta) = \mathcal N\Big(\bar\theta,\; \tfrac12 \operatorname{diag}
           \big(\max(\overline{\theta^2} - \bar\theta^2, 0)\big) + \tfrac{1}{2(K'-1)} D D^\top\Big),

a :class:`~bayes_colora.posterior.LowRankGaussianPosterior` with ``diag_var`` the first term and
``factor = D / sqrt(2 (K' - 1))``, ``K'`` the number of columns actually kept (not the maximum
rank). A draw ``mu + sqrt(v) e_1 + F e_2`` is one joint draw over all of theta, so correlations
between layers are kept.

Cost: the SGD epochs themselves, plus ``O(d)`` per snapshot and ``O(d R)`` memory for ``D``.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Literal

import torch

from ..data import dataset_size
from ..likelihoods import Likelihood
from ..posterior import LowRankGaussianPosterior
from ..priors import NormalPrior
from ..subspace import Subspace
from .objective import batches, optimise


class SwagMoments:
    """Running first and second moments of the snapshots and the last ``rank`` deviations."""

    def __init__(self, d: int, rank: int, like: torch.Tensor):
        self.n = 0
        self.mean = torch.zeros(d, dtype=like.dtype, device=like.device)
        self.sq_mean = torch.zeros_like(self.mean)
        self.deviations: deque[torch.Tensor] = deque(maxlen=rank)

    def collect(self, theta: torch.Tensor) -> None:
        """Add one snapshot: update the moments, then keep ``theta - mean`` (new mean)."""
        theta = theta.detach()
        self.n += 1
        self.mean += (theta - self.mean) / self.n
        self.sq_mean += (theta ** 2 - self.sq_mean) / self.n
        self.deviations.append(theta - self.mean)

    def posterior(self, **kwargs) -> LowRankGaussianPosterior:
        """The SWAG Gaussian of the module docstring."""
        k = len(self.deviations)
        if k < 2:
            raise ValueError(f"SWAG collected {self.n} snapshot(s), it needs at least 2: train for "
                             f"more epochs after swa_start, or collect every n steps (collect=n)")
        diag_var = 0.5 * (self.sq_mean - self.mean ** 2).clamp_min(0.0)
        factor = torch.stack(list(self.deviations), dim=1) / (2.0 * (k - 1)) ** 0.5
        return LowRankGaussianPosterior(self.mean, diag_var, factor, **kwargs)


def fit_swag(sub: Subspace, loader: Iterable, lik: Likelihood, prior: NormalPrior | None = None,
             epochs: int = 10, lr: float = 1e-2, rank: int = 20,
             collect: Literal["epoch"] | int = "epoch", swa_start: int = 0,
             optimizer: Literal["sgd", "adam"] = "sgd", momentum: float = 0.9,
             bn_update: bool = False, progress: bool = True,
             n_data: int | None = None) -> LowRankGaussianPosterior:
    r"""SWAG on theta: run SGD at a constant learning rate on the objective of
    :mod:`.objective` and fit a low-rank-plus-diagonal Gaussian to its iterates (module docstring).

    Start from a trained theta (``fit_map`` first) or let the first ``swa_start`` epochs train.

    Args:
        sub: the subspace; training starts at ``sub.theta``, which is left at the SWAG mean.
        loader: iterable of ``(x, y)`` batches (or dicts with ``labels``).
        lik, prior: likelihood and prior (``None``: no prior term). A learned likelihood scale is
            trained alongside theta, as in ``fit_map``.
        epochs: total number of epochs, ``swa_start`` included.
        lr: the constant learning rate.
        rank: R, the maximum number of deviation columns kept.
        collect: ``"epoch"`` (a snapshot at the end of each epoch) or an int ``n`` (a snapshot
            every ``n`` optimiser steps).
        swa_start: the number of epochs to train before collecting.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        bn_update: after training, recompute the BatchNorm running statistics of the model at the
            SWAG mean over ``loader`` (see :func:`update_batchnorm`).
        progress: show a tqdm progress bar.
        n_data: data set size N; by default ``len(loader.dataset)`` or counted.

    Returns:
        a :class:`LowRankGaussianPosterior`; its ``history`` holds one record per epoch with the
        mean ``loss``, ``nll`` and the number of ``snapshots`` collected so far.
    """
    every = _check_collect(collect)
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if not 0 <= swa_start < epochs:
        raise ValueError(f"swa_start={swa_start} leaves no epoch to collect snapshots in "
                         f"(epochs={epochs}); choose 0 <= swa_start < epochs")
    n_data = n_data or dataset_size(loader)
    lik = lik.to(sub.device)
    theta = torch.nn.Parameter(sub.theta.clone())
    opt = _make_optimizer(optimizer, [theta, *lik.parameters()], lr, momentum)
    moments = SwagMoments(sub.dim, rank, theta)

    def on_step(epoch: int, step: int) -> None:
        if every is not None and epoch >= swa_start and step % every == 0:
            moments.collect(theta)

    def on_epoch(epoch: int, hist: list[dict[str, float]]) -> None:
        if every is None and epoch >= swa_start:
            moments.collect(theta)
        hist[-1]["snapshots"] = moments.n

    history = optimise(sub, theta, loader, lik, prior, n_data, epochs, opt, "fit_swag", progress,
                       on_step=on_step, on_epoch=on_epoch)
    post = moments.posterior(likelihood=lik, history=history)
    sub.theta = post.mean
    if bn_update:
        update_batchnorm(sub, loader)
    return post


@torch.no_grad()
def update_batchnorm(sub: Subspace, loader: Iterable) -> int:
    r"""Recompute the running mean and variance of every BatchNorm layer of ``sub.model`` at the
    current theta, as the equally weighted average of the per-batch statistics over ``loader``
    (``momentum=None`` in PyTorch's terms), then put the model back in eval mode.

    Why: ``Subspace.from_model`` freezes the base model in eval mode, so its BatchNorm layers
    normalise with the *pretrained* statistics, whatever theta is. SWAG's reference code refreshes
    the statistics because it trains every weight; here only theta moves, but an adapter placed
    before a BatchNorm layer (LoRA on a convolution, BitFit on a bias) still shifts the
    activations that layer sees, and the data may differ from the pretraining data. Refreshing
    re-estimates the statistics for the data at the SWAG mean. It changes the frozen base model
    (its buffers, not theta), and the statistics are those of the mean: samples from the
    posterior share them. Without BatchNorm layers this does nothing.

    Returns:
        the number of BatchNorm layers updated.
    """
    norms = [m for m in sub.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for _, x, _ in batches(loader, sub.device):
            sub(x)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
            m.eval()
    if int(norms[0].num_batches_tracked) == 0:
        raise ValueError("the loader is empty: it yields no batch; check the dataset and batch size")
    return len(norms)


def _check_collect(collect: str | int) -> int | None:
    """``None`` for once per epoch, else the number of steps between snapshots."""
    if collect == "epoch":
        return None
    if isinstance(collect, int) and not isinstance(collect, bool) and collect >= 1:
        return collect
    raise ValueError(f"collect must be 'epoch' or a positive int (steps between snapshots), "
                     f"got {collect!r}")


def _make_optimizer(name: str, params: list[torch.Tensor], lr: float,
                    momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'")
