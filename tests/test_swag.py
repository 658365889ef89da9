"""SWAG: moments and low-rank factor against a reference computed from the recorded iterates."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayes_colora as bc
from bayes_colora.inference.objective import negative_log_joint
from bayes_colora.inference.swag import SwagMoments, update_batchnorm
from linear_gaussian import linear_data, linear_subspace, loader

D, N, SIGMA = 3, 32, 0.5


def reference_swag(iterates: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, ...]:
    """SWAG's formulas computed directly (batch means, not running updates)."""
    t = torch.stack(iterates)                                   # (K_all, d)
    mean = t.mean(0)
    diag = 0.5 * (t.pow(2).mean(0) - mean ** 2).clamp_min(0)
    running = t.cumsum(0) / torch.arange(1, len(t) + 1, dtype=t.dtype)[:, None]
    dev = (t - running)[-rank:].T                               # last `rank` deviations, (d, K)
    return mean, diag, dev / (2 * (dev.shape[1] - 1)) ** 0.5


def test_moments_on_a_deterministic_sequence():
    seq = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([3.0, 2.0], dtype=torch.float64),
           torch.tensor([2.0, 4.0], dtype=torch.float64), torch.tensor([6.0, 2.0], dtype=torch.float64)]
    m = SwagMoments(2, rank=3, like=seq[0])
    for t in seq:
        m.collect(t)
    post = m.posterior()
    # mean (3, 2); second moments (12.5, 6): variance (3.5, 2); diag_var = half of it
    assert torch.allclose(post.mean, torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert torch.allclose(post.diag_var, torch.tensor([1.75, 1.0], dtype=torch.float64))
    # running means after each snapshot: (1,0), (2,1), (2,2), (3,2); the last 3 deviations are
    # (1,1), (0,2), (3,0), divided by sqrt(2 (K - 1)) with K = 3 kept columns
    dev = torch.tensor([[1.0, 0.0, 3.0], [1.0, 2.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(post.factor, dev / 2.0)


def swag_run(collect, epochs, swa_start, rank, lr=0.05, momentum=0.9):
    """fit_swag and the iterates of the same SGD run recomputed independently."""
    x, y, _ = linear_data(N, D, SIGMA)
    lik, prior = bc.Gaussian(SIGMA), bc.NormalPrior(1.0)
    sub = linear_subspace(D)
    start = torch.full((D,), 0.3, dtype=torch.float64)
    sub.theta = start
    post = bc.fit_swag(sub, loader(x, y, 8), lik, prior, epochs=epochs, lr=lr, rank=rank,
                       collect=collect, swa_start=swa_start, progress=False)
    theta = nn.Parameter(start.clone())
    opt = torch.optim.SGD([theta], lr=lr, momentum=momentum)
    iterates, step = [], 0
    for epoch in range(epochs):
        for xb, yb in loader(x, y, 8):
            loss, _ = negative_log_joint(sub, theta, lik, prior, xb, yb, N)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if epoch >= swa_start and collect != "epoch" and step % collect == 0:
                iterates.append(theta.detach().clone())
        if epoch >= swa_start and collect == "epoch":
            iterates.append(theta.detach().clone())
    return sub, post, iterates


@pytest.mark.parametrize("collect, epochs, swa_start, rank", [("epoch", 6, 2, 20), (3, 4, 1, 5)])
def test_fit_swag_matches_the_recorded_iterates(collect, epochs, swa_start, rank):
    sub, post, iterates = swag_run(collect, epochs, swa_start, rank)
    mean, diag, factor = reference_swag(iterates, rank)
    assert post.factor.shape == (D, min(len(iterates), rank))     # K collected, not max rank
    assert torch.allclose(post.mean, mean, atol=1e-12)
    assert torch.allclose(post.diag_var, diag, atol=1e-12)
    assert torch.allclose(post.factor, factor, atol=1e-12)
    assert torch.equal(sub.theta, post.mean)                        # sub left at the SWAG mean
    assert [h["snapshots"] for h in post.history][-1] == len(iterates)


def test_too_few_snapshots_and_bad_arguments_are_named():
    x, y, _ = linear_data(N, D, SIGMA)
    sub, lik, dl = linear_subspace(D), bc.Gaussian(SIGMA), loader(x, y, 8)
    with pytest.raises(ValueError, match="at least 2"):
        bc.fit_swag(sub, dl, lik, epochs=2, swa_start=1, progress=False)
    with pytest.raises(ValueError, match="swa_start"):
        bc.fit_swag(sub, dl, lik, epochs=2, swa_start=2, progress=False)
    with pytest.raises(ValueError, match="collect must be"):
        bc.fit_swag(sub, dl, lik, collect=0, progress=False)
    with pytest.raises(ValueError, match="rank must be"):
        bc.fit_swag(sub, dl, lik, rank=0, progress=False)
    with pytest.raises(ValueError, match="unknown optimizer"):
        bc.fit_swag(sub, dl, lik, optimizer="lbfgs", progress=False)


def test_empty_loader_is_named():
    empty = DataLoader(TensorDataset(torch.zeros(0, D, dtype=torch.float64),
                                     torch.zeros(0, 1, dtype=torch.float64)), batch_size=4)
    with pytest.raises(ValueError, match="loader is empty"):
        bc.fit_swag(linear_subspace(D), empty, bc.Gaussian(SIGMA), progress=False)


def test_bn_update_sets_running_stats_to_the_data_statistics_at_the_mean():
    torch.manual_seed(0)
    first, norm = nn.Linear(4, 3).double(), nn.BatchNorm1d(3).double()
    model = nn.Sequential(first, norm, nn.Linear(3, 1).double())
    sub = bc.Subspace.from_model(model, bc.BitFit(targets=r"^0$"))   # shifts what the norm sees
    x = 3.0 + 2.0 * torch.randn(24, 4, dtype=torch.float64)
    y = torch.randn(24, 1, dtype=torch.float64)
    post = bc.fit_swag(sub, loader(x, y, 8), bc.Gaussian(1.0), bc.NormalPrior(1.0), epochs=3,
                       lr=0.1, bn_update=True, progress=False)
    assert post.mean.abs().max() > 1e-3                               # the shift is not zero
    with torch.no_grad():
        h = x @ first.weight.T + first.bias + post.mean               # the norm's input at the mean
    chunks = h.split(8)
    want_mean = torch.stack([c.mean(0) for c in chunks]).mean(0)
    want_var = torch.stack([c.var(0) for c in chunks]).mean(0)        # PyTorch keeps unbiased vars
    assert torch.allclose(norm.running_mean, want_mean, atol=1e-12)
    assert torch.allclose(norm.running_var, want_var, atol=1e-12)
    assert not norm.training and norm.momentum == 0.1                  # restored
    assert update_batchnorm(linear_subspace(D), loader(x[:, :3], y, 8)) == 0


def test_save_load_gives_the_same_samples(tmp_path):
    _, post, _ = swag_run("epoch", 4, 0, 20)
    post.save(tmp_path / "swag.pt")
    loaded = bc.load_posterior(tmp_path / "swag.pt")
    assert type(loaded) is bc.LowRankGaussianPosterior
    a = post.sample(5, generator=torch.Generator().manual_seed(1))
    b = loaded.sample(5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert loaded.history == post.history


def test_pca_basis_refuses_k_beyond_the_rank_of_a_swag_posterior():
    _, post, _ = swag_run("epoch", 4, 0, 20)                       # 4 snapshots in d = 3
    assert bc.pca_basis(post, 3).shape == (D, 3)
    with pytest.raises(ValueError, match=r"k=4 must be between 1 and the rank 3 .*\(shape \(3, 4\)\)"):
        bc.pca_basis(post, 4)
