"""Laplace engine: closed-form checks on a model linear in theta, laplace-torch agreement, the
JVP GGN against brute-force Jacobians on dense outputs, the linearised predictive, prior tuning."""
import math

import pytest
import torch
from torch import nn
from torch.func import jacrev
from torch.utils.data import DataLoader, TensorDataset

import bayes_colora as bc
from bayes_colora.inference.ggn import ggn_full

SIGMA, PRIOR_SCALE = 0.5, 0.5  # exact in float32: prior precision 4, noise variance 0.25


def linear_problem(n=40, p=5, seed=0):
    """``f(x; theta) = x @ theta`` (a float64 nn.Linear whose weight is theta) and data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, 1, generator=g, dtype=torch.float64) + SIGMA * torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(p, 1, bias=False).double()
    sub = bc.Subspace(model, [])  # the weight is the only trainable parameter: theta
    return sub, x, y, DataLoader(TensorDataset(x, y), batch_size=16)


def closed_form(x, y, prec):
    """Posterior covariance and mean of the conjugate linear-Gaussian model."""
    cov = torch.linalg.inv(x.T @ x / SIGMA ** 2 + prec * torch.eye(x.shape[1], dtype=x.dtype))
    return cov, cov @ x.T @ y[:, 0] / SIGMA ** 2


def log_evidence(x, y, prec):
    """``log N(y; 0, sigma^2 I + X X^T / prec)``."""
    k = SIGMA ** 2 * torch.eye(x.shape[0], dtype=x.dtype) + x @ x.T / prec
    return torch.distributions.MultivariateNormal(torch.zeros_like(y[:, 0]), k).log_prob(y[:, 0])


LIK = bc.Gaussian(sigma=SIGMA)
PRIOR = bc.NormalPrior(PRIOR_SCALE)


def test_full_diag_lowrank_match_the_closed_form_posterior():
    sub, x, y, loader = linear_problem()
    cov, mean = closed_form(x, y, 4.0)
    sub.theta = mean
    full = bc.fit_laplace(sub, loader, LIK, PRIOR, hessian="full", progress=False, backend="jvp")
    torch.testing.assert_close(full.covariance, cov, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(full.mean, mean)
    diag = bc.fit_laplace(sub, loader, LIK, PRIOR, hessian="diag", progress=False, backend="jvp")
    torch.testing.assert_close(diag.variance, 1 / ((x ** 2).sum(0) / SIGMA ** 2 + 4.0), rtol=1e-10, atol=0)
    low = bc.fit_laplace(sub, loader, LIK, PRIOR, hessian="lowrank", rank=5, progress=False,
                         generator=torch.Generator().manual_seed(0))
    assert isinstance(low, bc.LowRankPrecisionGaussianPosterior)
    torch.testing.assert_close(low.covariance, cov, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(low.variance, cov.diagonal(), rtol=1e-9, atol=1e-12)
    # log p(D | theta*) is recorded
    ll = torch.distributions.Normal(x @ mean, SIGMA).log_prob(y[:, 0]).sum()
    assert math.isclose(full.history[0]["log_lik"], float(ll), rel_tol=1e-9)


def test_lowrank_samples_have_its_covariance_and_survive_save_load(tmp_path):
    sub, x, y, loader = linear_problem()
    sub.theta = closed_form(x, y, 4.0)[1]
    low = bc.fit_laplace(sub, loader, LIK, PRIOR, hessian="lowrank", rank=2, progress=False,
                         generator=torch.Generator().manual_seed(0))
    s = low.sample(40000, generator=torch.Generator().manual_seed(1))
    emp = torch.cov(s.T)
    # entrywise MC standard error of a covariance estimate: sqrt((S_ii S_jj + S_ij^2) / n)
    c = low.covariance
    se = ((c.diagonal()[:, None] * c.diagonal()[None] + c ** 2) / 40000).sqrt()
    assert ((emp - c).abs() < 5 * se).all()
    low.save(tmp_path / "p.pt")
    back = bc.load_posterior(tmp_path / "p.pt")
    torch.testing.assert_close(back.sample(3, torch.Generator().manual_seed(2)),
                               low.sample(3, torch.Generator().manual_seed(2)))


def test_marglik_finds_the_closed_form_evidence_maximiser():
    sub, x, y, loader = linear_problem()
    grid = torch.logspace(-3, 3, 3001, dtype=torch.float64)
    ev = torch.stack([log_evidence(x, y, float(p)) for p in grid])
    best = float(grid[ev.argmax()])
    sub.theta = closed_form(x, y, best)[1]  # the MAP at the evidence maximiser: MacKay's fixed point
    for hessian, kw in [("full", {}), ("lowrank", {"rank": 5})]:
        post = bc.fit_laplace(sub, loader, LIK, PRIOR, hessian=hessian, tune_prior="marglik",
                              progress=False, generator=torch.Generator().manual_seed(0), **kw)
        found = post.history[0]["prior_precision"]
        assert abs(math.log(found / best)) < 2 * math.log(grid[1] / grid[0])  # grid resolution
        # the Laplace evidence is exact for a linear-Gaussian model
        assert math.isclose(post.history[0]["log_marglik"], float(log_evidence(x, y, found)), rel_tol=1e-8)
        torch.testing.assert_close(post.covariance, closed_form(x, y, found)[0], rtol=1e-8, atol=1e-12)


def test_gridsearch_picks_the_precision_with_the_best_validation_density():
    sub, x, y, loader = linear_problem(n=12, p=5)
    theta = closed_form(x, y, 4.0)[1]
    sub.theta = theta
    _, xv, yv, val = linear_problem(n=200, p=5, seed=1)
    grid = [1e-3, 1.0, 1e3]

    def exact_nll(prec):
        var = (xv @ closed_form(x, y, prec)[0] * xv).sum(1) + SIGMA ** 2
        return float((0.5 * ((yv[:, 0] - xv @ theta) ** 2 / var + var.log() + math.log(2 * math.pi))).mean())

    want = min(grid, key=exact_nll)
    post = bc.fit_laplace(sub, loader, LIK, PRIOR, tune_prior="gridsearch", val_loader=val,
                          prior_grid=grid, n_samples=256, progress=False,
                          generator=torch.Generator().manual_seed(0))
    assert post.history[0]["prior_precision"] == pytest.approx(want)


def test_temperature_divides_the_likelihood_curvature_and_is_searched_with_the_precision():
    sub, x, y, loader = linear_problem(n=12, p=5)
    theta = closed_form(x, y, 4.0)[1]
    sub.theta = theta
    # tempered conjugate posterior: covariance (X^T X / (sigma^2 T) + delta)^{-1}
    warm = bc.fit_laplace(sub, loader, LIK, PRIOR, hessian="full", temperature=10.0, progress=False)
    want = torch.linalg.inv(x.T @ x / (10.0 * SIGMA ** 2) + 4.0 * torch.eye(5, dtype=x.dtype))
    torch.testing.assert_close(warm.covariance, want, rtol=1e-10, atol=1e-13)
    assert warm.history[0]["temperature"] == 10.0
    # the joint grid finds the (precision, temperature) pair with the lowest exact validation NLL
    _, xv, yv, val = linear_problem(n=200, p=5, seed=1)

    def exact_nll(prec, temp):
        cov = torch.linalg.inv(x.T @ x / (temp * SIGMA ** 2) + prec * torch.eye(5, dtype=x.dtype))
        var = (xv @ cov * xv).sum(1) + SIGMA ** 2
        return float((0.5 * ((yv[:, 0] - xv @ theta) ** 2 / var + var.log() + math.log(2 * math.pi))).mean())

    pairs = [(p, t) for t in (0.01, 1.0, 100.0) for p in (1e-2, 1.0, 1e2)]
    want_p, want_t = min(pairs, key=lambda pt: exact_nll(*pt))
    post = bc.fit_laplace(sub, loader, LIK, PRIOR, tune_prior="gridsearch", val_loader=val,
                          prior_grid=[1e-2, 1.0, 1e2], temperature_grid=[0.01, 1.0, 100.0],
                          n_samples=256, progress=False, generator=torch.Generator().manual_seed(0))
    assert (post.history[0]["prior_precision"], post.history[0]["temperature"]) == pytest.approx((want_p, want_t))
    with pytest.raises(ValueError, match="temperature_grid is searched by tune_prior='gridsearch'"):
        bc.fit_laplace(sub, loader, LIK, temperature_grid=[1.0, 2.0], progress=False)
    with pytest.raises(ValueError, match="finite and > 0"):
        bc.fit_laplace(sub, loader, LIK, temperature=0.0, progress=False)


def test_linearised_predictive_variance_is_x_sigma_x_plus_noise():
    sub, x, y, loader = linear_problem()
    cov, mean = closed_form(x, y, 4.0)
    sub.theta = mean
    post = bc.fit_laplace(sub, loader, LIK, PRIOR, progress=False)
    xt = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = (xt @ cov * xt).sum(1, keepdim=True)
    torch.testing.assert_close(bc.output_covariance(sub, post, xt), xt @ cov @ xt.T, rtol=1e-10, atol=1e-14)
    n = 20000
    pred = bc.predict(sub, post, xt, n_samples=n, linearized=True, generator=torch.Generator().manual_seed(4))
    # the sample variance of n Gaussian draws has standard error v sqrt(2 / n)
    assert ((pred.epistemic.double() - exact).abs() < 5 * exact * math.sqrt(2 / n)).all()
    torch.testing.assert_close(pred.total - pred.epistemic, torch.full_like(pred.total, SIGMA ** 2))


def mlp_subspace(seed=0, out=2):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, out)).double()
    sub = bc.Subspace.from_model(model, bc.LoRA(rank=2))
    sub.theta = 0.3 * torch.randn(sub.dim, dtype=torch.float64)  # a generic point, every block active
    return sub


def test_linearised_outputs_equal_first_order_taylor_with_brute_force_jacobian():
    sub = mlp_subspace()
    x = torch.randn(5, 3, dtype=torch.float64)
    post = bc.GaussianPosterior(sub.theta, 0.1 * torch.eye(sub.dim, dtype=torch.float64), likelihood=LIK)
    pred = bc.predict(sub, post, x, n_samples=4, linearized=True, keep_outputs=True,
                      generator=torch.Generator().manual_seed(0))
    delta = post.sample(2, torch.Generator().manual_seed(0)) - sub.theta  # antithetic pairs
    thetas = sub.theta + torch.cat([delta, -delta])
    jac = jacrev(lambda t: sub(x, theta=t))(sub.theta)  # (5, 2, d)
    want = sub(x)[None] + torch.einsum("bod,sd->sbo", jac, thetas - sub.theta)
    torch.testing.assert_close(pred.outputs, want.float(), rtol=1e-5, atol=1e-6)
    # so the predictive mean is f(x; mean) exactly, with no Monte-Carlo noise
    torch.testing.assert_close(pred.mean, sub(x).float(), rtol=1e-5, atol=1e-6)


class _Wrap(nn.Module):
    def __init__(self, sub):
        super().__init__()
        self.sub = sub

    def forward(self, x):
        return self.sub(x)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_full_ggn_agrees_with_laplace_torch(task):
    from laplace import Laplace

    sub = mlp_subspace(out=3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randn(30, 3, generator=g, dtype=torch.float64) if task == "regression" else torch.randint(0, 3, (30,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    lik = LIK if task == "regression" else bc.Categorical()
    ref = Laplace(_Wrap(sub), task, subset_of_weights="all", hessian_structure="full",
                  sigma_noise=SIGMA if task == "regression" else 1.0, prior_precision=4.0)
    ref.fit(loader)
    ref_cov = ref.posterior_covariance
    for backend in ("jvp", "laplace-torch"):
        post = bc.fit_laplace(sub, loader, lik, PRIOR, hessian="full", progress=False, backend=backend)
        err = (post.covariance - ref_cov).norm() / ref_cov.norm()
        assert err < 1e-4, (backend, float(err))
    diag = bc.fit_laplace(sub, loader, lik, PRIOR, hessian="diag", progress=False, backend="jvp")
    torch.testing.assert_close(diag.std ** -2, ref.posterior_precision.diagonal(), rtol=1e-6, atol=0)


def conv_subspace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1)).double()
    sub = bc.Subspace.from_model(model, bc.LoRA(rank=1))
    sub.theta = 0.3 * torch.randn(sub.dim, dtype=torch.float64)
    return sub


def test_dense_output_ggn_matches_brute_force_jacobians():
    sub = conv_subspace()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randn(3, 1, 32, 32, generator=g, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    jac = jacrev(lambda t: sub(x, theta=t))(sub.theta).reshape(-1, sub.dim)  # (3 * 1024, d)
    ggn = jac.T @ jac / SIGMA ** 2
    full = bc.fit_laplace(sub, loader, LIK, PRIOR, hessian="full", chunk_size=16, progress=False)
    torch.testing.assert_close(full.covariance, torch.linalg.inv(ggn + 4 * torch.eye(sub.dim, dtype=torch.float64)),
                               rtol=1e-8, atol=1e-12)
    # both routes to the dense GGN: the whole batch Jacobian (J^T Lambda J) and, over the
    # memory budget, G V = J^T Lambda J V by JVP + VJP chunks
    for budget in (2 ** 28, 0):
        dense, _ = ggn_full(sub, loader, LIK, sub.theta, chunk_size=16, jacobian_budget=budget)
        torch.testing.assert_close(dense, ggn, rtol=1e-10, atol=1e-10)
    diag = bc.fit_laplace(sub, loader, LIK, PRIOR, hessian="diag", chunk_size=16, progress=False)
    torch.testing.assert_close(diag.std ** -2, ggn.diagonal() + 4, rtol=1e-10, atol=0)
    # the Rademacher estimator: unbiased, variance 2 (|a|^4 - sum a^4) / m per entry, a = J e_k / sigma
    m = 400
    est = bc.fit_laplace(sub, loader, LIK, PRIOR, hessian="diag", diag_probes=m, progress=False,
                         generator=torch.Generator().manual_seed(0)).std ** -2 - 4
    a = torch.cat([(jac[:2048] / SIGMA), (jac[2048:] / SIGMA)])
    var = sum(2 * ((b ** 2).sum(0) ** 2 - (b ** 4).sum(0)) / m for b in (a[:2048], a[2048:]))
    assert ((est - ggn.diagonal()).abs() < 5 * var.sqrt()).all()


def test_heteroscedastic_uses_the_gaussian_fisher_for_mean_and_log_variance():
    sub = conv_subspace()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    # two output channels would need another model; split along the width instead
    lik = bc.Gaussian(heteroscedastic=True, dim=-1)
    y = torch.randn(2, 1, 8, 4, generator=g, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    jac = jacrev(lambda t: sub(x, theta=t))(sub.theta)  # (2, 1, 8, 8, d)
    var = lik.split(sub(x))[1]
    jm, jv = jac[..., :4, :], jac[..., 4:, :]
    # Fisher of N(mu, exp(eta)) in (mu, eta): diag(1 / var, 1 / 2)
    ggn = torch.einsum("...d,...,...e->de", jm, 1 / var, jm) + 0.5 * torch.einsum("...d,...e->de", jv, jv)
    post = bc.fit_laplace(sub, loader, lik, PRIOR, hessian="full", progress=False)
    torch.testing.assert_close(torch.linalg.inv(post.covariance), ggn + 4 * torch.eye(sub.dim, dtype=torch.float64),
                               rtol=1e-7, atol=1e-9)


def test_bad_arguments_give_clear_errors():
    sub, x, y, loader = linear_problem()
    with pytest.raises(ValueError, match="unknown hessian 'fulll'"):
        bc.fit_laplace(sub, loader, LIK, hessian="fulll")
    with pytest.raises(ValueError, match="laplace-torch.*cannot handle hessian='kron'.*backend='jvp'"):
        bc.fit_laplace(sub, loader, LIK, hessian="kron", backend="laplace-torch")
    with pytest.raises(ValueError, match="val_loader"):
        bc.fit_laplace(sub, loader, LIK, tune_prior="gridsearch")
    with pytest.raises(ValueError, match="unknown tune_prior"):
        bc.fit_laplace(sub, loader, LIK, tune_prior="evidence")
    with pytest.raises(ValueError, match="unknown backend"):
        bc.fit_laplace(sub, loader, LIK, backend="asdl")
    for backend in ("jvp", "laplace-torch"):
        with pytest.raises(ValueError, match="loader is empty"):
            bc.fit_laplace(sub, [], LIK, progress=False, backend=backend)


class MaskedGaussian(bc.Likelihood):
    """A likelihood the engine has no formula for: pixels with target <= 0 are ignored."""

    def log_prob(self, out, y):
        mask = (y > 0).to(out)
        return (-0.5 * mask * (y - out) ** 2 / SIGMA ** 2).flatten(out.dim() - y.dim() + 1).sum(-1)


def test_other_likelihoods_use_the_exact_output_hessian():
    sub = conv_subspace()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)  # about half the pixels masked
    loader = DataLoader(TensorDataset(x, y), batch_size=1)
    jac = jacrev(lambda t: sub(x, theta=t))(sub.theta).reshape(-1, sub.dim)
    mask = (y > 0).reshape(-1, 1).double()
    ggn = jac.T @ (mask * jac) / SIGMA ** 2
    post = bc.fit_laplace(sub, loader, MaskedGaussian(), PRIOR, hessian="full", progress=False)
    torch.testing.assert_close(torch.linalg.inv(post.covariance), ggn + 4 * torch.eye(sub.dim, dtype=torch.float64),
                               rtol=1e-7, atol=1e-9)
