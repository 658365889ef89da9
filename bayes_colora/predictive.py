r"""Posterior x Subspace -> Predictive: predictive mean and variances per output element.

With samples ``theta_s ~ q(theta)``, ``s = 1..S``, evaluated in one vectorised call
``sub(x, theta=T)``, the likelihood's ``moments`` split the predictive variance by the law of
total variance: ``total = aleatoric (E_s Var[y | theta_s]) + epistemic (Var_s E[y | theta_s])``.
A Dirac posterior needs one evaluation and has epistemic variance exactly 0.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .data import to_device
from .likelihoods import Likelihood
from .linearized import linearized_outputs
from .posterior import Posterior
from .subspace import Subspace


@dataclass
class Predictive:
    """Per-output-element predictive moments; variances, not standard deviations.

    ``mean``, ``aleatoric``, ``epistemic``, ``total`` have the prediction's shape (for
    classification, ``(B, C, ...)`` class probabilities and their Bernoulli variances);
    classification adds ``probs``, ``entropy`` and ``mutual_info`` (``(B, ...)``).
    ``outputs`` holds the raw network outputs at the samples, ``(S, B, ...)``, when kept.
    """

    mean: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor
    total: torch.Tensor
    probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mutual_info: torch.Tensor | None = None
    outputs: torch.Tensor | None = None

    @property
    def std(self) -> torch.Tensor:
        """Total predictive standard deviation."""
        return self.total.sqrt()

    def to(self, device: torch.device | str) -> "Predictive":
        return Predictive(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                             for f in fields(self)})


@torch.no_grad()
def predict(sub: Subspace, post: Posterior, x: Any, n_samples: int = 32,
            likelihood: Likelihood | None = None, generator: torch.Generator | None = None,
            chunk_size: int | str | None = None, keep_outputs: bool = False,
            linearized: bool = False) -> Predictive:
    """Predictive moments of ``y`` at inputs ``x`` under posterior ``post``.

    Args:
        sub: the subspace the posterior lives on.
        post: any posterior; a Dirac posterior is evaluated once.
        x: inputs (tensor, dict of tensors, tuple), one batch.
        n_samples: S, the number of posterior samples.
        likelihood: defaults to the one the posterior was fitted with.
        generator: for reproducible samples.
        chunk_size: evaluate at most this many samples at once (memory), or ``"auto"``: the
            fastest chunking, measured on the first call with these shapes (:mod:`.chunking`).
        keep_outputs: keep the ``(S, B, ...)`` raw outputs in ``Predictive.outputs``.
        linearized: evaluate the linearised (GLM) model ``f(x; mean) + J (theta_s - mean)`` at
            each sample, by Jacobian-vector products (see :mod:`.linearized`); the natural
            predictive for a Laplace posterior. For a symmetric (Gaussian) posterior the samples
            are antithetic pairs ``mean +- delta`` (``ceil(S / 2)`` draws), so the linearised
            outputs average to ``f(x; mean)`` exactly when ``S`` is even: the predictive mean
            carries no Monte-Carlo noise, and the spread is estimated without bias.
    """
    lik = likelihood or post.likelihood
    if lik is None:
        raise ValueError("this posterior carries no likelihood; pass likelihood=bc.Gaussian(...) "
                         "or bc.Categorical()")
    if post.dim != sub.dim:
        raise ValueError(f"the posterior is over {post.dim} parameters, the subspace has {sub.dim}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    lik = lik.to(sub.device)
    x = to_device(x, sub.device)
    if post.is_point_mass:
        thetas = post.mean[None]
    elif linearized and post.is_symmetric:
        delta = post.sample((n_samples + 1) // 2, generator=generator) - post.mean
        thetas = (post.mean + torch.cat([delta, -delta]))[:n_samples]
    else:
        thetas = post.sample(n_samples, generator=generator)
    thetas = thetas.to(sub.device, sub.dtype)
    if linearized and not post.is_point_mass:
        outs = linearized_outputs(sub, post.mean.to(thetas), thetas, x, chunk_size).float()
    else:
        outs = sub(x, theta=thetas, chunk_size=chunk_size).float()
    moments = lik.moments(outs)
    return Predictive(**moments, outputs=outs if keep_outputs else None)
