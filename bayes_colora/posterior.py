"""The one small interface every posterior over theta has, its persistence, and the Dirac case.

``sample(n, generator=None)`` gives ``(n, d)``, ``mean`` gives ``(d,)``, ``covariance`` gives
``(d, d)`` where the posterior has one. ``save(path)`` writes one file atomically and
:func:`load_posterior` reads it back: the loaded posterior gives the same samples for the same
generator. A posterior also remembers the likelihood it was fitted with, so ``bc.predict`` can
split predictive variance into aleatoric and epistemic parts. ``scaled(c)`` gives the same
posterior with its covariance multiplied by ``c`` (a tempered or calibrated spread).
"""
from __future__ import annotations

import math
import os
from typing import Any, ClassVar

import torch

from .likelihoods import Likelihood, likelihood_from_config

_KINDS: dict[str, type["Posterior"]] = {}


class Posterior:
    """Base class. Subclasses hold tensors in attributes named by ``state_keys`` and implement
    ``sample`` and ``mean``; ``covariance`` and ``variance`` where they can."""

    #: attribute names saved by ``save`` (tensors, numbers, strings, lists of dicts)
    state_keys: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _KINDS[cls.__name__] = cls

    likelihood: Likelihood | None = None
    #: per-epoch (or per-step) training records, where the engine kept any
    history: list[dict[str, Any]]

    @property
    def dim(self) -> int:
        return int(self.mean.shape[-1])

    @property
    def mean(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def covariance(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no dense covariance; use sample() "
                                  f"or variance")

    @property
    def variance(self) -> torch.Tensor:
        """Marginal variances, shape ``(d,)``."""
        return self.covariance.diagonal()

    @property
    def is_point_mass(self) -> bool:
        """True for a Dirac posterior: every sample is the mean."""
        return False

    #: True where ``theta`` and its reflection ``2 mean - theta`` are equally likely (Gaussians)
    is_symmetric: ClassVar[bool] = False

    def scaled(self, c: float) -> "Posterior":
        r"""The same posterior with its covariance multiplied by ``c > 0``: mean ``mu`` unchanged,
        covariance ``c Sigma``, i.e. the law of ``mu + sqrt(c) (theta - mu)`` for ``theta`` drawn
        from this posterior. Each class keeps its own parametrisation (a Cholesky or low-rank
        factor times ``sqrt(c)``, variances times ``c``, a precision divided by ``c``), and the
        likelihood, the history and any other attributes carry over. ``c = 1`` gives an equal
        posterior; ``c < 1`` sharpens it, ``c > 1`` widens it (e.g. SWAG's covariance scale).

        Raises ``ValueError`` unless ``c`` is a finite positive number.
        """
        c = float(c)
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"scaled(c) needs a finite c > 0 (the covariance c Sigma must stay a "
                             f"covariance), got {c!r}")
        return self._scaled(c)

    def _scaled(self, c: float) -> "Posterior":
        """:meth:`scaled` for a checked ``c > 0``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement scaled()")

    def save(self, path: str | os.PathLike) -> None:
        """Write this posterior (and its likelihood) to one file, atomically."""
        from .subspace import _atomic_write

        payload = {"kind": type(self).__name__,
                   "state": {k: getattr(self, k) for k in self.state_keys},
                   "history": getattr(self, "history", []),
                   "likelihood": None if self.likelihood is None else {
                       "config": self.likelihood.config(),
                       "state": {k: v.cpu() for k, v in self.likelihood.state_dict().items()}}}
        _atomic_write(path, lambda tmp: torch.save(payload, tmp))

    def _finish(self, likelihood: Likelihood | None, history: list[dict[str, Any]] | None) -> None:
        self.likelihood = likelihood
        self.history = list(history or [])


def load_posterior(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Posterior:
    """Read a posterior written by :meth:`Posterior.save`."""
    payload = torch.load(path, map_location=map_location, weights_only=False)
    kind = payload.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{path}: unknown posterior kind {kind!r} (known: {sorted(_KINDS)})")
    cls = _KINDS[kind]
    post = cls.__new__(cls)
    for k, v in payload["state"].items():
        setattr(post, k, v)
    lik = None
    if payload.get("likelihood") is not None:
        lik = likelihood_from_config(payload["likelihood"]["config"])
        lik.load_state_dict(payload["likelihood"]["state"])
    post._finish(lik, payload.get("history"))
    return post


class DiracPosterior(Posterior):
    """A point mass at ``theta_hat``: point-estimate training is inference with this posterior."""

    state_keys = ("theta_hat",)

    def __init__(self, theta_hat: torch.Tensor, likelihood: Likelihood | None = None,
                 history: list[dict[str, Any]] | None = None):
        self.theta_hat = theta_hat.detach().clone()
        self._finish(likelihood, history)

    @property
    def mean(self) -> torch.Tensor:
        return self.theta_hat

    @property
    def covariance(self) -> torch.Tensor:
        d = self.theta_hat.shape[0]
        return torch.zeros(d, d, dtype=self.theta_hat.dtype, device=self.theta_hat.device)

    @property
    def variance(self) -> torch.Tensor:
        return torch.zeros_like(self.theta_hat)

    @property
    def is_point_mass(self) -> bool:
        return True

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.theta_hat.expand(n, -1).clone()

    def _scaled(self, c: float) -> "DiracPosterior":
        """``c * 0 = 0``: the point mass itself."""
        return self


def standard_normal(shape: tuple[int, ...], like: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
    """``N(0, I)`` noise of ``shape`` drawn on the generator's device, returned on ``like``'s."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class _Gaussian(Posterior):
    """A Gaussian ``N(loc, Sigma)``: symmetric about its mean ``loc``; subclasses differ in how
    they hold ``Sigma``."""

    is_symmetric = True
    loc: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.loc


class GaussianPosterior(_Gaussian):
    r"""``N(mu, L L^T)`` with a dense lower-triangular Cholesky factor ``L`` (``scale_tril``)."""

    state_keys = ("loc", "scale_tril")

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor, likelihood: Likelihood | None = None,
                 history: list[dict[str, Any]] | None = None):
        self.loc, self.scale_tril = loc.detach().clone(), scale_tril.detach().clone()
        self._finish(likelihood, history)

    @classmethod
    def from_precision(cls, loc: torch.Tensor, precision: torch.Tensor, **kwargs: Any) -> "GaussianPosterior":
        r"""From a precision matrix ``P``: ``Sigma = P^{-1}``, ``L = chol(Sigma)`` via
        ``chol(P)^{-T}`` (no explicit inverse of an ill-conditioned matrix)."""
        p_chol = torch.linalg.cholesky(precision)
        eye = torch.eye(precision.shape[0], dtype=precision.dtype, device=precision.device)
        inv_upper = torch.linalg.solve_triangular(p_chol.mT, eye, upper=True)  # chol(P)^{-T}
        # Sigma = inv_upper inv_upper^T with inv_upper upper triangular; take its lower Cholesky
        scale_tril = torch.linalg.cholesky(inv_upper @ inv_upper.mT)
        return cls(loc, scale_tril.to(loc.dtype), **kwargs)

    @property
    def covariance(self) -> torch.Tensor:
        return self.scale_tril @ self.scale_tril.mT

    @property
    def variance(self) -> torch.Tensor:
        return (self.scale_tril ** 2).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = standard_normal((n, self.loc.shape[0]), self.loc, generator)
        return self.loc + eps @ self.scale_tril.mT

    def _scaled(self, c: float) -> "GaussianPosterior":
        r"""``(sqrt(c) L)(sqrt(c) L)^T = c L L^T``."""
        return GaussianPosterior(self.loc, math.sqrt(c) * self.scale_tril, likelihood=self.likelihood,
                                 history=self.history)


class DiagGaussianPosterior(_Gaussian):
    """``N(mu, diag(std^2))``."""

    state_keys = ("loc", "std")

    def __init__(self, loc: torch.Tensor, std: torch.Tensor, likelihood: Likelihood | None = None,
                 history: list[dict[str, Any]] | None = None):
        self.loc, self.std = loc.detach().clone(), std.detach().clone()
        self._finish(likelihood, history)

    @property
    def covariance(self) -> torch.Tensor:
        return torch.diag(self.std ** 2)

    @property
    def variance(self) -> torch.Tensor:
        return self.std ** 2

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.loc + self.std * standard_normal((n, self.loc.shape[0]), self.loc, generator)

    def _scaled(self, c: float) -> "DiagGaussianPosterior":
        """``diag((sqrt(c) std)^2) = c diag(std^2)``."""
        return DiagGaussianPosterior(self.loc, math.sqrt(c) * self.std, likelihood=self.likelihood,
                                     history=self.history)


class LowRankGaussianPosterior(_Gaussian):
    r"""``N(mu, diag(v) + F F^T)`` with ``v`` of shape ``(d,)`` and ``F`` of shape ``(d, K)``
    (SWAG's form; one draw ``mu + sqrt(v) e_1 + F e_2`` couples all of theta)."""

    state_keys = ("loc", "diag_var", "factor")

    def __init__(self, loc: torch.Tensor, diag_var: torch.Tensor, factor: torch.Tensor,
                 likelihood: Likelihood | None = None, history: list[dict[str, float]] | None = None):
        self.loc, self.diag_var, self.factor = (t.detach().clone() for t in (loc, diag_var, factor))
        self._finish(likelihood, history)

    @property
    def covariance(self) -> torch.Tensor:
        return torch.diag(self.diag_var) + self.factor @ self.factor.mT

    @property
    def variance(self) -> torch.Tensor:
        return self.diag_var + (self.factor ** 2).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        d, k = self.factor.shape
        e1 = standard_normal((n, d), self.loc, generator)
        e2 = standard_normal((n, k), self.loc, generator)
        return self.loc + self.diag_var.clamp_min(0).sqrt() * e1 + e2 @ self.factor.mT

    def _scaled(self, c: float) -> "LowRankGaussianPosterior":
        r"""``diag(c v) + (sqrt(c) F)(sqrt(c) F)^T = c (diag(v) + F F^T)``."""
        return LowRankGaussianPosterior(self.loc, c * self.diag_var, math.sqrt(c) * self.factor,
                                        likelihood=self.likelihood, history=self.history)


class LowRankPrecisionGaussianPosterior(_Gaussian):
    r"""``N(mu, Sigma)`` with a low-rank-plus-prior *precision*
    ``P = S^{-1} (I + U diag(lam) U^T) S^{-1}``: ``S = diag(prior_std)`` (``(d,)``), ``U`` of
    shape ``(d, K)`` with orthonormal columns (``eigvecs``), ``lam >= 0`` of shape ``(K,)``
    (``eigvals``) the top eigenvalues of the prior-whitened curvature ``S G S`` (Laplace's form).

    By Woodbury ``Sigma = S (I - U diag(lam / (1 + lam)) U^T) S``; a draw is
    ``mu + S (z + U diag(1 / sqrt(1 + lam) - 1) U^T z)`` with ``z ~ N(0, I_d)``.
    """

    state_keys = ("loc", "prior_std", "eigvecs", "eigvals")

    def __init__(self, loc: torch.Tensor, prior_std: torch.Tensor, eigvecs: torch.Tensor,
                 eigvals: torch.Tensor, likelihood: Likelihood | None = None,
                 history: list[dict[str, Any]] | None = None):
        self.loc, self.prior_std, self.eigvecs, self.eigvals = (
            t.detach().clone() for t in (loc, prior_std.expand_as(loc), eigvecs, eigvals))
        self._finish(likelihood, history)

    @property
    def covariance(self) -> torch.Tensor:
        u = self.eigvecs * (self.eigvals / (1 + self.eigvals)).sqrt()
        inner = torch.eye(self.loc.shape[0], dtype=self.loc.dtype, device=self.loc.device) - u @ u.mT
        return self.prior_std[:, None] * inner * self.prior_std[None, :]

    @property
    def variance(self) -> torch.Tensor:
        shrink = (self.eigvecs ** 2) @ (self.eigvals / (1 + self.eigvals))
        return self.prior_std ** 2 * (1 - shrink)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = standard_normal((n, self.loc.shape[0]), self.loc, generator)
        z = z + ((z @ self.eigvecs) * ((1 + self.eigvals).rsqrt() - 1)) @ self.eigvecs.mT
        return self.loc + self.prior_std * z

    def _scaled(self, c: float) -> "LowRankPrecisionGaussianPosterior":
        r"""``P / c = (sqrt(c) S)^{-1} (I + U diag(lam) U^T) (sqrt(c) S)^{-1}``: ``prior_std`` times
        ``sqrt(c)``, ``U`` and ``lam`` unchanged (the same low-rank-plus-prior structure)."""
        return LowRankPrecisionGaussianPosterior(self.loc, math.sqrt(c) * self.prior_std, self.eigvecs,
                                                 self.eigvals, likelihood=self.likelihood,
                                                 history=self.history)


class KronGaussianPosterior(_Gaussian):
    r"""``N(mu, P^{-1})`` with a block-diagonal precision ``P`` (the KFAC Laplace posterior).

    A *Kronecker block* covers the ``m n`` entries of one ``(m, n)`` parameter (flattened
    row-major) starting at ``offset``: ``P_b = H kron Q + delta I`` with ``H = U_h diag(lam_h) U_h^T``
    (``m x m``) and ``Q = U_q diag(lam_q) U_q^T`` (``n x n``) held as eigendecompositions, so
    ``P_b = (U_h kron U_q) diag(lam_h[i] lam_q[j] + delta) (U_h kron U_q)^T`` and, with
    ``D[i, j] = lam_h[i] lam_q[j] + delta``, a draw of the block reshaped to ``(m, n)`` is
    ``U_h (E / sqrt(D)) U_q^T`` for ``E ~ N(0, I)`` of shape ``(m, n)``, and its marginal variances
    are ``(U_h o U_h) (1 / D) (U_q o U_q)^T``: ``O(m n (m + n))`` per draw, never ``(m n)^2``.
    The remaining entries (``diag_index``) have a diagonal precision ``diag_precision``.

    Args:
        loc: the mean, ``(d,)``.
        blocks: one dict per Kronecker block with ``name`` (str), ``offset`` (int), ``h_eigvals``
            ``(m,)``, ``h_eigvecs`` ``(m, m)``, ``q_eigvals`` ``(n,)``, ``q_eigvecs`` ``(n, n)`` and
            ``prior_precision`` (``delta``, a float: a scalar per block keeps the eigenbasis).
        diag_index: positions of the other entries, ``(k,)``.
        diag_precision: their posterior precisions, ``(k,)``.
    """

    state_keys = ("loc", "blocks", "diag_index", "diag_precision")

    def __init__(self, loc: torch.Tensor, blocks: list[dict[str, Any]], diag_index: torch.Tensor,
                 diag_precision: torch.Tensor, likelihood: Likelihood | None = None,
                 history: list[dict[str, Any]] | None = None):
        self.loc = loc.detach().clone()
        keys = ("h_eigvals", "h_eigvecs", "q_eigvals", "q_eigvecs")
        self.blocks = [{"name": str(b["name"]), "offset": int(b["offset"]),
                        "prior_precision": float(b["prior_precision"]),
                        **{k: b[k].detach().to(self.loc).clone() for k in keys}} for b in blocks]
        self.diag_index = diag_index.detach().to(self.loc.device, torch.long).clone()
        self.diag_precision = diag_precision.detach().to(self.loc).clone()
        self._check()
        self._finish(likelihood, history)

    def _check(self) -> None:
        covered = torch.zeros(self.loc.shape[0], dtype=torch.long, device=self.loc.device)
        for b in self.blocks:
            covered[self._slice(b)] += 1
            if not bool((self._block_precisions(b) > 0).all()):
                raise ValueError(f"block {b['name']}: the precision lam_h lam_q + delta is not positive; "
                                 f"use a positive prior precision")
        covered.index_add_(0, self.diag_index, torch.ones_like(self.diag_index))
        if not bool((covered == 1).all()):
            raise ValueError("the Kronecker blocks and diag_index must cover every entry of theta once")
        if not bool((self.diag_precision > 0).all()):
            raise ValueError("diag_precision must be positive; use a positive prior precision")

    @staticmethod
    def _slice(b: dict[str, Any]) -> slice:
        return slice(b["offset"], b["offset"] + b["h_eigvals"].shape[0] * b["q_eigvals"].shape[0])

    @staticmethod
    def _block_precisions(b: dict[str, Any]) -> torch.Tensor:
        """``D[i, j] = lam_h[i] lam_q[j] + delta``, shape ``(m, n)``."""
        return torch.outer(b["h_eigvals"], b["q_eigvals"]) + b["prior_precision"]

    def _dense(self, power: float) -> torch.Tensor:
        """``P^power`` for ``power = 1`` (precision) or ``-1`` (covariance), ``d x d``."""
        d = self.loc.shape[0]
        out = torch.zeros(d, d, dtype=self.loc.dtype, device=self.loc.device)
        for b in self.blocks:
            u = torch.kron(b["h_eigvecs"], b["q_eigvecs"])
            s = self._slice(b)
            out[s, s] = (u * self._block_precisions(b).reshape(-1) ** power) @ u.mT
        out[self.diag_index, self.diag_index] = self.diag_precision ** power
        return out

    @property
    def covariance(self) -> torch.Tensor:
        """Dense and block-diagonal, ``d x d`` (for small ``d``)."""
        return self._dense(-1.0)

    @property
    def precision(self) -> torch.Tensor:
        """The dense block-diagonal precision ``P``, ``d x d`` (for small ``d``)."""
        return self._dense(1.0)

    @property
    def variance(self) -> torch.Tensor:
        var = torch.empty_like(self.loc)
        for b in self.blocks:
            inv = 1 / self._block_precisions(b)
            var[self._slice(b)] = ((b["h_eigvecs"] ** 2) @ inv @ (b["q_eigvecs"] ** 2).mT).reshape(-1)
        var[self.diag_index] = 1 / self.diag_precision
        return var

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = standard_normal((n, self.loc.shape[0]), self.loc, generator)
        noise = torch.empty_like(eps)
        for b in self.blocks:
            s, prec = self._slice(b), self._block_precisions(b)
            scaled = eps[:, s].reshape(n, *prec.shape) * prec.rsqrt()
            noise[:, s] = (b["h_eigvecs"] @ scaled @ b["q_eigvecs"].mT).reshape(n, -1)
        noise[:, self.diag_index] = eps[:, self.diag_index] * self.diag_precision.rsqrt()
        return self.loc + noise

    def _scaled(self, c: float) -> "KronGaussianPosterior":
        r"""``P / c``: per block ``(H / c) kron Q + (delta / c) I``, i.e. ``lam_h / c`` and
        ``delta / c`` with the eigenvectors unchanged (so ``D / c``), and ``diag_precision / c``."""
        blocks = [{**b, "h_eigvals": b["h_eigvals"] / c, "prior_precision": b["prior_precision"] / c}
                  for b in self.blocks]
        return KronGaussianPosterior(self.loc, blocks, self.diag_index, self.diag_precision / c,
                                     likelihood=self.likelihood, history=self.history)


class SamplePosterior(Posterior):
    r"""An empirical posterior: ``M`` samples ``(M, d)`` (e.g. from MCMC). ``sample(n)`` draws
    ``n`` of them uniformly with replacement; ``mean`` and ``covariance`` are the sample mean and
    the unbiased sample covariance. ``r_hat`` and ``ess`` hold the sampler's convergence
    diagnostics where it gave any (otherwise ``None``)."""

    state_keys = ("samples", "r_hat", "ess")

    def __init__(self, samples: torch.Tensor, r_hat: torch.Tensor | None = None,
                 ess: torch.Tensor | None = None, likelihood: Likelihood | None = None,
                 history: list[dict[str, Any]] | None = None):
        if samples.dim() != 2 or samples.shape[0] < 1:
            raise ValueError(f"samples must have shape (M, d) with M >= 1, got {tuple(samples.shape)}")
        self.samples = samples.detach().clone()
        self.r_hat = None if r_hat is None else r_hat.detach().clone()
        self.ess = None if ess is None else ess.detach().clone()
        self._finish(likelihood, history)

    @property
    def mean(self) -> torch.Tensor:
        return self.samples.mean(0)

    @property
    def covariance(self) -> torch.Tensor:
        if self.samples.shape[0] < 2:
            return torch.zeros(self.dim, self.dim, dtype=self.samples.dtype, device=self.samples.device)
        return torch.cov(self.samples.mT)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.samples.device
        idx = torch.randint(self.samples.shape[0], (n,), generator=generator, device=device)
        return self.samples[idx.to(self.samples.device)]

    def _scaled(self, c: float) -> "SamplePosterior":
        r"""The samples ``mu + sqrt(c) (theta_m - mu)`` about their mean ``mu``: the same mean, the
        sample covariance times ``c``. ``r_hat`` and ``ess`` carry over unchanged (both are
        invariant under one affine map per coordinate applied to every chain)."""
        mu = self.mean
        return SamplePosterior(mu + math.sqrt(c) * (self.samples - mu), r_hat=self.r_hat, ess=self.ess,
                               likelihood=self.likelihood, history=self.history)
