r"""NUTS on a k-dimensional affine slice of theta (subspace inference).

``theta = theta_0 + P z`` with a basis ``P`` of shape ``(d, k)`` and ``z`` in R^k. Pyro's NUTS
samples ``z`` from

.. math::  \log p(z \mid D) = \tfrac1T \sum_{i} \log p(y_i \mid f(x_i; \theta_0 + P z))
           + \log p_z(z) + \text{const},

with the full-batch likelihood (or that of a fixed subset of batches, scaled by ``N / n``: a
minibatch changing between steps would break the sampler's detailed balance). The prior on
``z`` is either the prior of theta restricted to the slice, ``log p_theta(theta_0 + P z)``
(``z_scale=None``: a Gaussian in ``z`` with precision ``P^T P / s^2``, proper when ``P`` has full
column rank), or ``N(0, z_scale^2 I_k)``.

Cost: every leapfrog step is a forward and backward pass over the cached data (``O(N)`` each,
up to ``2^max_tree_depth`` steps per sample), plus ``O(d k)`` for ``P z``; memory holds the
cached batches and ``P``.

Bases: :func:`pca_basis` (principal directions of a SWAG / low-rank posterior, as in
Izmailov et al., "Subspace inference for Bayesian deep learning", 2019) and
:func:`random_basis`.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from pyro.infer.mcmc import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from ..data import batch_size, dataset_size
from ..likelihoods import Likelihood
from ..posterior import Posterior, SamplePosterior
from ..priors import NormalPrior
from ..subspace import Subspace
from .objective import batches


def pca_basis(post: Posterior, k: int) -> torch.Tensor:
    r"""The top ``k`` principal directions of a low-rank posterior's factor, scaled.

    With the thin SVD ``F = U S V^T`` of ``post.factor`` (``(d, K)``; for SWAG
    ``F = D / sqrt(2 (K - 1))``), returns ``P = U[:, :k] S[:k]``: orthogonal columns whose lengths
    are the standard deviations of the low-rank part along each direction. ``z ~ N(0, I)``
    then reproduces the top-k low-rank covariance ``P P^T``, which is why ``fit_nuts`` works well
    on this basis with a unit ``z_scale``.

    Raises:
        ValueError: ``post`` has no low-rank factor, or ``k`` exceeds its numerical rank.
    """
    factor = getattr(post, "factor", None)
    if factor is None:
        raise ValueError(f"pca_basis needs a low-rank posterior (fit_swag, or fit_vi with "
                         f"guide='lowrank'); got {type(post).__name__}")
    u, s, _ = torch.linalg.svd(factor, full_matrices=False)
    tol = s.max() * max(factor.shape) * torch.finfo(factor.dtype).eps if s.numel() else 0.0
    rank = int((s > tol).sum())
    if not 1 <= k <= rank:
        raise ValueError(f"k={k} must be between 1 and the rank {rank} of the posterior's "
                         f"low-rank factor (shape {tuple(factor.shape)}); collect more SWAG "
                         f"snapshots (a larger rank=) or choose a smaller k")
    return u[:, :k] * s[:k]


def random_basis(d: int, k: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """A ``(d, k)`` basis with orthonormal columns spanning a uniformly random k-dim subspace
    (QR of a Gaussian matrix, signs fixed so the result is unique)."""
    if not 1 <= k <= d:
        raise ValueError(f"need 1 <= k <= d for a basis, got k={k}, d={d}")
    gen_device = generator.device if generator is not None else device
    g = torch.randn(d, k, generator=generator, dtype=dtype, device=gen_device)
    q, r = torch.linalg.qr(g)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q)
    return q.to(device) if device is not None else q


def fit_nuts(sub: Subspace, loader: Iterable, lik: Likelihood, prior: NormalPrior | None,
             basis: torch.Tensor, theta0: torch.Tensor | None = None, num_samples: int = 500,
             warmup: int = 500, num_chains: int = 1, temperature: float = 1.0,
             max_batches: int | None = None, z_scale: float | None = None,
             max_tree_depth: int = 8, progress: bool = True,
             n_data: int | None = None) -> SamplePosterior:
    r"""Sample ``theta = theta0 + P z`` with NUTS on ``z`` (module docstring).

    Args:
        sub: the subspace (``sub.theta`` is not changed).
        loader: iterable of ``(x, y)`` batches; read once and kept on ``sub.device``.
        lik: the likelihood (a learned scale is held at its current value).
        prior: the prior on theta, restricted to the slice when ``z_scale`` is ``None``.
        basis: ``P``, shape ``(d, k)``, e.g. :func:`pca_basis` or :func:`random_basis`.
        theta0: the slice's origin, default ``sub.theta``.
        num_samples, warmup: kept samples and warm-up (adaptation) steps per chain.
        num_chains: chains, run one after another from ``z = 0``.
        temperature: T; the likelihood is tempered as ``log p(D | theta) / T``.
        max_batches: use only the first this many batches (a fixed subset; the log-likelihood
            is scaled by ``N / n`` to stand in for the full data set).
        z_scale: ``None`` (prior of theta on the slice) or the scale of ``z ~ N(0, z_scale^2 I)``.
        max_tree_depth: NUTS's maximum tree depth.
        progress: show Pyro's progress bar.
        n_data: data set size N; by default ``len(loader.dataset)`` or counted.

    Returns:
        a :class:`SamplePosterior` of the ``num_chains * num_samples`` theta samples; its ``r_hat``
        (split Gelman-Rubin) and ``ess`` (effective sample size over all chains) are per
        coordinate of ``z``, shape ``(k,)``; ``history`` holds one record per chain with its
        number of divergent transitions, acceptance rate and adapted step size.
    """
    d = sub.dim
    if not (isinstance(basis, torch.Tensor) and basis.dim() == 2 and basis.shape[0] == d):
        got = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
        raise ValueError(f"basis has shape {got}, expected (d, k) = ({d}, k) for this subspace: "
                         f"one column of length d = sub.dim per direction")
    if prior is None and z_scale is None:
        raise ValueError("fit_nuts needs a prior on theta or a z_scale for the prior on z")
    if num_samples < 1 or num_chains < 1 or warmup < 0 or temperature <= 0:
        raise ValueError(f"need num_samples >= 1, num_chains >= 1, warmup >= 0 and "
                         f"temperature > 0; got {num_samples}, {num_chains}, {warmup}, {temperature}")
    n_data = n_data or dataset_size(loader)
    lik = lik.to(sub.device)
    basis = basis.to(device=sub.device, dtype=sub.dtype)
    theta0 = (sub.theta if theta0 is None else theta0).to(device=sub.device, dtype=sub.dtype)
    data = cached_batches(loader, sub.device, max_batches)
    n_used = sum(batch_size(x) for x, _ in data)
    potential = make_potential(sub, lik, prior, data, basis, theta0, n_data / n_used,
                               temperature, z_scale)
    k = basis.shape[1]
    chains, history = [], []
    for chain in range(num_chains):
        kernel = NUTS(potential_fn=potential, adapt_step_size=True, adapt_mass_matrix=True,
                      max_tree_depth=max_tree_depth)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup,
                    initial_params={"z": torch.zeros(k, device=sub.device, dtype=sub.dtype)},
                    disable_progbar=not progress)
        mcmc.run()
        chains.append(mcmc.get_samples()["z"].detach())
        info = mcmc.diagnostics()
        history.append({"chain": chain + 1, "samples": num_samples,
                        "divergences": len(info["divergences"]["chain 0"]),
                        "acceptance_rate": float(info["acceptance rate"]["chain 0"]),
                        "step_size": float(kernel.step_size)})
    z = torch.stack(chains)                                 # (chains, samples, k)
    r_hat = split_gelman_rubin(z, chain_dim=0, sample_dim=1) if num_samples >= 4 else \
        torch.full((k,), float("nan"), dtype=z.dtype)
    ess = effective_sample_size(z, chain_dim=0, sample_dim=1)
    samples = theta0 + z.reshape(-1, k) @ basis.mT
    return SamplePosterior(samples, r_hat=r_hat, ess=ess, likelihood=lik, history=history)


def make_potential(sub: Subspace, lik: Likelihood, prior: NormalPrior | None,
                   data: list[tuple[Any, torch.Tensor]], basis: torch.Tensor, theta0: torch.Tensor,
                   lik_scale: float, temperature: float, z_scale: float | None):
    """``U(z) = -log p(z | D)`` up to a constant, as Pyro's ``potential_fn`` (a dict ``{"z": z}``)."""

    def potential(params: dict[str, torch.Tensor]) -> torch.Tensor:
        z = params["z"]
        theta = theta0 + basis @ z
        log_lik = sum(lik.log_prob(_upcast(sub(x, theta=theta)), y).sum() for x, y in data)
        log_prior = (prior.log_prob(theta) if z_scale is None
                     else -0.5 * (z / z_scale).pow(2).sum())
        return -(lik_scale * log_lik / temperature + log_prior)

    return potential


def cached_batches(loader: Iterable, device: torch.device,
                   max_batches: int | None) -> list[tuple[Any, torch.Tensor]]:
    """The first ``max_batches`` batches (all by default) as a list on ``device``."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1 (or None for all), got {max_batches}")
    data = []
    for i, x, y in batches(loader, device):
        if max_batches is not None and i >= max_batches:
            break
        data.append((x, y))
    if not data:
        raise ValueError("the loader is empty: it yields no batch; check the dataset and batch size")
    return data


def _upcast(out: torch.Tensor) -> torch.Tensor:
    return out.to(torch.promote_types(out.dtype, torch.float32))
