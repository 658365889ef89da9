r"""A subspace whose output is exactly linear in theta, and its closed-form posterior.

Model: a frozen identity ``Linear(d, d)`` wrapped by DiffFit (``h = (1 + g) * x``), then a frozen
``Linear(d, 1)`` of ones, so ``f(x; g) = sum_j x_j + x^T g``: linear in ``theta = g`` with
features ``X`` and offset ``X 1``. With ``y = f(x; theta*) + sigma eps`` and prior
``N(0, s^2 I)`` the posterior is ``N(mu, Sigma)``,
``Sigma = (X^T X / sigma^2 + I / s^2)^{-1}``, ``mu = Sigma X^T (y - X 1) / sigma^2``.
Everything is float64.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayes_colora as bc


def linear_subspace(d: int) -> bc.Subspace:
    first = nn.Linear(d, d, bias=False).double()
    last = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        first.weight.copy_(torch.eye(d, dtype=torch.float64))
        last.weight.fill_(1.0)
    return bc.Subspace.from_model(nn.Sequential(first, last), bc.DiffFit(targets=r"^0$"))


def linear_data(n: int, d: int, sigma: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X, y, theta*)`` with ``y`` of shape ``(n, 1)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    theta_star = torch.randn(d, generator=g, dtype=torch.float64)
    y = x.sum(1, keepdim=True) + x @ theta_star[:, None] + sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y, theta_star


def exact_posterior(x: torch.Tensor, y: torch.Tensor, sigma: float,
                    prior_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, Sigma)`` of the module docstring."""
    d = x.shape[1]
    precision = x.T @ x / sigma ** 2 + torch.eye(d, dtype=x.dtype) / prior_scale ** 2
    cov = torch.linalg.inv(precision)
    mu = cov @ x.T @ (y[:, 0] - x.sum(1)) / sigma ** 2
    return mu, cov


def loader(x: torch.Tensor, y: torch.Tensor, batch: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0) if shuffle else None)
