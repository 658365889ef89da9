"""fit_map: the MAP of a model linear in theta is the ridge solution; training records, progress
output, checkpoint resume and bf16 autocast."""
from __future__ import annotations

import os

import torch
from torch import nn

import bayes_colora as bc
from bayes_colora.inference.objective import negative_log_joint
from conftest import linear_in_theta


def _regression(n: int = 200, p: int = 3, noise: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g)
    w = torch.tensor([1.0, -0.5, 0.25])[:p]
    y = x.sum(1, keepdim=True) + x @ w[:, None] + noise * torch.randn(n, 1, generator=g)
    return x, y


def test_map_equals_ridge_closed_form():
    sigma, scale = 0.5, 0.2
    x, y = _regression(n=50)
    sub = linear_in_theta(3)
    post = bc.fit_map(sub, [(x, y)], bc.Gaussian(sigma=sigma), prior=bc.NormalPrior(scale),
                      epochs=600, lr=0.02, progress=False)
    # f = 1^T x + x^T theta: the posterior is N(m, H^{-1}), H = X^T X / sigma^2 + I / scale^2
    precision = x.T @ x / sigma ** 2 + torch.eye(3) / scale ** 2
    ridge = torch.linalg.solve(precision, x.T @ (y[:, 0] - x.sum(1)) / sigma ** 2)
    post_std = torch.linalg.inv(precision).diagonal().sqrt()
    assert isinstance(post, bc.DiracPosterior) and post.is_point_mass
    torch.testing.assert_close(post.mean, sub.theta, rtol=0, atol=0)  # sub.theta left at the MAP
    # the optimiser's error is a small fraction of the posterior's own spread
    assert ((post.mean - ridge).abs() / post_std).max() < 0.02
    # the prior matters here: the MAP is not the least-squares solution
    lstsq = torch.linalg.lstsq(x, y[:, 0] - x.sum(1)).solution
    assert ((lstsq - ridge).abs() / post_std).max() > 1.0


def test_history_one_record_per_epoch_and_loss_decreases():
    x, y = _regression()
    loader = [(x[:100], y[:100]), (x[100:], y[100:])]
    sub = linear_in_theta(3)
    lik, prior = bc.Gaussian(sigma=0.5), bc.NormalPrior(1.0)
    post = bc.fit_map(sub, loader, lik, prior=prior, epochs=5, lr=0.05, progress=False)
    assert [h["epoch"] for h in post.history] == [1, 2, 3, 4, 5]
    losses = [h["loss"] for h in post.history]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    # with one batch per epoch, the first record is L(theta_0), the per-example negative log joint
    one = bc.fit_map(linear_in_theta(3), [(x, y)], lik, prior=prior, epochs=1, progress=False)
    with torch.no_grad():
        want = negative_log_joint(linear_in_theta(3), torch.zeros(3), lik, prior, x, y, 200)[0]
        by_hand = (0.5 * ((y - x.sum(1, keepdim=True)) / 0.5) ** 2 + torch.log(torch.tensor(0.5))
                   + 0.5 * torch.log(torch.tensor(2 * torch.pi))).mean() + 1.5 * torch.log(
                       torch.tensor(2 * torch.pi)) / 200
    assert abs(one.history[0]["loss"] - float(want)) < 1e-6
    assert abs(float(want) - float(by_hand)) < 1e-5


def test_progress_flag(capsys):
    x, y = _regression(n=20)
    bc.fit_map(linear_in_theta(3), [(x, y)], bc.Gaussian(), epochs=2, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    bc.fit_map(linear_in_theta(3), [(x, y)], bc.Gaussian(), epochs=2, progress=True)
    assert "fit_map" in capsys.readouterr().err  # the tqdm bar


def _mlp_sub() -> bc.Subspace:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    return bc.Subspace.from_model(model, [bc.LoRA(rank=2), bc.BitFit()])


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    x, y = _regression(n=64)
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    kw = dict(prior=bc.NormalPrior(1.0), lr=0.05, progress=False)
    ckpt = tmp_path / "state.pt"
    first = bc.fit_map(_mlp_sub(), loader, bc.Gaussian(learn_sigma=True), epochs=2, checkpoint=ckpt, **kw)
    assert os.path.exists(ckpt) and len(first.history) == 2
    resumed = bc.fit_map(_mlp_sub(), loader, bc.Gaussian(learn_sigma=True), epochs=4, checkpoint=ckpt, **kw)
    straight = bc.fit_map(_mlp_sub(), loader, bc.Gaussian(learn_sigma=True), epochs=4, **kw)
    torch.testing.assert_close(resumed.mean, straight.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.likelihood.sigma, straight.likelihood.sigma, rtol=0, atol=1e-6)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(resumed.history, straight.history):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    assert not torch.allclose(first.mean, straight.mean)  # epochs 3-4 did run
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]   # atomic saves leave no temporary file


def test_bf16_close_to_fp32():
    x, y = _regression(n=64)
    runs = {}
    for bf16 in (False, True):
        post = bc.fit_map(_mlp_sub(), [(x, y)], bc.Gaussian(sigma=0.5), epochs=3, lr=0.01,
                          bf16=bf16, progress=False)
        runs[bf16] = [h["loss"] for h in post.history]
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per operation); the loss is a
    # sum of squared residuals of a two-layer net, so a relative error of a few 2^-8 is expected
    for a, b in zip(runs[False], runs[True]):
        assert abs(a - b) / abs(a) < 4 * 2 ** -8
    assert runs[False] != runs[True]  # autocast did change the arithmetic
