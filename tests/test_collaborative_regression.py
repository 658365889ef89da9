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
    # bases of the true column space of B* and row space of A*, read off the stacked W_t*
    b_star = torch.linalg.svd(tasks.w_star.transpose(0, 1).reshape(5, -1), full_matrices=False)[0][:, :2]
    a_star = torch.linalg.svd(tasks.w_star.reshape(-1, 8), full_matrices=False)[2][:2]
    oracle = _oracle_error(tasks, a_star, b_star)
    ratio = math.sqrt((4 + 2 * (8 + 5) / 4) / 4)
    assert 0.7 * oracle < err < 1.5 * ratio * oracle
    # an independent rank-r fit per task has r (in + out - r) unknowns per task: larger error
    indep = cr.recovery_error(cr.fit_altmin(tasks, 2, "independent"), tasks.w_star)
    assert err < indep


def test_collaborative_beats_independent_for_similar_tasks_and_few_samples():
    errs = {m: [] for m in ("independent", "collaborative", "collaborative_shrunk")}
    for seed in range(3):
        tasks = cr.make_tasks(8, 8, 12, 8, 2, spread=0.1, noise=0.2, seed=seed)
        for m in errs:
            errs[m].append(cr.recovery_error(cr.fit_altmin(tasks, 2, m), tasks.w_star))
    mean = {m: sum(v) / len(v) for m, v in errs.items()}
    assert mean["collaborative"] < 0.5 * mean["independent"]
    assert mean["collaborative_shrunk"] < 0.5 * mean["independent"]


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
