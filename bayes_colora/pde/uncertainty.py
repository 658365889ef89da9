r"""Posterior uncertainty on the online coordinates.

The online coordinates ``alpha`` (``d`` numbers, e.g. 7) are a tiny subspace, so the package's
engines apply to them directly. At one time ``t`` and a new parameter ``mu`` the reduced model's
prediction is ``alpha_ref = h(t, mu)`` (data-driven) or the Neural Galerkin state. Given ``m``
noisy point observations ``y_j = u(x_j, t) + e_j`` (sensors), ``e_j ~ N(0, sigma^2)``,

.. math::  \alpha = \alpha_{\mathrm{ref}} + \theta, \qquad \theta \sim N(0, s^2 I), \qquad
           y_j \mid \theta \sim N\big(u(x_j; \alpha_{\mathrm{ref}} + \theta), \sigma^2\big),

so the prior is centred at the reduced model's prediction (``alpha_ref`` is the continuous LoRA
layers' reference buffer, and ``theta`` the subspace of :class:`~.model.ReducedModel`). The
posterior of ``theta`` comes from ``bc.fit_laplace`` (after ``bc.fit_map``), ``bc.fit_vi`` or
``bc.fit_nuts`` (basis: the identity, ``d <= 20``), and ``bc.predict`` pushes it through the
network to a predictive mean and variance of the whole field.

The adapter parameters can carry the uncertainty too: :func:`factor_subspace` makes theta the
continuous LoRA factors ``A``, ``B`` of every layer (trained offline; the hypernetwork still
supplies ``alpha``), on a model whose input is ``(x, tmu)``. :func:`factor_laplace` fits a
full-GGN Laplace approximation at the offline values on training snapshots (in float64: the GGN
of thousands of snapshot points spans many orders of magnitude), and ``bc.predict(fsub, post,
(x, tmu), linearized=True)`` then gives predictive bands at new ``mu`` without any sensor.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch

from ..adapters.continuous import continuous_layers, set_alpha_reference
from ..inference import fit_laplace, fit_map, fit_nuts, fit_vi
from ..likelihoods import Gaussian
from ..posterior import Posterior
from ..predictive import Predictive, predict
from ..priors import NormalPrior
from ..subspace import Subspace
from .data import Snapshots
from .model import ReducedModel

METHODS = ("laplace", "vi", "nuts")


@contextlib.contextmanager
def alpha_reference(sub: Subspace, alpha_ref: torch.Tensor) -> Iterator[Subspace]:
    """Within the block, theta = 0 of ``sub`` means ``alpha = alpha_ref`` (``(d,)``); theta is
    set to 0 on entry, and the reference and theta are restored to their values on exit."""
    if alpha_ref.shape != (sub.dim,):
        raise ValueError(f"alpha_ref has shape {tuple(alpha_ref.shape)}, expected ({sub.dim},)")
    old_theta = sub.theta
    set_alpha_reference(sub.model, alpha_ref.detach().to(sub.device, sub.dtype))
    sub.theta = torch.zeros_like(old_theta)
    try:
        yield sub
    finally:
        set_alpha_reference(sub.model, torch.zeros_like(old_theta))
        sub.theta = old_theta


def sensor_posterior(sub: Subspace, alpha_ref: torch.Tensor, x_obs: torch.Tensor, y_obs: torch.Tensor,
                     x_eval: torch.Tensor, sigma: float, method: str = "laplace",
                     prior_scale: float | None = None, map_steps: int = 300, lr: float = 1e-2,
                     n_samples: int = 64, generator: torch.Generator | None = None,
                     **engine: Any) -> tuple[Posterior, Predictive]:
    """Posterior of ``theta = alpha - alpha_ref`` from sensor data, and the field's predictive.

    Args:
        sub: the reduced model's subspace (theta = online coordinates).
        alpha_ref: ``(d,)``, the prior centre (reduced model prediction).
        x_obs, y_obs: ``(m, D)`` sensor positions and ``(m, Q)`` noisy values.
        x_eval: ``(N, D)`` points for the predictive.
        sigma: observation noise standard deviation (fixed).
        method: ``"laplace"`` (MAP then full-GGN Laplace; ``prior_scale=None`` tunes the prior by
            the marginal likelihood), ``"vi"`` (full-covariance Gaussian) or ``"nuts"``.
        prior_scale: ``s``; required for ``"vi"`` and ``"nuts"``.
        map_steps, lr: the MAP fit (Adam steps on the single batch of sensors).
        n_samples: posterior samples for the predictive.
        engine: extra keyword arguments for the engine (``steps``, ``num_samples``, ``warmup``...).

    Returns:
        the posterior (over theta) and the predictive at ``x_eval`` (``(N, Q)`` moments; the
        Laplace posterior uses the linearised predictive).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if x_obs.shape[0] != y_obs.shape[0] or y_obs.dim() != 2:
        raise ValueError(f"x_obs {tuple(x_obs.shape)} and y_obs {tuple(y_obs.shape)} must be (m, D) "
                         f"and (m, Q) with the same m")
    if method != "laplace" and prior_scale is None:
        raise ValueError(f"method {method!r} needs a prior_scale (e.g. the one Laplace tuned)")
    loader = [(x_obs.to(sub.device), y_obs.to(sub.device))]
    lik = Gaussian(sigma=sigma)
    with alpha_reference(sub, alpha_ref):
        prior = NormalPrior(prior_scale if prior_scale is not None else 1.0)
        if method == "laplace":
            fit_map(sub, loader, lik, prior, epochs=map_steps, lr=lr, progress=False)
            post = fit_laplace(sub, loader, lik, prior, hessian="full", backend="jvp",
                               tune_prior="marglik" if prior_scale is None else None, progress=False)
        elif method == "vi":
            post = fit_vi(sub, loader, lik, prior, guide="full", progress=False, **engine)
        else:
            basis = torch.eye(sub.dim, device=sub.device, dtype=sub.dtype)
            post = fit_nuts(sub, loader, lik, prior, basis=basis, progress=False, **engine)
        pred = predict(sub, post, x_eval.to(sub.device), n_samples=n_samples,
                       linearized=method == "laplace", generator=generator)
    return post, pred


def factor_subspace(model: ReducedModel) -> Subspace:
    """A subspace of ``model`` (``forward((x, tmu))``) whose theta is every continuous LoRA layer's
    ``A`` and ``B``; everything else, the alphas included, is frozen. Changes ``requires_grad``
    flags of ``model``: build it on a copy (as :func:`factor_laplace` does)."""
    factors = {id(t) for layer in continuous_layers(model).values() for t in (layer.lora_A, layer.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in factors)
    return Subspace(model, list(model.sub.specs))


def factor_laplace(model: ReducedModel, data: Snapshots, sigma: float, max_snapshots: int = 64,
                   n_points: int | None = 1024, batch: int = 8, chunk_size: int = 16, seed: int = 0,
                   progress: bool = True) -> tuple[Subspace, Posterior]:
    """Laplace approximation over the continuous LoRA factors, at their offline values.

    Args:
        model: the trained reduced model (not changed: a float64 copy is used).
        data: training snapshots; the GGN uses at most ``max_snapshots`` of them (evenly spaced)
            and ``n_points`` random points (``None``: all). Less data gives a broader, more
            conservative posterior than the full set would.
        sigma: the Gaussian noise scale of the snapshots (e.g. the RMS training error).
        batch, chunk_size: snapshots per GGN batch and tangents per JVP call (memory).

    Returns:
        the float64 factor subspace and its :class:`GaussianPosterior` (prior precision by the
        marginal likelihood).
    """
    m64 = copy.deepcopy(model).double()
    fsub = factor_subspace(m64)
    gen = torch.Generator().manual_seed(seed)
    snaps = torch.linspace(0, data.u.shape[0] - 1, min(max_snapshots, data.u.shape[0])).round().long()
    pts = torch.arange(data.x.shape[0]) if n_points is None or n_points >= data.x.shape[0] else \
        torch.randperm(data.x.shape[0], generator=gen)[:n_points]
    snaps, pts = snaps.to(data.u.device), pts.to(data.u.device)
    x, u, tmu = data.x[pts].double(), data.u[snaps][:, pts].double(), data.tmu[snaps].double()
    loader = [((x, tmu[i:i + batch]), u[i:i + batch]) for i in range(0, u.shape[0], batch)]
    post = fit_laplace(fsub, loader, Gaussian(sigma=sigma), NormalPrior(1.0), hessian="full",
                       tune_prior="marglik", chunk_size=chunk_size, backend="jvp", progress=progress)
    return fsub, post
