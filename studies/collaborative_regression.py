r"""Collaborative low-rank regression: the theory setting of collaborative CoLoRA.

k tasks, ``y = W_t^* x + noise`` with ``x ~ N(0, I_in)``, noise ``N(0, sigma^2 I_out)`` and

.. math::  W_t^* = B^* R_t^* A^*, \qquad R_t^* = I_r + s\, G_t,\quad G_t \sim N(0, 1)^{r \times r},

``A^*`` (``r x in``) and ``B^*`` (``out x r``) with orthonormal rows / columns. The spread ``s``
sets task similarity (``s = 0``: one task). Four low-rank estimators of every ``W_t``:

* independent: ``W_t = B_t A_t`` on task t's data alone;
* collaborative: ``W_t = B (I + D_t) A`` with shared ``A``, ``B`` (all data) and personal ``D_t``;
* collaborative_shrunk: the same model with the personal matrices random, ``R_t ~ N(m, tau^2 I)``:
  ``A``, ``B``, ``m`` and ``tau`` maximise the marginal likelihood (empirical Bayes, by EM:
  ``collaborative_em``) and ``R_t`` is its posterior mean, a ridge ``lambda = sigma^2 / tau^2`` towards
  ``m`` set by the data: strong for similar tasks, weak for distinct ones;
* shared: one ``W = B A`` for every task, on all data.

Solvers: alternating minimisation (closed-form least squares for ``A``, ``B`` and each ``R_t`` in
turn, from a spectral start: the top-r SVD of the moment estimate ``sum_i y_i x_i^T / n``) and
gradient descent (``bc.fit_map`` on a zero linear layer carrying ``bc.CollaborativeLoRA``);
collaborative_shrunk by EM only (the ``R_t`` step their exact posterior, the ``A``, ``B`` steps least
squares in expectation over it). Error: ``||W_t - W_t^*||_F / ||W_t^*||_F``, averaged over tasks and seeds.

Bayesian part: with ``A``, ``B`` fixed at the collaborative estimate, the model is linear in the
personal ``D_t``; a prior ``D_t ~ N(0, tau^2 I)`` with ``tau`` tuned by the Laplace evidence
(``bc.fit_laplace(tune_prior="marglik")`` on ``bc.CollaborativeLoRA.personal_subspace`` of all
tasks jointly, MAP and evidence alternated) gives a Gaussian posterior whose width follows the
task spread ``s``: similar tasks -> small ``tau`` -> narrow posteriors.

Usage: ``python studies/collaborative_regression.py --quick --out runs/collab_regression``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bayes_colora as bc  # noqa: E402
from bayes_colora.plots import save_figure  # noqa: E402
from bayes_colora.subspace import _atomic_write  # noqa: E402

METHODS = ("independent", "collaborative", "collaborative_shrunk", "shared")
GD_METHODS = ("independent", "collaborative", "shared")


# ----------------------------------------------------------------------------- data
@dataclass
class Tasks:
    """``x``: ``(k, n, in)``, ``y``: ``(k, n, out)``, ``w_star``: ``(k, out, in)``, ``r_star``: ``(k, r, r)``."""

    x: torch.Tensor
    y: torch.Tensor
    w_star: torch.Tensor
    r_star: torch.Tensor
    noise: float


def make_tasks(n_tasks: int, n: int, d_in: int, d_out: int, rank: int, spread: float, noise: float,
               seed: int, dtype: torch.dtype = torch.float64) -> Tasks:
    """Draw the ground truth and ``n`` examples per task (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(d_in, rank, generator=g, dtype=dtype))[0].T          # (r, in)
    b = torch.linalg.qr(torch.randn(d_out, rank, generator=g, dtype=dtype))[0]           # (out, r)
    r = torch.eye(rank, dtype=dtype) + spread * torch.randn(n_tasks, rank, rank, generator=g, dtype=dtype)
    w = b @ r @ a
    x = torch.randn(n_tasks, n, d_in, generator=g, dtype=dtype)
    y = x @ w.mT + noise * torch.randn(n_tasks, n, d_out, generator=g, dtype=dtype)
    return Tasks(x, y, w, r, noise)


def recovery_error(w: torch.Tensor, w_star: torch.Tensor) -> float:
    """Mean over tasks of ``||W_t - W_t^*||_F / ||W_t^*||_F``."""
    return float((torch.linalg.matrix_norm(w - w_star) / torch.linalg.matrix_norm(w_star)).mean())


# ------------------------------------------------------------- alternating minimisation
def _solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + ridge I)^{-1} rhs`` (plus a ``1e-10 tr(G) / dim`` jitter for rank-deficient ``G``)."""
    lam = ridge + 1e-10 * float(gram.diagonal().mean())
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)


def personal_normal_equations(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Normal equations of every task's ``R_t``, ``A``, ``B`` fixed: ``(G, h)``, ``(k, r^2, r^2)``, ``(k, r^2)``.

    ``||Y_t - U_t R_t^T B^T||_F^2 = vec(R_t)^T G_t vec(R_t) - 2 vec(R_t)^T h_t + ||Y_t||^2`` with
    ``U_t = X_t A^T``, row-major ``vec``, ``G_t = (B^T B) (x) (U_t^T U_t) = Phi_t^T Phi_t`` and
    ``h_t = vec(B^T Y_t^T U_t) = Phi_t^T vec(Y_t)``, where ``Phi_t`` (``n out x r^2``) is the design
    of the model ``vec(Y_t) = Phi_t vec(R_t) + noise``.
    """
    k, rank = x.shape[0], a.shape[0]
    u = x @ a.T                                                                          # (k, n, r)
    grams = torch.einsum("ab,tij->taibj", b.T @ b, u.mT @ u).reshape(k, rank * rank, rank * rank)
    return grams, (b.T @ y.mT @ u).reshape(k, -1)


class EmpiricalBayes(NamedTuple):
    """The evidence-tuned prior ``vec(R_t) ~ N(centre, tau2 I)`` and the posteriors ``N(mean_t, cov_t)``.

    ``mean``: ``(k, p)``, ``cov``: ``(k, p, p)``, ``tau2``: float, ``centre``: ``(p,)``, ``log_evidence``:
    ``sum_t log p(Y_t | A, B, centre, tau2)`` up to ``-(sum_t ||Y_t||^2 / sigma^2 + k n out log(2 pi sigma^2)) / 2``.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    tau2: float
    centre: torch.Tensor
    log_evidence: float


def empirical_bayes_step(grams: torch.Tensor, rhs: torch.Tensor, noise: float, tau2: float = 1.0,
                         centre: torch.Tensor | None = None, iters: int = 100, tol: float = 1e-9
                         ) -> EmpiricalBayes:
    r"""Posterior of every ``R_t`` under a prior ``vec(R_t) ~ N(m, tau^2 I)`` (iid over tasks) whose
    ``m`` and ``tau^2`` maximise the evidence (type-II maximum likelihood) of the linear-Gaussian model
    ``vec(Y_t) = Phi_t vec(R_t) + N(0, sigma^2 I)``, given its normal equations ``G_t = Phi_t^T Phi_t``
    ``(k, p, p)`` and ``h_t = Phi_t^T vec(Y_t)`` ``(k, p)``, ``p = r^2`` (``personal_normal_equations``).

    Marginally ``vec(Y_t) ~ N(Phi_t m, C_t)``, ``C_t = sigma^2 I + tau^2 Phi_t Phi_t^T``. With
    ``G_t = V_t diag(d_t) V_t^T`` and ``c_t = V_t^T (h_t - G_t m)``, the residual ``e_t = vec(Y_t) - Phi_t m``
    has components ``c_ti / sqrt(d_ti)`` along the left singular vectors of ``Phi_t`` (variance
    ``sigma^2 + tau^2 d_ti`` each) and variance ``sigma^2`` in every other direction, so

    .. math:: -2 \log p(Y_t) = N \log 2\pi\sigma^2 + \sum_i \log(1 + \tau^2 d_{ti} / \sigma^2)
              + \frac{\|e_t\|^2}{\sigma^2} - \sum_i \frac{\tau^2 c_{ti}^2}{\sigma^2 (\sigma^2 + \tau^2 d_{ti})},
              \qquad \|e_t\|^2 = \|Y_t\|^2 - 2 m^T h_t + m^T G_t m.

    Its maximisers are found by alternating (each starting from the previous: ``tau2``, ``centre``):
    ``m`` in closed form (generalised least squares), with ``lambda = sigma^2 / tau^2``,
    ``[sum_t V_t diag(d lambda / (d + lambda)) V_t^T] m = sum_t V_t diag(lambda / (d + lambda)) V_t^T h_t``;
    and MacKay's fixed point for ``tau^2`` (the stationarity condition of the evidence in ``tau^2``):
    ``tau^2 = sum_t ||mu_t - m||^2 / gamma``, ``gamma = sum_{t,i} d_ti / (d_ti + lambda)`` the number of
    well-determined parameters. Stops when ``log tau^2`` moves less than ``tol``. Similar tasks give
    ``tau -> 0`` (every ``R_t -> m``: one shared model), distinct ones a large ``tau`` (little shrinkage);
    ``tau^2`` is kept above ``1e-12 sigma^2`` so that ``lambda`` is finite.

    The posterior is ``N(mu_t, S_t)``: ``mu_t = m + V_t diag(1 / (d_t + lambda)) c_t`` (a ridge ``lambda``
    towards ``m``) and ``S_t = sigma^2 V_t diag(1 / (d_t + lambda)) V_t^T``.
    """
    d, v = torch.linalg.eigh(grams)                                                      # (k, p), (k, p, p)
    d = d.clamp_min(0.0)
    vh = (v.mT @ rhs[..., None])[..., 0]                                                 # V^T h: (k, p)
    m = torch.zeros(grams.shape[-1], dtype=grams.dtype) if centre is None else centre
    var = noise ** 2
    for _ in range(iters):
        lam = var / tau2
        w = lam / (d + lam)                                                              # (k, p)
        m = torch.linalg.solve(((v * (d * w)[:, None, :]) @ v.mT).sum(0), ((v @ (w * vh)[..., None])[..., 0]).sum(0))
        c = vh - d * (v.mT @ m)                                                          # V^T (h - G m)
        gamma = float((d / (d + lam)).sum())
        new = max(float((c ** 2 / (d + lam) ** 2).sum()) / max(gamma, 1e-300), 1e-12 * var)
        done = abs(math.log(new / tau2)) < tol
        tau2 = new
        if done:
            break
    lam = var / tau2
    c = vh - d * (v.mT @ m)
    resid = float((m @ grams @ m - 2 * rhs @ m).sum())                                  # ||e_t||^2 - ||Y_t||^2
    log_ev = -0.5 * (float(torch.log1p(d * (tau2 / var)).sum()) + resid / var
                     - tau2 / var * float((c ** 2 / (var + tau2 * d)).sum()))
    mean = m + (v @ (c / (d + lam))[..., None])[..., 0]
    cov = var * (v / (d + lam)[:, None, :]) @ v.mT
    return EmpiricalBayes(mean, cov, tau2, m, log_ev)


def shared_step(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, r: torch.Tensor, cov: torch.Tensor,
                ridge: float = 0.0, xtx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``A`` then ``B`` minimising ``E L = sum_t E ||Y_t - X_t A^T R_t^T B^T||_F^2`` over ``R_t`` with mean
    ``r: (k, r, r)`` and covariance ``cov: (k, r^2, r^2)`` of the row-major ``vec(R_t)`` (zero: the plain
    least-squares steps of ``altmin``), from the current ``b: (out, r)``; ``x: (k, n, in)``, ``y: (k, n, out)``.

    ``L`` is quadratic in ``R_t``, so ``E L`` is ``L`` at the means plus the second moments
    ``E[R_t^T B^T B R_t] = r_t^T B^T B r_t + sum_ab (B^T B)_ab S_t[(a, .), (b, .)]`` and
    ``E[R_t K R_t^T] = r_t K r_t^T + sum_ij K_ij S_t[(., i), (., j)]`` (``K = U_t^T U_t``, ``U_t = X_t A^T``).
    ``A`` solves ``sum_t E[M_t^T M_t] (x) (X_t^T X_t) vec(A) = sum_t vec(r_t^T B^T Y_t^T X_t)`` (``M_t = B R_t``),
    then ``B = (sum_t Y_t^T U_t r_t^T) (sum_t E[R_t U_t^T U_t R_t^T])^{-1}`` with the new ``A``: each the
    exact minimiser in its block (``ridge`` adds ``ridge I`` to both systems). ``xtx``: the ``X_t^T X_t``
    if already computed. Returns ``(A, B)``: ``(r, in)``, ``(out, r)``, not re-gauged.
    """
    k, rank, d_in = r.shape[0], r.shape[1], x.shape[-1]
    cov = cov.reshape(k, rank, rank, rank, rank)                   # Cov(R_t[a, i], R_t[b, j]) at [t, a, i, b, j]
    xtx = x.mT @ x if xtx is None else xtx                                               # (k, in, in)
    m = b @ r                                                                            # (k, out, r)
    second = m.mT @ m + torch.einsum("ab,taibj->tij", b.T @ b, cov)                      # E[R^T B^T B R]
    gram = torch.einsum("tab,tij->aibj", second, xtx).reshape(rank * d_in, rank * d_in)
    a = _solve(gram, (m.mT @ y.mT @ x).sum(0).reshape(-1), ridge).reshape(rank, d_in)
    u = x @ a.T                                                                          # (k, n, r)
    z = u @ r.mT                                                                         # (k, n, r)
    second = z.mT @ z + torch.einsum("tij,taibj->tab", u.mT @ u, cov)                    # E[R U^T U R^T]
    b = _solve(second.sum(0), (y.mT @ z).sum(0).T, ridge).T
    return a, b


def altmin(x: torch.Tensor, y: torch.Tensor, rank: int, personal: bool = True, iters: int = 500,
           ridge: float = 0.0, noise: float | None = None, tol: float = 1e-10,
           start: tuple[torch.Tensor, torch.Tensor] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Alternating least squares for ``y_i = B R_{t_i} A x_i`` over tasks ``x: (k, n, in)``, ``y: (k, n, out)``.

    Each step is the exact minimiser of ``L = sum_t ||Y_t - X_t A^T R_t^T B^T||^2`` in one block:
    each ``R_t`` from ``(B^T B) (x) (U_t^T U_t) vec(R_t) = vec(B^T Y_t^T U_t)`` (``U_t = X_t A^T``,
    row-major vec; see ``personal_normal_equations``), ``A`` from
    ``sum_t (M_t^T M_t) (x) (X_t^T X_t) vec(A) = sum_t vec(M_t^T Y_t^T X_t)``
    (``M_t = B R_t``), ``B = (sum Y_t^T Z_t)(sum Z_t^T Z_t)^{-1}`` with ``Z_t = X_t A^T R_t^T``.
    ``personal=False`` keeps ``R_t = I`` (one shared ``B A``).

    Given the noise std ``noise = sigma``, the ``R_t`` are integrated out instead of fitted: ``A``, ``B``
    and the prior ``R_t ~ N(m, tau^2 I)`` maximise the marginal likelihood ``p(Y | A, B, m, tau)`` by
    expectation-maximisation. E step: the exact Gaussian posterior ``N(mu_t, S_t)`` of every ``R_t`` with
    ``m``, ``tau^2`` at their evidence maximum for the current ``A``, ``B`` (``empirical_bayes_step``).
    M steps: ``A`` then ``B`` minimise the posterior expectation of ``L`` (``shared_step``); its ``S_t``
    terms keep ``A``, ``B`` from being fitted to personal matrices that the data do not determine (with
    few examples per task, fitting ``R_t`` and ``A`` jointly overfits).
    Each E and M step raises the marginal likelihood; the re-gauging below can lower it slightly, as an
    isotropic prior does not stay isotropic under a non-orthogonal change of gauge (by about 1e-7
    relatively near convergence in the cases checked), hence the stop on the size of the change.
    Returns the posterior means ``R_t = mu_t``.

    Start: with the per-task moments ``M_t = Y_t^T X_t / n`` (``E M_t = W_t``), ``A`` spans the top-r
    right singular vectors of ``[M_1; ...; M_k]`` and ``B`` the top-r left ones of ``[M_1 ... M_k]``
    (with ``personal=False``: ``B A`` = the rank-r SVD truncation of ``sum_t M_t / k``), or the given
    ``start = (A, B)`` (orthonormal rows / columns). With personal matrices the gauge
    ``B R_t A = (B P)(P^{-1} R_t Q^{-1})(Q A)`` is fixed after every sweep by orthonormalising the rows
    of ``A`` and the columns of ``B`` (QR), which changes no ``W_t`` (the prior centre ``m`` is mapped as
    the ``R_t``; with orthonormal ``A``, ``B`` an isotropic prior on ``R_t`` is one on ``W_t``'s
    deviations, as ``A^*``, ``B^*`` are orthonormal). Stops when the training loss (with ``noise``: the
    negative log marginal likelihood) changes by at most ``tol`` relatively.
    Returns ``(A, B, R)``: ``(r, in)``, ``(out, r)``, ``(k, r, r)``.
    """
    k, n, d_in = x.shape
    moments = y.mT @ x / n                                                               # (k, out, in)
    r = torch.eye(rank, dtype=x.dtype).repeat(k, 1, 1)
    cov = torch.zeros(k, rank * rank, rank * rank, dtype=x.dtype)
    tau2, centre = 1.0, torch.eye(rank, dtype=x.dtype).reshape(-1)
    if start is not None:
        a, b = start
    elif personal:
        a = torch.linalg.svd(moments.reshape(-1, d_in), full_matrices=False)[2][:rank]
        b = torch.linalg.svd(moments.transpose(0, 1).reshape(moments.shape[1], -1), full_matrices=False)[0][:, :rank]
    else:
        u, s, vt = torch.linalg.svd(moments.mean(0))
        b, a = u[:, :rank] * s[:rank].sqrt(), s[:rank, None].sqrt() * vt[:rank]
    xtx = x.mT @ x                                                                      # (k, in, in)
    prev = math.inf
    for _ in range(iters):
        if personal:
            grams, rhs = personal_normal_equations(x, y, a, b)
            if noise is None:
                r = torch.stack([_solve(grams[t], rhs[t], ridge) for t in range(k)]).reshape(k, rank, rank)
            else:
                post = empirical_bayes_step(grams, rhs, noise, tau2, centre)
                r, cov = post.mean.reshape(k, rank, rank), post.cov
                tau2, centre = post.tau2, post.centre
                if prev < math.inf and abs(prev + post.log_evidence) <= tol * abs(prev):
                    break
                prev = -post.log_evidence
        a, b = shared_step(x, y, b, r, cov, ridge, xtx)
        if personal:  # fix the gauge: A <- Q^T (orthonormal rows), B <- P, R_t <- T R_t S^T
            q, s_fac = torch.linalg.qr(a.T)
            p, t_fac = torch.linalg.qr(b)
            a, b, r = q.T, p, t_fac @ r @ s_fac.T
            centre = (t_fac @ centre.reshape(rank, rank) @ s_fac.T).reshape(-1)
        if noise is None:
            loss = float(((x @ (b @ r @ a).mT - y) ** 2).sum())
            if prev - loss <= tol * prev and prev < math.inf:
                break
            prev = loss
    return a, b, r


def collaborative_em(x: torch.Tensor, y: torch.Tensor, rank: int, noise: float
                     ) -> tuple[torch.Tensor, torch.Tensor, EmpiricalBayes]:
    r"""Type-II maximum likelihood of the collaborative model: ``A``, ``B``, ``m``, ``tau`` maximise
    ``p(Y | A, B, m, tau) = prod_t int N(vec Y_t; Phi_t vec R_t, sigma^2 I) N(vec R_t; m, tau^2 I) dR_t``
    (``altmin`` with ``noise``, EM), from two starts: the spectral one and the shared fit's ``A``, ``B``
    (orthonormalised; near the optimum when the tasks are alike, which EM from the spectral start can
    miss when ``n`` is tiny: the likelihood has several local maxima). The start reaching the larger
    marginal likelihood is kept.

    ``x: (k, n, in)``, ``y: (k, n, out)``. Returns ``(A, B, posterior)``: ``(r, in)``, ``(out, r)`` and
    the ``EmpiricalBayes`` of the ``R_t`` (its ``mean`` ``(k, r^2)`` is the estimate).
    """
    d_in = x.shape[-1]
    a0, b0, _ = altmin(x.reshape(1, -1, d_in), y.reshape(1, -1, y.shape[-1]), rank, personal=False)
    best = None
    for start in (None, (torch.linalg.qr(a0.T)[0].T, torch.linalg.qr(b0)[0])):
        a, b, _ = altmin(x, y, rank, personal=True, noise=noise, start=start)
        post = empirical_bayes_step(*personal_normal_equations(x, y, a, b), noise, iters=1000)
        if best is None or post.log_evidence > best[2].log_evidence:
            best = (a, b, post)
    return best


def fit_altmin(tasks: Tasks, rank: int, method: str) -> torch.Tensor:
    """``W_t`` estimates ``(k, out, in)`` of one method by alternating minimisation."""
    if method == "collaborative":
        a, b, r = altmin(tasks.x, tasks.y, rank, personal=True)
        return b @ r @ a
    if method == "collaborative_shrunk":
        a, b, post = collaborative_em(tasks.x, tasks.y, rank, tasks.noise)
        return b @ post.mean.reshape(-1, rank, rank) @ a
    if method == "shared":
        a, b, _ = altmin(tasks.x.reshape(1, -1, tasks.x.shape[-1]), tasks.y.reshape(1, -1, tasks.y.shape[-1]),
                         rank, personal=False)
        return (b @ a).expand(tasks.x.shape[0], -1, -1)
    if method == "independent":
        ws = [altmin(tasks.x[t:t + 1], tasks.y[t:t + 1], rank, personal=False) for t in range(tasks.x.shape[0])]
        return torch.stack([b @ a for a, b, _ in ws])
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# -------------------------------------------------------------------- gradient descent
def collaborative_subspace(d_in: int, d_out: int, rank: int, n_tasks: int, seed: int) -> bc.Subspace:
    """A zero linear layer (no bias) with ``bc.CollaborativeLoRA``: ``f(x; theta, t) = B (I + D_t) A x``."""
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.zeros_(layer.weight)
    return bc.Subspace.from_model(nn.Sequential(layer), bc.CollaborativeLoRA(rank, n_tasks))


def task_batches(x: torch.Tensor, y: torch.Tensor, task: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """One full batch ``{"input", "task", "labels"}`` (float32), the format every engine reads."""
    return [{"input": x.float(), "task": task, "labels": y.float()}]


def _stack(tasks: Tasks, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = tasks.x.shape[1]
    task = torch.arange(len(ids)).repeat_interleave(n)
    return tasks.x[ids].reshape(-1, tasks.x.shape[-1]), tasks.y[ids].reshape(-1, tasks.y.shape[-1]), task


def fit_gd(tasks: Tasks, rank: int, method: str, epochs: int, lr: float, seed: int,
           device: str = "cpu") -> torch.Tensor:
    """``W_t`` estimates ``(k, out, in)`` by ``bc.fit_map`` (Adam, full batch, maximum likelihood) on ``device``."""
    k, _, d_in = tasks.x.shape
    d_out = tasks.y.shape[-1]
    groups = {"collaborative": [list(range(k))], "shared": [list(range(k))],
              "independent": [[t] for t in range(k)]}[method]
    ws = []
    for ids in groups:
        x, y, task = _stack(tasks, ids)
        if method == "shared":
            task = torch.zeros_like(task)
        sub = collaborative_subspace(d_in, d_out, rank, len(ids) if method == "collaborative" else 1, seed).to(device)
        bc.fit_map(sub, task_batches(x, y, task), bc.Gaussian(sigma=tasks.noise), epochs=epochs, lr=lr,
                   progress=False)
        ws.append(layer_weights(sub))
    w = torch.cat(ws)
    return w.expand(k, -1, -1) if method == "shared" else w


def layer_weights(sub: bc.Subspace) -> torch.Tensor:
    """``B (I + D_t) A`` of every task of the single CollaborativeLoRA layer: ``(k, out, in)``."""
    layer = next(iter(sub.adapter_layers().values()))
    with torch.no_grad():
        return torch.stack([layer.delta_weight(t) for t in range(layer.n_tasks)]).double().cpu()


# ---------------------------------------------------------------------- Bayesian part
def personal_posterior(tasks: Tasks, rank: int, rounds: int = 3, seed: int = 0
                       ) -> tuple[bc.Posterior, bc.Subspace, bc.Subspace, float]:
    """Gaussian posterior over every task's ``D_t`` with ``A``, ``B`` fixed at the collaborative
    alternating-minimisation estimate and the prior precision tuned by the Laplace evidence.

    Returns ``(posterior, personal subspace, full subspace, tuned prior precision)``.
    """
    k, _, d_in = tasks.x.shape
    a, b, r = altmin(tasks.x, tasks.y, rank, personal=True)
    b = b @ r.mean(0)  # the common part into the shared factor: the R_t then average to I
    sub = collaborative_subspace(d_in, tasks.y.shape[-1], rank, k, seed)
    layer = next(iter(sub.adapter_layers().values()))
    with torch.no_grad():
        layer.lora_A.copy_(a.float())
        layer.lora_B.copy_(b.float())
    personal = bc.CollaborativeLoRA.personal_subspace(sub, list(range(k)))
    loader = task_batches(*_stack(tasks, list(range(k))))
    lik, precision = bc.Gaussian(sigma=tasks.noise), 1.0
    for _ in range(rounds):  # MacKay: MAP at the current precision, then the evidence-optimal one
        # the MAP of this linear-Gaussian model in closed form (bc.fit_map reaches it too, slower)
        personal.theta = closed_form_posterior(personal, loader, tasks.noise, precision)[0].float()
        post = bc.fit_laplace(personal, loader, lik, prior=bc.NormalPrior(scale=precision ** -0.5),
                              hessian="full", tune_prior="marglik", progress=False)
        precision = post.history[-1]["prior_precision"]
    personal.theta = closed_form_posterior(personal, loader, tasks.noise, precision)[0].float()
    post = bc.fit_laplace(personal, loader, lik, prior=bc.NormalPrior(scale=precision ** -0.5),
                          hessian="full", progress=False)
    return post, personal, sub, precision


def closed_form_posterior(personal: bc.Subspace, loader: list[dict[str, torch.Tensor]], noise: float,
                          precision: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact posterior ``N(m, S)`` of a subspace in which the model is linear (here: the personal
    ``D_t`` with ``A``, ``B`` fixed): ``f(x; theta) = f_0 + J theta``, prior ``N(0, precision^{-1} I)``,
    ``S = (J^T J / sigma^2 + precision I)^{-1}``, ``m = S J^T (y - f_0) / sigma^2``.
    ``J`` is built column by column from ``f(e_j) - f(0)`` (exact for a linear model), in float64."""
    (batch,) = loader
    x = {k: v for k, v in batch.items() if k != "labels"}
    zero = torch.zeros(personal.dim)
    with torch.no_grad():
        f0 = personal(x, theta=zero).double().reshape(-1)
        jac = (personal(x, theta=torch.eye(personal.dim)).double().reshape(personal.dim, -1) - f0).T
    prec = jac.T @ jac / noise ** 2 + precision * torch.eye(personal.dim, dtype=torch.float64)
    cov = torch.linalg.inv(prec)
    mean = cov @ jac.T @ (batch["labels"].double().reshape(-1) - f0) / noise ** 2
    return mean, cov


# ----------------------------------------------------------------------------- study
@dataclass
class Config:
    n_tasks: int = 10
    d_in: int = 20
    d_out: int = 10
    rank: int = 2
    noise: float = 0.2
    samples: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    spreads: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)
    seeds: int = 5
    gd_epochs: int = 1000
    gd_lr: float = 2e-2
    gd_seeds: int = 1
    bayes_n: int = 16


QUICK = Config(n_tasks=4, d_in=10, d_out=5, rank=2, samples=(4, 32), spreads=(0.0, 1.0), seeds=1,
               gd_epochs=100, gd_lr=0.1, bayes_n=12)


def run(cfg: Config, progress: bool = True, device: str = "cpu") -> dict:
    """Every (spread, n, seed, method, solver) cell, then the posterior width per spread."""
    rows = []
    cells = [(s, n, seed) for s in cfg.spreads for n in cfg.samples for seed in range(cfg.seeds)]
    for s, n, seed in tqdm(cells, desc="recovery", disable=not progress):
        tasks = make_tasks(cfg.n_tasks, n, cfg.d_in, cfg.d_out, cfg.rank, s, cfg.noise, seed)
        for method in METHODS:
            rows.append({"spread": s, "n": n, "seed": seed, "method": method, "solver": "altmin",
                         "error": recovery_error(fit_altmin(tasks, cfg.rank, method), tasks.w_star)})
            if seed < cfg.gd_seeds and method in GD_METHODS:
                w = fit_gd(tasks, cfg.rank, method, cfg.gd_epochs, cfg.gd_lr, seed, device)
                rows.append({"spread": s, "n": n, "seed": seed, "method": method, "solver": "gd",
                             "error": recovery_error(w, tasks.w_star)})
    bayes = []
    for s in tqdm(cfg.spreads, desc="posterior", disable=not progress):
        for seed in range(cfg.seeds):
            tasks = make_tasks(cfg.n_tasks, cfg.bayes_n, cfg.d_in, cfg.d_out, cfg.rank, s, cfg.noise, 100 + seed)
            post, personal, _, precision = personal_posterior(tasks, cfg.rank, seed=seed)
            bayes.append({"spread": s, "seed": seed, "prior_precision": precision,
                          "posterior_std": float(post.covariance.diagonal().sqrt().mean()),
                          "prior_std": precision ** -0.5})
    return {"config": asdict(cfg), "recovery": rows, "bayes": bayes}


def summarise(results: dict) -> dict:
    """Mean error per (spread, n, method, solver) and mean posterior width per spread."""
    table: dict[tuple, list[float]] = {}
    for r in results["recovery"]:
        table.setdefault((r["spread"], r["n"], r["method"], r["solver"]), []).append(r["error"])
    widths: dict[float, list[float]] = {}
    for r in results["bayes"]:
        widths.setdefault(r["spread"], []).append(r["posterior_std"])
    return {"error": {k: sum(v) / len(v) for k, v in table.items()},
            "posterior_std": {k: sum(v) / len(v) for k, v in widths.items()}}


def markdown(results: dict) -> str:
    cfg, summ = results["config"], summarise(results)
    lines = [f"Recovery error ||W_t - W_t*||_F / ||W_t*||_F (mean over {cfg['n_tasks']} tasks and "
             f"{cfg['seeds']} seeds; alternating minimisation, gradient descent in brackets where run)", "",
             "| spread s | n per task | " + " | ".join(METHODS) + " |", "| ---: | ---: |" + " ---: |" * len(METHODS)]
    for s in cfg["spreads"]:
        for n in cfg["samples"]:
            cells = []
            for m in METHODS:
                cell = f"{summ['error'][(s, n, m, 'altmin')]:.3f}"
                if (s, n, m, "gd") in summ["error"]:
                    cell += f" ({summ['error'][(s, n, m, 'gd')]:.3f})"
                cells.append(cell)
            lines.append(f"| {s:g} | {n} | " + " | ".join(cells) + " |")
    lines += ["", f"Posterior over the personal D_t (n = {cfg['bayes_n']} per task, evidence-tuned prior)", "",
              "| spread s | mean posterior std of D_t entries | prior std (tuned) |", "| ---: | ---: | ---: |"]
    prior = {}
    for r in results["bayes"]:
        prior.setdefault(r["spread"], []).append(r["prior_std"])
    for s, v in summ["posterior_std"].items():
        lines.append(f"| {s:g} | {v:.4f} | {sum(prior[s]) / len(prior[s]):.4f} |")
    return "\n".join(lines) + "\n"


def figures(results: dict, out: str) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    cfg, summ = results["config"], summarise(results)
    fig = Figure(figsize=(3.2 * len(cfg["spreads"]), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(cfg["spreads"]), sharey=True, squeeze=False)[0]
    for ax, s in zip(axes, cfg["spreads"]):
        for m, colour in zip(METHODS, ("tab:blue", "tab:orange", "tab:red", "tab:green")):
            for solver, style in (("altmin", "-o"), ("gd", "--x")):
                ns = [n for n in cfg["samples"] if (s, n, m, solver) in summ["error"]]
                if ns:
                    ax.plot(ns, [summ["error"][(s, n, m, solver)] for n in ns], style, color=colour,
                            label=f"{m} ({solver})", ms=4)
        ax.set(xscale="log", yscale="log", title=f"spread s = {s:g}", xlabel="samples per task")
        ax.set_xticks(list(cfg["samples"]), [str(n) for n in cfg["samples"]], minor=False)
        ax.xaxis.set_minor_locator(NullLocator())
    axes[0].set_ylabel("relative error of W_t")
    axes[-1].legend(fontsize=6)
    paths = [os.path.join(out, "recovery.png")]
    save_figure(fig, paths[0])
    fig = Figure(figsize=(4, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    spreads = list(summ["posterior_std"])
    ax.plot([max(s, 1e-2) for s in spreads], list(summ["posterior_std"].values()), "-o")
    ax.set(xscale="log", yscale="log", xlabel="task spread s (0 drawn at 0.01)",
           ylabel="posterior std of D_t entries", title="personal posterior narrows with similarity")
    paths.append(os.path.join(out, "posterior_width.png"))
    save_figure(fig, paths[1])
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid for a CPU check (about a minute)")
    ap.add_argument("--out", default="runs/collaborative_regression", help="output folder")
    ap.add_argument("--device", default="cpu", help="device of the gradient-descent fits (the closed-form "
                    "solvers run on the CPU in float64); the study is CPU-sized")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    start = time.time()
    results = run(cfg, progress=not args.no_progress, device=args.device)
    results["seconds"] = time.time() - start
    os.makedirs(args.out, exist_ok=True)
    _atomic_write(os.path.join(args.out, "results.json"),
                  lambda tmp: open(tmp, "w").write(json.dumps(results, indent=1)))
    table = markdown(results)
    _atomic_write(os.path.join(args.out, "results.md"), lambda tmp: open(tmp, "w").write(table))
    paths = figures(results, args.out)
    print(table)
    print(f"wrote {args.out}/results.json, results.md, {', '.join(os.path.basename(p) for p in paths)} "
          f"in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
