r"""Generalised Gauss-Newton curvature of the data term, in theta-space, from JVPs and VJPs.

For a batch with network output ``f = f(x; theta)`` (shape ``(B, ...)``, all of it read as one
vector of ``n = B x outputs`` entries) and Jacobian ``J = df / dtheta`` (``n x d``),

.. math::  G = J^T \Lambda J, \qquad \Lambda = -\frac{\partial^2 \log p(y \mid f)}{\partial f^2},

summed over batches. ``Lambda`` is block-diagonal per example: ``1 / sigma^2`` per element for a
Gaussian; for a heteroscedastic Gaussian with outputs ``(mu, eta = log var)`` the Fisher
``diag(1 / var, 1 / 2)`` (the expected Hessian, PSD; without the ``1 / 2`` block the log-variance
head would be constrained by the prior alone and its predictive variance would explode); for a
Categorical ``diag(p) - p p^T`` over the class axis (axis 1).

``J`` is never formed. One batch is *linearised* once (``torch.func.vjp`` keeps its graph), and
then, for a chunk of ``c`` tangent vectors ``V`` (``c x d``):

* ``J V``   via ``torch.func.jvp`` under ``vmap``: a ``(c, B, ...)`` tensor;
* ``J^T U`` via the kept VJP under ``vmap``: ``(c, d)``;
* ``G V = J^T (Lambda (J V))``: both.

The dense ``G`` (:func:`ggn_full`) of a batch whose Jacobian fits a memory budget is instead
``J^T (Lambda J)`` from ``d`` JVPs and one matrix product, without the VJPs.

Memory therefore grows with ``c x B x outputs`` (plus the activations of ``c`` forward-mode
passes), never with ``B x outputs x d``. Cost per batch: one JVP and one VJP per column for ``G V``,
one JVP per column for ``diag(G)``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.func import grad, jvp, vjp, vmap
from tqdm.auto import tqdm

from ..likelihoods import Categorical, Gaussian, Likelihood
from ..subspace import Subspace
from .objective import batches


def output_precision(lik: Likelihood, out: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Lambda(out) v`` for one output-shaped ``v`` (``out`` detached, shape ``(B, ...)``).

    Built in for ``Gaussian`` and ``Categorical``; a likelihood may define its own
    ``output_precision(out, y, v)``; otherwise the exact output Hessian of ``-log p(y | out)`` is
    applied (a Hessian-vector product; PSD for log-concave likelihoods, e.g. masked Gaussians).
    """
    if hasattr(lik, "output_precision"):
        return lik.output_precision(out, y, v)
    if isinstance(lik, Categorical):
        p = out.softmax(dim=1)
        pv = p * v
        return pv - p * pv.sum(1, keepdim=True)
    if isinstance(lik, Gaussian):
        if lik.heteroscedastic:
            v_mean, v_logvar = v.chunk(2, dim=lik.dim)
            return torch.cat([v_mean / lik.split(out)[1], 0.5 * v_logvar], dim=lik.dim)
        return v / (lik.sigma ** 2).to(v)
    neg_grad = grad(lambda o: -lik.log_prob(o, y).sum())
    return jvp(neg_grad, (out,), (v,))[1]


def output_precision_sqrt(lik: Likelihood, out: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    r"""``L z`` with ``L L^T = Lambda(out)``: for a Categorical ``L = diag(sqrt p) - p sqrt(p)^T``
    (``L L^T = diag(p) - p p^T`` because ``sum p = 1``); for a Gaussian ``1 / sigma``; a likelihood
    may define its own ``output_precision_sqrt(out, y, z)``."""
    if hasattr(lik, "output_precision_sqrt"):
        return lik.output_precision_sqrt(out, y, z)
    if isinstance(lik, Categorical):
        p = out.softmax(dim=1)
        sp = p.sqrt()
        return sp * z - p * (sp * z).sum(1, keepdim=True)
    if isinstance(lik, Gaussian):
        if lik.heteroscedastic:
            z_mean, z_logvar = z.chunk(2, dim=lik.dim)
            return torch.cat([z_mean / lik.split(out)[1].sqrt(), z_logvar / 2 ** 0.5], dim=lik.dim)
        return z / lik.sigma.to(z)
    raise TypeError(f"diag_probes needs a square root of the output Hessian, known for bc.Gaussian "
                    f"and bc.Categorical, not {type(lik).__name__}; use diag_probes=None (exact diagonal)")


class Linearisation:
    """``f(x; .)`` linearised at ``theta`` for one batch ``x``: ``out``, ``J V`` and ``J^T U``."""

    def __init__(self, sub: Subspace, x: Any, theta: torch.Tensor):
        self._f: Callable[[torch.Tensor], torch.Tensor] = lambda t: sub(x, theta=t)
        self.theta = theta
        out, self._vjp = vjp(self._f, theta)
        self.out = out.detach()

    def jvp(self, tangents: torch.Tensor) -> torch.Tensor:
        """``J v`` for each row ``v`` of ``tangents`` (``c x d``): shape ``(c, *out.shape)``."""
        return vmap(lambda v: jvp(self._f, (self.theta,), (v,))[1])(tangents)

    def vjp(self, cotangents: torch.Tensor) -> torch.Tensor:
        """``J^T u`` for each ``u`` in ``cotangents`` (``(c, *out.shape)``): shape ``(c, d)``."""
        return vmap(lambda u: self._vjp(u)[0])(cotangents)


def _passes(sub: Subspace, loader: Iterable, lik: Likelihood, theta: torch.Tensor, desc: str,
            progress: bool) -> Iterable[tuple[Linearisation, torch.Tensor, torch.Tensor]]:
    """``(linearisation, targets, log-likelihood of the batch)`` for every batch; checks the
    first target and raises on an empty loader."""
    n_batches = 0
    for i, x, y in tqdm(batches(loader, sub.device), desc=desc, disable=not progress, unit="batch"):
        lin = Linearisation(sub, x, theta)
        if i == 0:
            lik.check_target(lin.out, y)
        n_batches += 1
        yield lin, y, lik.log_prob(lin.out, y).sum()
    if n_batches == 0:
        raise ValueError("the loader is empty: it yields no batch; check the dataset and batch size")


def _chunks(d: int, chunk_size: int) -> Iterable[slice]:
    return (slice(s, min(s + chunk_size, d)) for s in range(0, d, chunk_size))


def ggn_matmul(sub: Subspace, loader: Iterable, lik: Likelihood, theta: torch.Tensor,
               vectors: torch.Tensor, chunk_size: int = 64, progress: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G V, log p(D | theta))`` for ``V`` of shape ``(d, k)``; ``V = I`` gives the full GGN."""
    rows = torch.zeros(vectors.shape[1], vectors.shape[0], dtype=theta.dtype, device=theta.device)
    log_lik = torch.zeros((), dtype=torch.float64, device=theta.device)
    vt = vectors.mT
    for lin, y, ll in _passes(sub, loader, lik, theta, "GGN", progress):
        lam = vmap(lambda u: output_precision(lik, lin.out, y, u))
        for s in _chunks(vt.shape[0], chunk_size):
            rows[s] += lin.vjp(lam(lin.jvp(vt[s]))).detach()
        log_lik += ll.detach().double()
    return rows.mT, log_lik


def ggn_full(sub: Subspace, loader: Iterable, lik: Likelihood, theta: torch.Tensor,
             chunk_size: int = 64, progress: bool = False, jacobian_budget: int = 2 ** 28,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(G, log p(D | theta))`` with ``G`` the dense ``d x d`` GGN (symmetrised).

    Per batch, when the whole Jacobian fits in ``jacobian_budget`` bytes (``2 d n`` numbers for
    ``n = B x outputs``: ``J`` and ``Lambda J``), ``J`` is formed from ``d`` JVPs (in chunks of
    ``chunk_size``) and ``G += J^T (Lambda J)`` is one matrix product: half the passes of the
    ``G V`` route, which the larger batches take (``d`` JVPs and ``d`` VJPs, memory
    ``chunk_size x n``).
    """
    d = theta.shape[0]
    g = torch.zeros(d, d, dtype=theta.dtype, device=theta.device)
    log_lik = torch.zeros((), dtype=torch.float64, device=theta.device)
    for lin, y, ll in _passes(sub, loader, lik, theta, "GGN", progress):
        lam = vmap(lambda u: output_precision(lik, lin.out, y, u))
        if 2 * d * lin.out.numel() * lin.out.element_size() <= jacobian_budget:
            jac = torch.cat([lin.jvp(_unit_rows(s, d, theta)).detach() for s in _chunks(d, chunk_size)])
            lam_jac = torch.cat([lam(jac[s]) for s in _chunks(d, chunk_size)])
            g += (jac.reshape(d, -1) @ lam_jac.reshape(d, -1).mT).to(g)
        else:
            for s in _chunks(d, chunk_size):
                g[s] += lin.vjp(lam(lin.jvp(_unit_rows(s, d, theta)))).detach()
        log_lik += ll.detach().double()
    return 0.5 * (g + g.mT), log_lik


def _unit_rows(s: slice, d: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``s`` of the ``d x d`` identity, without forming the identity."""
    rows = torch.zeros(s.stop - s.start, d, dtype=like.dtype, device=like.device)
    rows[torch.arange(rows.shape[0]), torch.arange(s.start, s.stop)] = 1.0
    return rows


def ggn_diag(sub: Subspace, loader: Iterable, lik: Likelihood, theta: torch.Tensor,
             chunk_size: int = 64, progress: bool = False, probes: int | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(diag(G), log p(D | theta))``.

    ``probes=None``: exact, ``G_kk = (J e_k)^T Lambda (J e_k)`` from ``d`` JVPs per batch.
    ``probes=m``: unbiased Monte-Carlo estimate ``(1/m) sum_j (J^T L z_j)^2`` with Rademacher
    ``z_j`` in output space and ``L L^T = Lambda`` (``E[L z z^T L^T] = Lambda``), from ``m`` VJPs
    per batch: cheaper when ``d`` is large, variance falling as ``1/m``.
    """
    d = theta.shape[0]
    diag = torch.zeros(d, dtype=theta.dtype, device=theta.device)
    log_lik = torch.zeros((), dtype=torch.float64, device=theta.device)
    for lin, y, ll in _passes(sub, loader, lik, theta, "GGN diagonal", progress):
        if probes is None:
            lam = vmap(lambda u: output_precision(lik, lin.out, y, u))
            for s in _chunks(d, chunk_size):
                jv = lin.jvp(_unit_rows(s, d, theta))
                diag[s] += (jv * lam(jv)).reshape(jv.shape[0], -1).sum(1).detach()
        else:
            sqrt_lam = vmap(lambda z: output_precision_sqrt(lik, lin.out, y, z))
            for s in _chunks(probes, chunk_size):
                n = s.stop - s.start
                z = torch.randint(0, 2, (n, *lin.out.shape), generator=generator,
                                  device=generator.device if generator is not None else lin.out.device)
                z = (2 * z - 1).to(lin.out)
                diag += (lin.vjp(sqrt_lam(z)) ** 2).sum(0).detach() / probes
        log_lik += ll.detach().double()
    return diag, log_lik


def top_eigen(matmul: Callable[[torch.Tensor], torch.Tensor], d: int, k: int, like: torch.Tensor,
              oversample: int = 10, power_iters: int = 2, generator: torch.Generator | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Top-``k`` eigenpairs ``(values (k,), vectors (d, k))`` of a symmetric PSD operator given
    by ``matmul(V) = G V``, by randomised subspace iteration (Halko, Martinsson & Tropp 2011):
    ``Q = orth(G^{q+1} Omega)`` with ``k + oversample`` Gaussian columns, then the eigenpairs of
    ``Q^T G Q``. Exact (up to rounding) when ``k + oversample >= d``. Costs
    ``power_iters + 2`` calls of ``matmul``, each with ``k + oversample`` columns.
    """
    width = min(d, k + oversample)
    omega = torch.randn(d, width, generator=generator, dtype=like.dtype,
                        device=generator.device if generator is not None else like.device).to(like.device)
    q = torch.linalg.qr(matmul(omega)).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(matmul(q)).Q
    small = q.mT @ matmul(q)
    values, vecs = torch.linalg.eigh(0.5 * (small + small.mT))
    values, vecs = values.flip(0)[:k], vecs.flip(1)[:, :k]
    return values.clamp_min(0.0), q @ vecs
