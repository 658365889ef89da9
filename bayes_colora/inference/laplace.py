r"""The Laplace approximation on theta, with generalised Gauss-Newton curvature.

At ``theta*`` (``sub.theta``, where ``fit_map`` leaves its result) the posterior is approximated by

.. math::  q(\theta) = N(\theta^*, P^{-1}), \qquad P = G + \mathrm{diag}(\delta),
           \qquad G = \sum_i J_i^T \Lambda_i J_i,

``delta`` the prior precision and ``G`` the GGN of the whole data set (see :mod:`.ggn`), computed
from JVPs/VJPs in chunks so dense outputs (depth maps) never need a ``batch x outputs x d`` Jacobian.

Hessian structures: ``"full"`` (dense ``G``: ``d`` JVPs + ``d`` VJPs per batch, ``O(d^2)`` memory,
``O(d^3)`` factorisation), ``"diag"`` (exact ``diag(G)`` from ``d`` JVPs per batch, or an unbiased
Monte-Carlo estimate from ``diag_probes`` VJPs), ``"lowrank"`` (top-``rank`` eigenpairs of the
prior-whitened ``G`` by randomised subspace iteration: ``(rank + 10) x 4`` GGN-vector products per
batch, ``O(d rank)`` memory), ``"kron"`` (KFAC, :mod:`.kron`: a block-diagonal ``G`` with one
block ``H kron Q`` per parameter whose adapter layer provides Kronecker factors, LoRA's ``A`` and
``B`` on linear and 2-d conv layers, and a Monte-Carlo diagonal for every other entry; one forward
and ``diag_probes`` backward passes per batch, ``m^2 + n^2`` memory per ``(m, n)`` parameter;
eigendecompositions of the factors give the inverse, samples and ``log det P``).

Prior tuning (a scalar ``delta`` then replaces the prior's precision):

* ``"marglik"``: maximise the Laplace evidence
  ``log p(D) ~ log p(D|theta*) + log p(theta*) + d/2 log 2 pi - 1/2 log det P`` over ``delta``.
  With the eigenvalues ``lam_j`` of ``G`` (the top-``rank`` ones and zeros for ``"lowrank"``; the
  products ``lam_h[i] lam_q[j]`` of the factor eigenvalues and the diagonal for ``"kron"``) its
  derivative is ``-(delta ||theta*||^2 - gamma(delta)) / (2 delta)`` with
  ``gamma = sum_j lam_j / (lam_j + delta)``, increasing in ``delta``: the unique maximiser is found
  by bisection on ``log delta``. At a MAP for that ``delta`` this is MacKay's evidence fixed point.
* ``"gridsearch"``: the ``delta`` of a log grid that minimises the negative log predictive density
  of the linearised predictive on ``val_loader``; with ``temperature_grid``, the pair
  ``(delta, T)``.

Tempering: ``temperature=T`` uses ``log p(D | theta) / T``, i.e. ``P = G / T + diag(delta)``.
Since ``G / T + delta = (G + T delta) / T``, the pair scales the covariance by ``T`` at a prior
ratio ``T delta``: the one knob that widens a posterior which ``G`` has made too narrow (dense
outputs with correlated errors, where the independent-element likelihood over-counts evidence).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ..likelihoods import Categorical, Gaussian, Likelihood
from ..posterior import (DiagGaussianPosterior, GaussianPosterior, KronGaussianPosterior,
                         LowRankPrecisionGaussianPosterior, Posterior)
from ..priors import NormalPrior
from ..subspace import Subspace
from .ggn import ggn_diag, ggn_full, ggn_matmul, top_eigen
from .kron import KronGGN, ggn_kron
from .objective import batches

HESSIANS = ("full", "diag", "kron", "lowrank")
TUNERS = (None, "marglik", "gridsearch")
BACKENDS = ("auto", "jvp", "laplace-torch")
DEFAULT_GRID = tuple(10.0 ** e for e in torch.arange(-4.0, 4.01, 0.5).tolist())


def fit_laplace(sub: Subspace, loader: Iterable, lik: Likelihood, prior: NormalPrior | None = None,
                hessian: str = "full", tune_prior: str | None = None,
                val_loader: Iterable | None = None, rank: int = 20, chunk_size: int = 64,
                progress: bool = True, backend: str = "auto", diag_probes: int | None = None,
                prior_grid: Iterable[float] = DEFAULT_GRID, n_samples: int = 64,
                generator: torch.Generator | None = None, temperature: float = 1.0,
                temperature_grid: Iterable[float] | None = None) -> Posterior:
    r"""Laplace approximation ``N(theta*, (G / T + delta)^{-1})`` at ``theta* = sub.theta``.

    Args:
        sub: the subspace, with ``sub.theta`` at the MAP estimate (run ``bc.fit_map`` first).
        loader: the training data, ``(x, y)`` batches; the GGN is summed over all of it.
        lik: ``bc.Gaussian`` (fixed, learned or heteroscedastic) or ``bc.Categorical``.
        prior: ``bc.NormalPrior``; ``None`` means unit precision.
        hessian: ``"full"`` -> :class:`GaussianPosterior`, ``"diag"`` ->
            :class:`DiagGaussianPosterior`, ``"lowrank"`` -> :class:`LowRankPrecisionGaussianPosterior`,
            ``"kron"`` -> :class:`KronGaussianPosterior` (KFAC blocks for LoRA factors, a diagonal
            elsewhere; its prior precision must be constant on each Kronecker block).
        tune_prior: ``None``, ``"marglik"`` or ``"gridsearch"`` (needs ``val_loader``).
        rank: eigenpairs kept by ``"lowrank"``.
        chunk_size: tangent vectors per JVP/VJP call; memory grows with
            ``chunk_size x batch x outputs``.
        progress: tqdm progress bars.
        backend: ``"jvp"`` (this package's JVP/VJP GGN), ``"laplace-torch"`` (laplace-torch's
            curvature, ``"full"``/``"diag"``, CPU, tensor inputs, outputs flattened to
            ``(B, outputs)``, homoscedastic scalar-sigma Gaussian or ``(B, C)`` Categorical),
            ``"auto"``: laplace-torch where it serves (those cases with fewer than ``d / 8``
            outputs per batch, where reverse-mode Jacobians are cheaper), else ``"jvp"``.
            ``"kron"`` and ``"lowrank"`` always use this package's engines (``"laplace-torch"``
            raises for them).
        diag_probes: with ``"diag"``: ``None`` for the exact diagonal, or a number of Rademacher
            probes for the unbiased estimate. With ``"kron"``: Rademacher probes (backward passes)
            per batch for the Kronecker gradient factors and the diagonal entries (``None``: 1).
        prior_grid: precisions tried by ``"gridsearch"``.
        n_samples: posterior samples per precision in ``"gridsearch"`` (common random numbers).
        generator: for the randomised eigensolver, the probes (``"diag"``, ``"kron"``) and the
            grid search samples.
        temperature: ``T``; the likelihood is tempered as ``log p(D | theta) / T``, so the GGN and
            the log-likelihood are divided by ``T`` (``T > 1`` widens the posterior: for dense
            outputs whose elements are far from independent, e.g. the pixels of a depth map,
            the independent-pixel likelihood over-counts the evidence).
        temperature_grid: with ``"gridsearch"``, temperatures searched jointly with
            ``prior_grid`` (every pair); the curvature is computed once for all of them.

    Returns:
        the posterior; its ``history`` holds one record with ``prior_precision`` (when scalar),
        ``temperature``, ``log_lik`` (untempered) and, with ``"marglik"``, ``log_marglik``.
    """
    _check_args(hessian, tune_prior, val_loader, backend, rank)
    temperatures = _check_temperatures(temperature, temperature_grid, tune_prior)
    theta = sub.theta
    lik = lik.to(sub.device)
    prec = (prior.precision if prior is not None else torch.tensor(1.0)).to(theta)
    tuned = tune_prior is not None
    use_lt = backend == "laplace-torch" or (backend == "auto" and _laplace_torch_serves(
        sub, loader, lik, hessian, diag_probes))
    if use_lt:
        curv = _laplace_torch_curvature(sub, loader, lik, hessian, progress)
    elif hessian == "full":
        curv = _FullCurvature(*ggn_full(sub, loader, lik, theta, chunk_size, progress))
    elif hessian == "diag":
        curv = _DiagCurvature(*ggn_diag(sub, loader, lik, theta, chunk_size, progress,
                                        diag_probes, generator))
    elif hessian == "kron":
        curv = _KronCurvature.from_ggn(ggn_kron(sub, loader, lik, theta, diag_probes, progress,
                                                generator))
    else:
        white = torch.ones_like(theta) if tuned else prec.rsqrt().expand_as(theta)
        log_lik = []

        def matmul(v: torch.Tensor) -> torch.Tensor:
            gv, ll = ggn_matmul(sub, loader, lik, theta, white[:, None] * v, chunk_size, progress)
            log_lik.append(ll)
            return white[:, None] * gv

        vals, vecs = top_eigen(matmul, theta.shape[0], rank, theta, generator=generator)
        curv = _LowRankCurvature(vals, vecs, log_lik[-1], white, tuned)

    record: dict[str, float] = {"log_lik": float(curv.log_lik.detach())}
    if tune_prior == "gridsearch":
        prec, temperature = _tune_grid(sub, curv, theta, val_loader, lik, prior_grid, temperatures,
                                       n_samples, chunk_size, generator)
    record["temperature"] = float(temperature)
    curv = curv.scaled(1.0 / temperature)
    if tune_prior == "marglik":
        prec, record["log_marglik"] = _tune_marglik(curv, theta)
    if prec.dim() == 0:
        record["prior_precision"] = float(prec)
    return curv.posterior(theta, prec, lik, [record])


def _check_args(hessian: str, tune_prior: str | None, val_loader: Iterable | None, backend: str,
                rank: int) -> None:
    if hessian not in HESSIANS:
        raise ValueError(f"unknown hessian {hessian!r}; choose one of 'full', 'diag', 'kron', 'lowrank'")
    if tune_prior not in TUNERS:
        raise ValueError(f"unknown tune_prior {tune_prior!r}; choose None, 'marglik' or 'gridsearch'")
    if tune_prior == "gridsearch" and val_loader is None:
        raise ValueError("tune_prior='gridsearch' needs validation data: pass val_loader=<loader of "
                         "(x, y) batches>, or use tune_prior='marglik', which needs none")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'jvp' or 'laplace-torch'")
    if hessian == "lowrank" and (int(rank) != rank or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")


def _check_temperatures(temperature: float, grid: Iterable[float] | None,
                        tune_prior: str | None) -> tuple[float, ...]:
    """The temperatures to try: ``(temperature,)`` or the grid (with ``"gridsearch"`` only)."""
    if grid is not None and tune_prior != "gridsearch":
        raise ValueError("temperature_grid is searched by tune_prior='gridsearch' only; pass "
                         "tune_prior='gridsearch' and val_loader, or a single temperature=")
    temps = tuple(float(t) for t in grid) if grid is not None else (float(temperature),)
    if not temps or any(not math.isfinite(t) or t <= 0 for t in temps):
        raise ValueError(f"temperatures must be finite and > 0, got {temps}")
    return temps


# ------------------------------------------------------------------------------ curvatures
class _FullCurvature:
    """Dense ``G``; eigenvalues on demand for prior tuning."""

    def __init__(self, ggn: torch.Tensor, log_lik: torch.Tensor):
        self.ggn, self.log_lik = ggn, log_lik

    def eigvals(self) -> torch.Tensor:
        return torch.linalg.eigvalsh(self.ggn).clamp_min(0.0)

    def scaled(self, c: float) -> "_FullCurvature":
        """The curvature of the likelihood raised to the power ``c``: ``c G``, ``c log p``."""
        return self if c == 1.0 else _FullCurvature(c * self.ggn, c * self.log_lik)

    def posterior(self, theta: torch.Tensor, prec: torch.Tensor, lik: Likelihood,
                  history: list[dict[str, float]]) -> Posterior:
        precision = self.ggn + torch.diag(prec.expand_as(theta))
        return GaussianPosterior.from_precision(theta, precision, likelihood=lik, history=history)


class _DiagCurvature:
    """``diag(G)``."""

    def __init__(self, diag: torch.Tensor, log_lik: torch.Tensor):
        self.diag, self.log_lik = diag, log_lik

    def eigvals(self) -> torch.Tensor:
        return self.diag.clamp_min(0.0)

    def scaled(self, c: float) -> "_DiagCurvature":
        """``c diag(G)``, ``c log p``."""
        return self if c == 1.0 else _DiagCurvature(c * self.diag, c * self.log_lik)

    def posterior(self, theta: torch.Tensor, prec: torch.Tensor, lik: Likelihood,
                  history: list[dict[str, float]]) -> Posterior:
        return DiagGaussianPosterior(theta, (self.diag.clamp_min(0.0) + prec).rsqrt(),
                                     likelihood=lik, history=history)


class _LowRankCurvature:
    """Top eigenpairs of ``W G W`` with ``W = diag(white)``: the prior std when the prior is kept,
    ones when a scalar precision is tuned (then ``S G S`` for ``S = delta^{-1/2}`` has the same
    vectors and values ``lam / delta``)."""

    def __init__(self, vals: torch.Tensor, vecs: torch.Tensor, log_lik: torch.Tensor,
                 white: torch.Tensor, unwhitened: bool):
        self.vals, self.vecs, self.log_lik, self.white, self.unwhitened = vals, vecs, log_lik, white, unwhitened

    def eigvals(self) -> torch.Tensor:
        zeros = torch.zeros(self.white.shape[0] - self.vals.shape[0], dtype=self.vals.dtype,
                            device=self.vals.device)
        return torch.cat([self.vals, zeros])

    def scaled(self, c: float) -> "_LowRankCurvature":
        """``c W G W`` has the same vectors and values ``c lam``."""
        return self if c == 1.0 else _LowRankCurvature(c * self.vals, self.vecs, c * self.log_lik,
                                                       self.white, self.unwhitened)

    def posterior(self, theta: torch.Tensor, prec: torch.Tensor, lik: Likelihood,
                  history: list[dict[str, float]]) -> Posterior:
        vals, std = self.vals, self.white
        if self.unwhitened:
            vals, std = vals / prec, prec.rsqrt().expand_as(theta)
        return LowRankPrecisionGaussianPosterior(theta, std, self.vecs, vals, likelihood=lik,
                                                 history=history)


class _KronCurvature:
    """KFAC blocks ``H kron Q`` as eigendecompositions ``(lam_h, U_h)``, ``(lam_q, U_q)``, and a
    diagonal for the other entries; ``c G`` scales ``lam_h`` (and the diagonal) by ``c``."""

    def __init__(self, blocks: list[dict[str, Any]], diag_index: torch.Tensor, diag: torch.Tensor,
                 log_lik: torch.Tensor):
        self.blocks, self.diag_index, self.diag, self.log_lik = blocks, diag_index, diag, log_lik

    @classmethod
    def from_ggn(cls, ggn: KronGGN) -> "_KronCurvature":
        blocks = []
        for b in ggn.blocks:
            h_vals, h_vecs = _eigh_psd(b.grad_factor)
            q_vals, q_vecs = _eigh_psd(b.input_factor)
            blocks.append({"name": b.name, "offset": b.offset, "h_eigvals": h_vals,
                           "h_eigvecs": h_vecs, "q_eigvals": q_vals, "q_eigvecs": q_vecs})
        return cls(blocks, ggn.diag_index, ggn.diag.clamp_min(0.0), ggn.log_lik)

    def eigvals(self) -> torch.Tensor:
        """Every ``lam_h[i] lam_q[j]`` and the diagonal entries: the eigenvalues of ``G``."""
        return torch.cat([torch.outer(b["h_eigvals"], b["q_eigvals"]).reshape(-1)
                          for b in self.blocks] + [self.diag])

    def scaled(self, c: float) -> "_KronCurvature":
        """``c G``, ``c log p``: ``c lam_h`` and ``c diag``."""
        if c == 1.0:
            return self
        blocks = [{**b, "h_eigvals": c * b["h_eigvals"]} for b in self.blocks]
        return _KronCurvature(blocks, self.diag_index, c * self.diag, c * self.log_lik)

    def posterior(self, theta: torch.Tensor, prec: torch.Tensor, lik: Likelihood,
                  history: list[dict[str, float]]) -> Posterior:
        prec = prec.expand_as(theta)
        blocks = []
        for b in self.blocks:
            size = b["h_eigvals"].shape[0] * b["q_eigvals"].shape[0]
            block_prec = prec[b["offset"]:b["offset"] + size]
            if not bool((block_prec == block_prec[0]).all()):
                raise ValueError(f"hessian='kron' needs one prior precision per Kronecker block (a "
                                 f"per-entry precision breaks the H kron Q + delta I eigenstructure), "
                                 f"but it varies over {b['name']}: use a scalar NormalPrior(scale=...), "
                                 f"a prior scale that is constant on each LoRA factor, "
                                 f"tune_prior='marglik', or hessian='full' / 'diag'")
            blocks.append({**b, "prior_precision": float(block_prec[0])})
        return KronGaussianPosterior(theta, blocks, self.diag_index, self.diag + prec[self.diag_index],
                                     likelihood=lik, history=history)


def _eigh_psd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a PSD factor, computed in float64 (float32 ``eigh`` fails to converge on the
    rank-deficient input factors of wide layers), eigenvalues clamped at 0, in ``mat``'s dtype."""
    vals, vecs = torch.linalg.eigh(mat.double())
    return vals.clamp_min(0.0).to(mat.dtype), vecs.to(mat.dtype)


# ---------------------------------------------------------------------------- prior tuning
def _tune_marglik(curv: Any, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The scalar ``delta`` maximising the Laplace evidence (bisection on ``log delta``), and the
    evidence there."""
    lam = curv.eigvals().double()
    sq = float((theta.double() ** 2).sum())
    lo, hi = math.log(1e-12), math.log(1e12)
    for _ in range(200):  # F(delta) = delta ||theta||^2 - gamma(delta) is increasing
        mid = 0.5 * (lo + hi)
        delta = math.exp(mid)
        if delta * sq - float((lam / (lam + delta)).sum()) < 0:
            lo = mid
        else:
            hi = mid
    delta = math.exp(0.5 * (lo + hi))
    d = lam.shape[0]
    log_marglik = (float(curv.log_lik.detach()) - 0.5 * delta * sq + 0.5 * d * math.log(delta)
                   - 0.5 * float(torch.log(lam + delta).sum()))
    return torch.tensor(delta, dtype=theta.dtype, device=theta.device), log_marglik


def _tune_grid(sub: Subspace, curv: Any, theta: torch.Tensor, val_loader: Iterable,
               lik: Likelihood, grid: Iterable[float], temperatures: tuple[float, ...],
               n_samples: int, chunk_size: int, generator: torch.Generator | None,
               ) -> tuple[torch.Tensor, float]:
    """The ``(precision, temperature)`` pair of the grid with the lowest validation NLL of the
    linearised predictive."""
    from ..predictive import predict

    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device)) \
        if generator is not None else 0
    best, best_nll = None, math.inf
    for temp, delta in ((t, g) for t in temperatures for g in grid):
        prec = torch.tensor(float(delta), dtype=theta.dtype, device=theta.device)
        post = curv.scaled(1.0 / temp).posterior(theta, prec, lik, [])
        total, count = 0.0, 0
        for i, x, y in batches(val_loader, sub.device):
            gen = torch.Generator(device=theta.device).manual_seed(seed + i)  # common random numbers
            pred = predict(sub, post, x, n_samples, likelihood=lik, generator=gen,
                           chunk_size=chunk_size, linearized=True)
            nll = _nll(pred, y, lik)
            total, count = total + float(nll.sum()), count + nll.numel()
        if count == 0:
            raise ValueError("val_loader is empty: it yields no batch")
        if total / count < best_nll:
            best, best_nll = (prec, temp), total / count
    return best


def _nll(pred: Any, y: torch.Tensor, lik: Likelihood) -> torch.Tensor:
    """Per-element negative log predictive density: Gaussian moment-matched, or ``-log p̄_y``."""
    if isinstance(lik, Categorical):
        return -pred.probs.gather(1, y.long().unsqueeze(1)).clamp_min(1e-30).log()
    y = y.to(pred.mean)
    return 0.5 * ((y - pred.mean) ** 2 / pred.total + pred.total.log() + math.log(2 * math.pi))


# ------------------------------------------------------------------ laplace-torch backend
class _FlatOutputs(nn.Module):
    """``sub(x)`` flattened to ``(B, outputs)``; its only trainable parameters are theta's."""

    def __init__(self, sub: Subspace):
        super().__init__()
        self.sub = sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sub(x)
        return out.reshape(out.shape[0], -1)


def _laplace_torch_ok(sub: Subspace, lik: Likelihood, hessian: str) -> str | None:
    """Why laplace-torch cannot compute this curvature, or ``None``."""
    if hessian not in ("full", "diag"):
        return f"hessian={hessian!r} (laplace-torch serves 'full' and 'diag' here)"
    if sub.device.type != "cpu":
        return "a non-CPU device (laplace-torch's default full-GGN backend fails off the CPU)"
    if isinstance(lik, Gaussian) and (lik.heteroscedastic or lik.sigma.numel() != 1):
        return "a heteroscedastic or per-element-sigma Gaussian"
    if not isinstance(lik, (Gaussian, Categorical)):
        return f"likelihood {type(lik).__name__}"
    return None


def _laplace_torch_serves(sub: Subspace, loader: Iterable, lik: Likelihood, hessian: str,
                          diag_probes: int | None) -> bool:
    if diag_probes is not None or _laplace_torch_ok(sub, lik, hessian) is not None:
        return False
    for _, x, _ in batches(loader, sub.device):
        if not isinstance(x, torch.Tensor):
            return False
        with torch.no_grad():
            out = sub(x)
        return (out.dim() == 2 or isinstance(lik, Gaussian)) and 8 * out.numel() < sub.dim
    return False


def _laplace_torch_curvature(sub: Subspace, loader: Iterable, lik: Likelihood, hessian: str,
                             progress: bool) -> Any:
    """``G`` (full or diagonal) from laplace-torch on a wrapper exposing only theta."""
    from laplace import Laplace

    reason = _laplace_torch_ok(sub, lik, hessian)
    if reason is not None:
        raise ValueError(f"backend='laplace-torch' cannot handle {reason}; use backend='jvp'")
    classify = isinstance(lik, Categorical)
    data, log_lik = _ListLoader(), torch.zeros((), dtype=torch.float64)
    for i, x, y in batches(loader, sub.device):
        if not isinstance(x, torch.Tensor):
            raise ValueError("backend='laplace-torch' needs tensor inputs; use backend='jvp'")
        with torch.no_grad():
            out = sub(x)
        if i == 0:
            lik.check_target(out, y)
        log_lik += lik.log_prob(out, y).sum().double()
        data.append((x, y if classify else y.reshape(y.shape[0], -1)))
    if not data:
        raise ValueError("the loader is empty: it yields no batch; check the dataset and batch size")
    la = Laplace(_FlatOutputs(sub), "classification" if classify else "regression",
                 subset_of_weights="all", hessian_structure=hessian, prior_precision=1.0,
                 sigma_noise=1.0 if classify else lik.sigma.item())
    la.fit(data, progress_bar=progress)
    if hessian == "full":  # G = P - I for unit prior precision
        eye = torch.eye(sub.dim, dtype=la.posterior_precision.dtype)
        return _FullCurvature((la.posterior_precision - eye).to(sub.dtype), log_lik)
    return _DiagCurvature((la.posterior_precision - 1.0).to(sub.dtype), log_lik)


class _ListLoader(list):
    """A list of batches with the ``.dataset`` length laplace-torch reads."""

    @property
    def dataset(self) -> range:
        return range(sum(x.shape[0] for x, _ in self))
