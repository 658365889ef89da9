r"""NUTS in a (projected) subspace against the closed-form posterior of a model linear in theta.

Tolerances from Monte Carlo error: the mean of M correlated draws has standard error
``sd / sqrt(ESS)``, so we allow 4 standard errors per coordinate. A sample covariance entry has
relative standard error about ``sqrt(2 / ESS)`` (Gaussian fourth moments); we allow 4 of those,
in units of ``sd_i sd_j``.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import bayes_colora as bc
from linear_gaussian import exact_posterior, linear_data, linear_subspace, loader

D, N, SIGMA, S = 3, 64, 0.5, 1.0


def problem():
    x, y, _ = linear_data(N, D, SIGMA)
    return linear_subspace(D), loader(x, y, 16), x, y


def test_identity_basis_recovers_the_exact_posterior():
    sub, dl, x, y = problem()
    torch.manual_seed(0)
    post = bc.fit_nuts(sub, dl, bc.Gaussian(SIGMA), bc.NormalPrior(S),
                       basis=torch.eye(D, dtype=torch.float64), num_samples=300, warmup=150,
                       num_chains=2, progress=False)
    mu, cov = exact_posterior(x, y, SIGMA, S)
    assert type(post) is bc.SamplePosterior and post.samples.shape == (600, D)
    assert post.r_hat.shape == (D,) and post.ess.shape == (D,)
    assert (post.r_hat - 1).abs().max() < 0.05                      # two chains agree
    sd, ess = cov.diagonal().sqrt(), post.ess
    assert ((post.mean - mu).abs() < 4 * sd / ess.sqrt()).all()
    rel = ((post.covariance - cov) / (sd[:, None] * sd)).abs().max()
    assert rel < 4 * (2 / ess.min()) ** 0.5
    assert torch.equal(sub.theta, torch.zeros(D, dtype=torch.float64))  # sub untouched


def test_projected_slice_with_the_induced_prior():
    # theta = theta0 + P z with a 2-column basis: the slice posterior is Gaussian in z with
    # precision P^T Lambda P and mean (P^T Lambda P)^{-1} P^T Lambda (mu - theta0)
    sub, dl, x, y = problem()
    mu, cov = exact_posterior(x, y, SIGMA, S)
    basis = bc.random_basis(D, 2, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(basis.T @ basis, torch.eye(2, dtype=torch.float64), atol=1e-12)
    theta0 = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    torch.manual_seed(1)
    post = bc.fit_nuts(sub, dl, bc.Gaussian(SIGMA), bc.NormalPrior(S), basis=basis,
                       theta0=theta0, num_samples=300, warmup=150, progress=False)
    lam = torch.linalg.inv(cov)
    prec_z = basis.T @ lam @ basis
    cov_z = torch.linalg.inv(prec_z)
    mean_z = cov_z @ basis.T @ lam @ (mu - theta0)
    z = (post.samples - theta0) @ basis                                # orthonormal: z = P^T dtheta
    assert torch.allclose(post.samples, theta0 + z @ basis.T, atol=1e-12)  # samples on the slice
    sd, ess = cov_z.diagonal().sqrt(), post.ess
    assert ((z.mean(0) - mean_z).abs() < 4 * sd / ess.sqrt()).all()
    rel = ((torch.cov(z.T) - cov_z) / (sd[:, None] * sd)).abs().max()
    assert rel < 4 * (2 / ess.min()) ** 0.5


def test_pca_basis_spans_the_low_rank_factor_and_checks_k():
    g = torch.Generator().manual_seed(0)
    factor = torch.randn(6, 3, generator=g, dtype=torch.float64)
    post = bc.LowRankGaussianPosterior(torch.zeros(6, dtype=torch.float64),
                                       torch.ones(6, dtype=torch.float64), factor)
    basis = bc.pca_basis(post, 3)
    assert torch.allclose(basis @ basis.T, factor @ factor.T, atol=1e-12)   # scaled by singular values
    gram = basis.T @ basis
    assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-12)    # orthogonal columns
    assert (gram.diagonal()[:-1] >= gram.diagonal()[1:]).all()             # largest first
    with pytest.raises(ValueError, match="k=4 must be between 1 and the rank 3"):
        bc.pca_basis(post, 4)
    with pytest.raises(ValueError, match="low-rank posterior"):
        bc.pca_basis(bc.DiagGaussianPosterior(torch.zeros(6), torch.ones(6)), 2)


def test_wrong_basis_shape_and_empty_loader_are_named():
    sub, dl, x, y = problem()
    with pytest.raises(ValueError, match=r"basis has shape \(4, 2\), expected \(d, k\) = \(3, k\)"):
        bc.fit_nuts(sub, dl, bc.Gaussian(SIGMA), bc.NormalPrior(S),
                    basis=torch.zeros(4, 2, dtype=torch.float64), progress=False)
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="loader is empty"):
        bc.fit_nuts(sub, empty, bc.Gaussian(SIGMA), bc.NormalPrior(S),
                    basis=torch.eye(D, dtype=torch.float64), progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        bc.fit_nuts(sub, dl, bc.Gaussian(SIGMA), bc.NormalPrior(S), max_batches=0,
                    basis=torch.eye(D, dtype=torch.float64), progress=False)


def test_save_load_gives_the_same_samples_and_diagnostics(tmp_path):
    sub, dl, _, _ = problem()
    torch.manual_seed(0)
    post = bc.fit_nuts(sub, dl, bc.Gaussian(SIGMA), bc.NormalPrior(S), max_batches=1,
                       basis=torch.eye(D, dtype=torch.float64)[:, :2], num_samples=20, warmup=10,
                       progress=False)
    post.save(tmp_path / "nuts.pt")
    loaded = bc.load_posterior(tmp_path / "nuts.pt")
    assert type(loaded) is bc.SamplePosterior
    a = post.sample(50, generator=torch.Generator().manual_seed(2))
    b = loaded.sample(50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert torch.equal(loaded.r_hat, post.r_hat) and torch.equal(loaded.ess, post.ess)
    # draws are rows of the stored samples
    assert all((post.samples == row).all(1).any() for row in a)


def test_sample_posterior_moments_are_empirical():
    s = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 2.0]], dtype=torch.float64)
    post = bc.SamplePosterior(s)
    assert torch.equal(post.mean, torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.allclose(post.covariance, torch.tensor([[4.0, 1.0], [1.0, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(M, d\)"):
        bc.SamplePosterior(torch.zeros(0, 2))
