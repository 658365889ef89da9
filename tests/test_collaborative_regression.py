"""The collaborative regression study: recovery of a known ground truth, gradient descent against
alternating minimisation, and the personal posterior against the closed-form Gaussian one."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

import bayes_colora as bc

_PATH = os.path.join(os.path.dirname(__file__), "..", "studies", "collaborative_regression.py")
_spec = importlib.util.spec_from_file_location("collaborative_regression", _PATH)
cr = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cr  # dataclasses look their module up there
_spec.loader.exec_module(cr)


def _oracle_error(tasks: "cr.Tasks", a: torch.Tensor, b: torch.Tensor) -> float:
    """Least squares for each R_t with the true A*, B* known: the best a method sharing them can do."""
    u = tasks.x @ a.T
    ws = []
    for t in range(tasks.x.shape[0]):
        gram = torch.kron(b.T @ b, u[t].T @ u[t])
        r = torch.linalg.solve(gram, (b.T @ tasks.y[t].T @ u[t]).reshape(-1)).reshape(a.shape[0], a.shape[0])
        ws.append(b @ r @ a)
    return cr.recovery_error(torch.stack(ws), tasks.w_star)


def test_altmin_recovers_the_truth_exactly_without_noise():
    tasks = cr.make_tasks(5, 40, 8, 6, 2, spread=0.5, noise=0.0, seed=0)
    for method in ("collaborative", "independent"):
        assert cr.recovery_error(cr.fit_altmin(tasks, 2, method), tasks.w_star) < 1e-6
    # one shared W cannot fit tasks that differ: its error is that of the best common matrix
    assert cr.recovery_error(cr.fit_altmin(tasks, 2, "shared"), tasks.w_star) > 0.1


def test_collaborative_error_at_noise_level():
    """With plenty of data the error is of the order of the noise: between the oracle (A*, B*
    known, r^2 unknowns per task) and sqrt(dof ratio) = sqrt((r^2 + r (in + out) / k) / r^2) times it."""
    tasks = cr.make_tasks(4, 200, 8, 5, 2, spread=0.5, noise=0.1, seed=1)
    err = cr.recovery_error(cr.fit_altmin(tasks, 2, "collaborative"), tasks.w_star)
    a_star, b_star = _true_bases(tasks, 2)
    oracle = _oracle_error(tasks, a_star, b_star)
    ratio = math.sqrt((4 + 2 * (8 + 5) / 4) / 4)
    assert 0.7 * oracle < err < 1.5 * ratio * oracle
    # an independent rank-r fit per task has r (in + out - r) unknowns per task: larger error
    indep = cr.recovery_error(cr.fit_altmin(tasks, 2, "independent"), tasks.w_star)
    assert err < indep


def _mean_errors(methods: tuple[str, ...], n_tasks: int, n: int, d_in: int, d_out: int,
                 seeds: int = 3) -> dict[str, float]:
    """Mean recovery error of each alternating-minimisation estimator over ``seeds`` task sets
    (rank 2, spread 0.1, noise 0.2)."""
    errs = {m: 0.0 for m in methods}
    for seed in range(seeds):
        tasks = cr.make_tasks(n_tasks, n, d_in, d_out, 2, spread=0.1, noise=0.2, seed=seed)
        for m in methods:
            errs[m] += cr.recovery_error(cr.fit_altmin(tasks, 2, m), tasks.w_star) / seeds
    return errs


def test_collaborative_beats_independent_for_similar_tasks_and_few_samples():
    mean = _mean_errors(("independent", "collaborative", "collaborative_shrunk"), 8, 8, 12, 8)
    assert mean["collaborative"] < 0.5 * mean["independent"]
    assert mean["collaborative_shrunk"] < 0.5 * mean["independent"]


def _true_bases(tasks: "cr.Tasks", rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases (A, B) of the true row space of A* and column space of B*, read off the stacked W_t*."""
    _, d_out, d_in = tasks.w_star.shape
    b = torch.linalg.svd(tasks.w_star.transpose(0, 1).reshape(d_out, -1), full_matrices=False)[0][:, :rank]
    a = torch.linalg.svd(tasks.w_star.reshape(-1, d_in), full_matrices=False)[2][:rank]
    return a, b


def test_empirical_bayes_step_is_the_exact_evidence_maximum_and_posterior():
    """Against the dense model vec(Y_t) = Phi_t vec(R_t) + N(0, sigma^2 I), Phi_t built entry by entry:
    the evidence value, its maximum in tau^2 and m (m: the dense generalised least squares), and the
    Gaussian posterior S_t = (Phi^T Phi / sigma^2 + I / tau^2)^-1, mu_t = S_t (Phi^T y / sigma^2 + m / tau^2)."""
    rank, noise = 2, 0.3
    tasks = cr.make_tasks(6, 5, 6, 4, rank, spread=0.5, noise=noise, seed=5)
    a, b = _true_bases(tasks, rank)
    eb = cr.empirical_bayes_step(*cr.personal_normal_equations(tasks.x, tasks.y, a, b), noise, iters=10000, tol=1e-13)
    # Y_t[i, o] = sum_{c, j} B[o, c] R_t[c, j] U_t[i, j], vec(R_t) row-major
    phis = [torch.einsum("oc,ij->iocj", b, tasks.x[t] @ a.T).reshape(-1, rank * rank) for t in range(6)]
    ys = [tasks.y[t].reshape(-1) for t in range(6)]
    eye = torch.eye(ys[0].numel(), dtype=torch.float64)

    def dense(tau2: float, m: torch.Tensor) -> float:
        return sum(float(torch.distributions.MultivariateNormal(phi @ m, noise ** 2 * eye + tau2 * phi @ phi.T)
                         .log_prob(y)) for phi, y in zip(phis, ys))

    const = -0.5 * (float((tasks.y ** 2).sum()) / noise ** 2 + tasks.y.numel() * math.log(2 * math.pi * noise ** 2))
    assert math.isclose(eb.log_evidence + const, dense(eb.tau2, eb.centre), rel_tol=1e-9)
    best = dense(eb.tau2, eb.centre)
    assert dense(eb.tau2 * math.exp(0.05), eb.centre) < best and dense(eb.tau2 * math.exp(-0.05), eb.centre) < best
    covs = [torch.linalg.inv(noise ** 2 * eye + eb.tau2 * phi @ phi.T) for phi in phis]
    gls = torch.linalg.solve(sum(phi.T @ c @ phi for phi, c in zip(phis, covs)),
                             sum(phi.T @ c @ y for phi, c, y in zip(phis, covs, ys)))
    torch.testing.assert_close(eb.centre, gls, rtol=1e-7, atol=1e-9)
    for t, (phi, y) in enumerate(zip(phis, ys)):
        cov = torch.linalg.inv(phi.T @ phi / noise ** 2 + torch.eye(rank * rank, dtype=torch.float64) / eb.tau2)
        torch.testing.assert_close(eb.cov[t], cov, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(eb.mean[t], cov @ (phi.T @ y / noise ** 2 + eb.centre / eb.tau2), rtol=1e-7, atol=1e-9)


def test_evidence_shrinkage_follows_the_task_spread():
    """The data-chosen prior width tau of the personal R_t, with A*, B* known and fitted by EM.

    s = 1: tau^2 is the maximum-likelihood variance of the k r^2 entries of the R_t about their centre,
    i.e. (k - 1) / k times the realised spread of R_t* (entries N(0, s^2)), plus the posterior variance
    sigma^2 / n (U_t^T U_t ~ n I): within 3.5 sampling standard deviations 1 / sqrt(2 (k - 1) r^2) of s.
    s = 0: the personal estimates scatter only by noise, sd sigma / sqrt(n) per entry; the evidence
    subtracts that, so tau stays below sigma / sqrt(n) (3 sd of the scatter's sampling error is
    0.5 sigma^2 / n here): the ridge lambda = sigma^2 / tau^2 exceeds n, the weight of a task's data.
    """
    k, n, rank, noise = 20, 50, 2, 0.2
    for spread in (0.0, 1.0):
        tasks = cr.make_tasks(k, n, 8, 5, rank, spread=spread, noise=noise, seed=6)
        a, b = _true_bases(tasks, rank)
        oracle = cr.empirical_bayes_step(*cr.personal_normal_equations(tasks.x, tasks.y, a, b), noise, iters=10000)
        fitted = cr.collaborative_em(tasks.x, tasks.y, rank, noise)[2]
        for tau in (oracle.tau2 ** 0.5, fitted.tau2 ** 0.5):
            if spread == 0.0:
                assert tau < noise / math.sqrt(n)
            else:
                assert abs(tau / spread - 1) < 3.5 / math.sqrt(2 * (k - 1) * rank ** 2)
                dev = tasks.r_star - tasks.r_star.mean(0)
                realised = float((dev ** 2).sum()) / (k * rank ** 2) + noise ** 2 / n
                assert abs(tau ** 2 / realised - 1) < 0.05


def test_shared_step_minimises_the_expected_loss():
    """The M step: with q(R_t) = N(mu_t, S_t) the E-step posterior at (A0, B0), the expected loss is
    E L(A, B) = sum_t ||Y_t||^2 - 2 mu_t^T h_t + mu_t^T G_t mu_t + tr(G_t S_t) (normal equations at
    (A, B)); the new A zeroes its gradient in A at B0, the new B in B at the new A (exact solves: zero
    up to rounding). One EM sweep of altmin is that M step on that posterior (same row and column spaces)."""
    rank, noise = 2, 0.2
    tasks = cr.make_tasks(5, 6, 7, 4, rank, spread=0.5, noise=noise, seed=7)
    g = torch.Generator().manual_seed(0)
    a0 = torch.linalg.qr(torch.randn(7, rank, generator=g, dtype=torch.float64))[0].T
    b0 = torch.linalg.qr(torch.randn(4, rank, generator=g, dtype=torch.float64))[0]
    post = cr.empirical_bayes_step(*cr.personal_normal_equations(tasks.x, tasks.y, a0, b0), noise)

    def expected_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        grams, rhs = cr.personal_normal_equations(tasks.x, tasks.y, a, b)
        fit = torch.einsum("tp,tpq,tq->", post.mean, grams, post.mean) - 2 * (post.mean * rhs).sum()
        return (tasks.y ** 2).sum() + fit + (grams * post.cov).sum()

    def grad(a: torch.Tensor, b: torch.Tensor, wrt: int) -> torch.Tensor:
        ab = [a.clone().requires_grad_(wrt == 0), b.clone().requires_grad_(wrt == 1)]
        return torch.autograd.grad(expected_loss(*ab), ab[wrt])[0]

    a1, b1 = cr.shared_step(tasks.x, tasks.y, b0, post.mean.reshape(-1, rank, rank), post.cov)
    assert grad(a1, b0, 0).norm() < 1e-7 * grad(a0, b0, 0).norm()
    assert grad(a1, b1, 1).norm() < 1e-7 * grad(a1, b0, 1).norm()
    assert expected_loss(a1, b1) < expected_loss(a0, b0)
    a2, b2, _ = cr.altmin(tasks.x, tasks.y, rank, noise=noise, iters=1, start=(a0, b0))

    def span(m: torch.Tensor) -> torch.Tensor:
        """The projector onto the column space of ``m``."""
        return m @ torch.linalg.pinv(m)

    torch.testing.assert_close(span(a2.T), span(a1.T), rtol=0, atol=1e-9)
    torch.testing.assert_close(span(b2), span(b1), rtol=0, atol=1e-9)


def test_shrunk_estimate_is_stable_with_four_samples_per_task():
    """n = 4 examples per task (the study's k, in, out), similar tasks: the joint fit of A and the R_t
    overfits, the marginal likelihood (R_t integrated out, tau chosen by the evidence) does not."""
    mean = _mean_errors(("independent", "collaborative", "collaborative_shrunk"), 10, 4, 20, 10)
    assert mean["collaborative_shrunk"] < 0.5 * mean["independent"]
    assert mean["collaborative_shrunk"] < 0.5 * mean["collaborative"]


def test_gradient_descent_reaches_the_altmin_solution():
    tasks = cr.make_tasks(3, 48, 6, 4, 2, spread=0.5, noise=0.05, seed=2)
    w_alt = cr.fit_altmin(tasks, 2, "collaborative")
    w_gd = cr.fit_gd(tasks, 2, "collaborative", epochs=600, lr=3e-2, seed=0)
    rel = float(torch.linalg.matrix_norm(w_gd - w_alt).max() / torch.linalg.matrix_norm(tasks.w_star).min())
    assert rel < 0.02


def test_personal_posterior_is_the_closed_form_gaussian_and_narrows_with_similarity():
    widths, precisions = {}, {}
    for spread in (0.02, 1.0):
        tasks = cr.make_tasks(5, 12, 8, 5, 2, spread=spread, noise=0.2, seed=3)
        post, personal, _, precision = cr.personal_posterior(tasks, 2)
        loader = cr.task_batches(*cr._stack(tasks, list(range(5))))
        mean, cov = cr.closed_form_posterior(personal, loader, tasks.noise, precision)
        torch.testing.assert_close(post.mean.double(), mean, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(post.covariance.double(), cov, rtol=2e-3, atol=1e-6)
        widths[spread] = float(cov.diagonal().sqrt().mean())
        precisions[spread] = precision
    assert precisions[0.02] > 10 * precisions[1.0]
    assert widths[0.02] < widths[1.0]


def test_closed_form_mean_is_the_map_that_fit_map_finds():
    tasks = cr.make_tasks(3, 10, 6, 4, 2, spread=0.3, noise=0.2, seed=4)
    _, personal, _, precision = cr.personal_posterior(tasks, 2, rounds=1)
    loader = cr.task_batches(*cr._stack(tasks, list(range(3))))
    mean, _ = cr.closed_form_posterior(personal, loader, tasks.noise, precision)
    personal.theta = torch.zeros(personal.dim)
    post = bc.fit_map(personal, loader, bc.Gaussian(sigma=tasks.noise), prior=bc.NormalPrior(precision ** -0.5),
                      epochs=1500, lr=2e-2, progress=False)
    torch.testing.assert_close(post.mean.double(), mean, rtol=0, atol=5e-3)


def test_quick_run_writes_results(tmp_path):
    res = cr.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    for name in ("results.json", "results.md", "recovery.png", "posterior_width.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["recovery"]) == len(res["recovery"])
    # plenty of data (n = 32): every personal method at the noise level, below 0.1
    big = [r for r in saved["recovery"] if r["n"] == 32 and r["method"] == "collaborative"]
    assert big and all(r["error"] < 0.1 for r in big)
