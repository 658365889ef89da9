r"""Variational inference on theta with Pyro's SVI.

The model is

.. math::  \theta \sim \mathcal N(0, s^2 I_d), \qquad
           p(D \mid \theta)^{1/T} = \exp\Big(\tfrac1T \sum_i \log p(y_i \mid f(x_i; \theta))\Big),

with the likelihood term inside a subsampled ``pyro.plate("data", N, subsample_size=B)``, so
each minibatch term is scaled by ``N / B`` and the ELBO

.. math::  \mathcal L(q) = \mathbb E_q\big[\tfrac1T \log p(D \mid \theta)
           + \log p(\theta) - \log q(\theta)\big]

is estimated without bias. The guide ``q`` is Pyro's ``AutoNormal`` (``"diag"``:
``N(m, diag(s^2))``), ``AutoLowRankMultivariateNormal`` (``"lowrank"``:
``N(m, W W^T + diag(s^2))``) or ``AutoMultivariateNormal`` (``"full"``: ``N(m, L L^T)``),
started at the current ``sub.theta`` with a small scale. With ``num_particles = S > 1`` the S
particles are drawn as one ``(S, d)`` batch and evaluated in one vectorised call
``sub(x, theta=T)``.

Cost per step: ``S`` forward and backward passes of a minibatch (batched), plus
``O(d)`` (diag), ``O(d r)`` (lowrank) or ``O(d^2)`` memory and ``O(d^2 S)`` time (full) for the guide.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Literal

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (AutoLowRankMultivariateNormal, AutoMultivariateNormal,
                                  AutoNormal, init_to_value)
from tqdm.auto import tqdm

from ..data import batch_size, dataset_size
from ..likelihoods import Likelihood
from ..posterior import DiagGaussianPosterior, GaussianPosterior, LowRankGaussianPosterior, Posterior
from ..priors import NormalPrior
from ..subspace import Subspace
from .objective import batches

GUIDES = ("diag", "lowrank", "full")


def make_model(sub: Subspace, lik: Likelihood, prior: NormalPrior, n_data: int,
               temperature: float = 1.0) -> Callable[[Any, torch.Tensor], None]:
    r"""The Pyro model ``model(x, y)`` of the module docstring for one minibatch ``(x, y)``.

    ``theta`` is one site of shape ``(d,)``; under Pyro's vectorised particle plate it arrives as
    ``(S, 1, d)`` (the plate sits left of the data plate), is flattened to ``(S, d)`` for the
    vectorised forward, and the per-example log-likelihood of shape ``(S, B)`` lines up with the
    plates (particles at dim -2, data at dim -1).
    """
    d = sub.dim
    scale = prior.scale.to(device=sub.device, dtype=sub.dtype).expand(d)
    loc = torch.zeros(d, device=sub.device, dtype=sub.dtype)

    def model(x: Any, y: torch.Tensor) -> None:
        theta = pyro.sample("theta", dist.Normal(loc, scale).to_event(1))
        thetas = theta.reshape(-1, d) if theta.dim() > 1 else theta
        out = sub(x, theta=thetas)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        log_lik = lik.log_prob(out, y)                       # (B,) or (S, B)
        with pyro.plate("data", n_data, subsample_size=batch_size(x), dim=-1):
            pyro.factor("log_lik", log_lik / temperature)

    return model


def make_guide(model: Callable, kind: str, theta0: torch.Tensor, init_scale: float,
               rank: int | None) -> pyro.nn.PyroModule:
    """The autoguide named by ``kind``, its mean started at ``theta0``."""
    init = init_to_value(values={"theta": theta0})
    if kind == "diag":
        return AutoNormal(model, init_loc_fn=init, init_scale=init_scale)
    if kind == "lowrank":
        return AutoLowRankMultivariateNormal(model, init_loc_fn=init, init_scale=init_scale, rank=rank)
    if kind == "full":
        return AutoMultivariateNormal(model, init_loc_fn=init, init_scale=init_scale)
    raise ValueError(f"unknown guide {kind!r}; choose one of {', '.join(GUIDES)}")


def guide_posterior(guide: pyro.nn.PyroModule, **kwargs: Any) -> Posterior:
    r"""The guide's learned Gaussian as a posterior over theta.

    ``AutoNormal``: ``loc``, ``scale`` -> :class:`DiagGaussianPosterior`.
    ``AutoLowRankMultivariateNormal``: Pyro parameterises ``N(loc, (s W)(s W)^T + diag(s^2))``
    (``W = cov_factor``, ``s = scale``) -> :class:`LowRankGaussianPosterior` with
    ``factor = s W`` and ``diag_var = s^2``.
    ``AutoMultivariateNormal``: ``scale_tril = diag(s) L`` -> :class:`GaussianPosterior`.
    Theta is unconstrained and the only latent site, so guide space is theta space.
    """
    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            loc, scale = guide._get_loc_and_scale("theta")
            return DiagGaussianPosterior(loc, scale, **kwargs)
        q = guide.get_posterior()
        if isinstance(guide, AutoLowRankMultivariateNormal):
            return LowRankGaussianPosterior(q.loc, q.cov_diag, q.cov_factor, **kwargs)
        return GaussianPosterior(q.loc, q.scale_tril, **kwargs)


def fit_vi(sub: Subspace, loader: Iterable, lik: Likelihood, prior: NormalPrior,
           guide: Literal["diag", "lowrank", "full"] = "diag", steps: int = 2000, lr: float = 1e-2,
           num_particles: int = 1, rank: int | None = None, init_scale: float = 1e-2,
           lr_decay: float = 1.0,
           temperature: float = 1.0, progress: bool = True, n_data: int | None = None,
           record_every: int = 1) -> Posterior:
    r"""Fit a Gaussian ``q(theta)`` by maximising the ELBO of the module docstring with Adam.

    Args:
        sub: the subspace; the guide's mean starts at ``sub.theta`` (run ``fit_map`` first for a
            good start) and ``sub.theta`` is left at the fitted mean.
        loader: iterable of ``(x, y)`` batches, cycled for ``steps`` steps.
        lik: the likelihood; a learned scale is held at its current value.
        prior: the Gaussian prior on theta (VI needs a proper prior).
        guide: ``"diag"``, ``"lowrank"`` or ``"full"``.
        steps: number of SVI steps (minibatches).
        lr: Adam learning rate for the guide's parameters.
        num_particles: S, Monte Carlo samples per step, evaluated in one vectorised call.
        rank: rank of the ``"lowrank"`` guide (default ``min(d, 10)``).
        init_scale: the guide's initial standard deviation.
        lr_decay: the learning rate is multiplied by this every step (1.0: constant); a decay
            to a small final rate removes most of the stochastic-gradient jitter of the result.
        temperature: T; the likelihood is tempered as ``log p(D | theta) / T``.
        progress: show a tqdm progress bar.
        n_data: data set size N; by default ``len(loader.dataset)`` or counted.
        record_every: keep one history record every this many steps.

    Returns:
        :class:`DiagGaussianPosterior`, :class:`LowRankGaussianPosterior` or
        :class:`GaussianPosterior`; ``history`` holds ``{"step", "elbo"}`` records (the
        single-minibatch ELBO estimate, scaled to the whole data set).
    """
    if guide not in GUIDES:
        raise ValueError(f"unknown guide {guide!r}; choose one of {', '.join(GUIDES)}")
    if prior is None:
        raise ValueError("fit_vi needs a proper prior, e.g. prior=bc.NormalPrior(1.0)")
    if num_particles < 1 or steps < 1 or temperature <= 0:
        raise ValueError(f"need num_particles >= 1, steps >= 1 and temperature > 0; got "
                         f"{num_particles}, {steps}, {temperature}")
    n_data = n_data or dataset_size(loader)
    rank = rank or min(sub.dim, 10)
    lik = lik.to(sub.device)
    pyro.clear_param_store()
    model = make_model(sub, lik, prior, n_data, temperature)
    q = make_guide(model, guide, sub.theta.clone(), init_scale, rank)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                      max_plate_nesting=1)
    svi = SVI(model, q, pyro.optim.ClippedAdam({"lr": lr, "lrd": lr_decay, "clip_norm": float("inf")}), loss=elbo)
    history = []
    stream = cycle_batches(loader, sub.device)
    for step in tqdm(range(steps), desc="fit_vi", disable=not progress, unit="step"):
        x, y = next(stream)
        loss = svi.step(x, y)
        if loss != loss or abs(loss) == float("inf"):
            raise ValueError(f"step {step}: the ELBO is not finite; lower lr or init_scale, or "
                             f"check the data and the likelihood's scale")
        if step % record_every == 0 or step == steps - 1:
            history.append({"step": step + 1, "elbo": -loss})
    post = guide_posterior(q, likelihood=lik, history=history)
    sub.theta = post.mean.to(sub.dtype)
    return post


def cycle_batches(loader: Iterable, device: torch.device) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(x, y)`` batches on ``device``, starting the loader again whenever it runs out."""
    while True:
        empty = True
        for _, x, y in batches(loader, device):
            empty = False
            yield x, y
        if empty:
            raise ValueError("the loader is empty: it yields no batch; check the dataset and batch size")
