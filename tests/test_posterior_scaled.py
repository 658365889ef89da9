"""``Posterior.scaled(c)``: the same mean, covariance ``c Sigma``, draws ``mu + sqrt(c) (theta - mu)``
from the same generator, attributes carried over, and save / load of a scaled posterior.

Everything is float64, so a quantity computed two algebraically equal ways agrees to a few ulps
times the number of terms summed (``d <= 8``): ``rtol = 1e-12`` leaves a margin of ~1e3.
"""
from __future__ import annotations

import math

import pytest
import torch

import bayes_colora as bc
from bayes_colora.posterior import KronGaussianPosterior, LowRankPrecisionGaussianPosterior

D = 8  # a 2 x 3 Kronecker block plus two diagonal entries for the Kron posterior
RTOL = 1e-12
KINDS = ["dirac", "full", "diag", "lowrank", "lowrank_precision", "kron", "samples"]


def _orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def _posterior(kind: str) -> bc.Posterior:
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(D, generator=g, dtype=torch.float64)
    kw = {"likelihood": bc.Gaussian(sigma=0.3), "history": [{"epoch": 1, "loss": 2.0}]}
    if kind == "dirac":
        return bc.DiracPosterior(loc, **kw)
    if kind == "full":
        a = torch.randn(D, D, generator=g, dtype=torch.float64)
        spd = a @ a.T + torch.eye(D, dtype=torch.float64)
        return bc.GaussianPosterior(loc, torch.linalg.cholesky(spd), **kw)
    if kind == "diag":
        return bc.DiagGaussianPosterior(loc, torch.rand(D, generator=g, dtype=torch.float64) + 0.1, **kw)
    if kind == "lowrank":
        return bc.LowRankGaussianPosterior(loc, torch.rand(D, generator=g, dtype=torch.float64),
                                           torch.randn(D, 3, generator=g, dtype=torch.float64), **kw)
    if kind == "lowrank_precision":
        return LowRankPrecisionGaussianPosterior(loc, torch.rand(D, generator=g, dtype=torch.float64) + 0.5,
                                                 _orthonormal(D, 3, g),
                                                 5 * torch.rand(3, generator=g, dtype=torch.float64), **kw)
    if kind == "kron":
        block = {"name": "w", "offset": 1, "prior_precision": 0.7,
                 "h_eigvals": torch.rand(2, generator=g, dtype=torch.float64) * 4,
                 "h_eigvecs": _orthonormal(2, 2, g),
                 "q_eigvals": torch.rand(3, generator=g, dtype=torch.float64) * 4,
                 "q_eigvecs": _orthonormal(3, 3, g)}
        return KronGaussianPosterior(loc, [block], torch.tensor([0, 7]),
                                     torch.rand(2, generator=g, dtype=torch.float64) + 0.2, **kw)
    samples = loc + torch.randn(50, D, generator=g, dtype=torch.float64)
    return bc.SamplePosterior(samples, r_hat=torch.full((D,), 1.01, dtype=torch.float64),
                              ess=torch.full((D,), 40.0, dtype=torch.float64), **kw)


@pytest.mark.parametrize("c", [0.01, 1.0, 37.0])
@pytest.mark.parametrize("kind", KINDS)
def test_scaled_multiplies_the_covariance_and_keeps_the_mean(kind, c):
    post = _posterior(kind)
    scaled = post.scaled(c)
    assert type(scaled) is type(post)
    torch.testing.assert_close(scaled.mean, post.mean, rtol=RTOL, atol=RTOL * float(post.mean.abs().max()))
    cov = post.covariance
    scale = float(cov.abs().max()) or 1.0
    torch.testing.assert_close(scaled.covariance, c * cov, rtol=RTOL, atol=RTOL * c * scale)
    torch.testing.assert_close(scaled.variance, c * post.variance, rtol=RTOL, atol=RTOL * c * scale)
    assert scaled.likelihood is post.likelihood
    assert scaled.history == post.history
    if kind == "samples":
        assert torch.equal(scaled.r_hat, post.r_hat) and torch.equal(scaled.ess, post.ess)
    if kind == "dirac":
        assert scaled is post
    elif c != 1.0:  # a real change: c Sigma differs from Sigma
        assert not torch.allclose(scaled.variance, post.variance)


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_draws_are_the_draws_moved_about_the_mean(kind):
    """The same generator: each class's draw is an affine function of the same noise (or, for
    samples, the same indices), so ``scaled(c)`` draws exactly ``mu + sqrt(c) (theta - mu)``."""
    post, c = _posterior(kind), 6.25
    theta = post.sample(11, generator=torch.Generator().manual_seed(3))
    got = post.scaled(c).sample(11, generator=torch.Generator().manual_seed(3))
    want = post.mean + math.sqrt(c) * (theta - post.mean)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_posterior_round_trips_save_load(kind, tmp_path):
    post, c = _posterior(kind), 0.2
    scaled = post.scaled(c)
    scaled.save(tmp_path / "p.pt")
    loaded = bc.load_posterior(tmp_path / "p.pt")
    assert type(loaded) is type(post)
    want = scaled.sample(9, generator=torch.Generator().manual_seed(5))
    got = loaded.sample(9, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(loaded.covariance, scaled.covariance, rtol=0, atol=0)
    assert loaded.history == post.history
    assert type(loaded.likelihood) is type(post.likelihood)
    assert loaded.likelihood.config() == post.likelihood.config()


@pytest.mark.parametrize("c", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["dirac", "lowrank", "samples"])
def test_scaled_refuses_a_non_positive_or_non_finite_c(kind, c):
    with pytest.raises(ValueError, match="c > 0"):
        _posterior(kind).scaled(c)
