"""Likelihoods against reference implementations (torch.distributions, cross_entropy) and
analytic values (law of total variance, mutual information), and the learned noise scale."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

import bayes_colora as bc
from conftest import linear_in_theta


def test_gaussian_log_prob_equals_normal():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 3, 4, generator=g)  # (S, B, outputs)
    y = torch.randn(3, 4, generator=g)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0])  # per output element
    got = bc.Gaussian(sigma=sigma).log_prob(out, y)
    want = Normal(out, sigma).log_prob(y).sum(-1)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(bc.Gaussian(sigma=0.3).log_prob(out[0], y),
                               Normal(out[0], 0.3).log_prob(y).sum(-1))


@pytest.mark.parametrize("dim", [1, -3])
def test_heteroscedastic_splits_mean_and_log_variance(dim):
    g = torch.Generator().manual_seed(1)
    outs = torch.randn(5, 2, 6, 4, 4, generator=g)  # (S, B, 2C, H, W): C = 3 means, 3 log-variances
    y = torch.randn(2, 3, 4, 4, generator=g)
    lik = bc.Gaussian(heteroscedastic=True, dim=dim)
    mean, var = lik.split(outs[0])
    torch.testing.assert_close(mean, outs[0, :, :3])
    torch.testing.assert_close(var, outs[0, :, 3:].exp())
    want = Normal(outs[:, :, :3], (0.5 * outs[:, :, 3:]).exp()).log_prob(y).sum((2, 3, 4))
    torch.testing.assert_close(lik.log_prob(outs, y), want)  # sample axis in front: dim still channels
    m = lik.moments(outs)
    torch.testing.assert_close(m["mean"], outs[:, :, :3].mean(0))
    torch.testing.assert_close(m["aleatoric"], outs[:, :, 3:].exp().mean(0))
    torch.testing.assert_close(m["epistemic"], outs[:, :, :3].var(0, unbiased=False))


def test_gaussian_moments_law_of_total_variance():
    # three samples of the mean for two outputs, sigma = 0.5
    outs = torch.tensor([[[1.0, -2.0]], [[2.0, -2.0]], [[6.0, -2.0]]])  # (S=3, B=1, 2)
    m = bc.Gaussian(sigma=0.5).moments(outs)
    torch.testing.assert_close(m["mean"], torch.tensor([[3.0, -2.0]]))
    torch.testing.assert_close(m["epistemic"], torch.tensor([[14.0 / 3.0, 0.0]]))  # (4 + 1 + 9) / 3
    torch.testing.assert_close(m["aleatoric"], torch.tensor([[0.25, 0.25]]))
    # total = E[y^2] - E[y]^2 of the equal mixture of N(mu_s, 0.25)
    second_moment = (outs ** 2 + 0.25).mean(0)
    torch.testing.assert_close(m["total"], second_moment - m["mean"] ** 2)
    one = bc.Gaussian(sigma=0.5).moments(outs[:1])
    assert torch.equal(one["epistemic"], torch.zeros(1, 2))


def test_categorical_log_prob_equals_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 4, 2, 2])
    lik = bc.Categorical()
    torch.testing.assert_close(lik.log_prob(logits, y), -F.cross_entropy(logits, y, reduction="none"))
    samples = torch.randn(3, 4, 5, generator=g)  # leading sample axis
    want = torch.stack([-F.cross_entropy(s, y, reduction="none") for s in samples])
    torch.testing.assert_close(lik.log_prob(samples, y), want)
    dense = torch.randn(2, 5, 3, 3, generator=g)  # per-pixel classes, summed per example
    labels = torch.randint(0, 5, (2, 3, 3), generator=g)
    torch.testing.assert_close(lik.log_prob(dense, labels),
                               -F.cross_entropy(dense, labels, reduction="none").sum((1, 2)))


def test_categorical_mutual_info():
    logits = torch.tensor([[2.0, -1.0, 0.5]]).expand(4, 1, 3)  # four samples that agree
    m = bc.Categorical().moments(logits)
    p = logits[0].softmax(-1)
    torch.testing.assert_close(m["probs"], p)
    torch.testing.assert_close(m["entropy"], -(p * p.log()).sum(-1))
    assert m["mutual_info"].abs().max() < 1e-6
    assert m["epistemic"].abs().max() < 1e-7
    # two samples, p = (0.9, 0.1) and (0.1, 0.9): mean (0.5, 0.5)
    two = torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]]).log()
    m = bc.Categorical().moments(two)
    h09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    torch.testing.assert_close(m["probs"], torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(m["entropy"], torch.tensor([math.log(2.0)]))
    torch.testing.assert_close(m["mutual_info"], torch.tensor([math.log(2.0) - h09]))
    torch.testing.assert_close(m["epistemic"], torch.tensor([[0.16, 0.16]]))   # Var of (0.9, 0.1)
    torch.testing.assert_close(m["aleatoric"], torch.tensor([[0.09, 0.09]]))   # mean p (1 - p)
    torch.testing.assert_close(m["total"], m["aleatoric"] + m["epistemic"])


def test_learned_sigma_converges_to_the_noise_std():
    n, p, noise = 2000, 2, 0.3
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, p, generator=g)
    y = x.sum(1, keepdim=True) + x @ torch.tensor([[0.5], [-1.0]]) + noise * torch.randn(n, 1, generator=g)
    sub = linear_in_theta(p)
    lik = bc.Gaussian(sigma=1.0, learn_sigma=True)
    post = bc.fit_map(sub, [(x, y)], lik, epochs=300, lr=0.05, progress=False)
    sigma = float(post.likelihood.sigma.detach())
    assert post.likelihood is lik and lik.log_sigma.requires_grad
    # the maximum-likelihood sigma at the fitted theta is the RMS residual
    with torch.no_grad():
        rms = float((y - sub(x)).pow(2).mean().sqrt())
    assert abs(sigma - rms) < 2e-3
    # and the data's noise std within 4 standard errors of a std estimate, noise / sqrt(2 n)
    assert abs(sigma - noise) < 4 * noise / math.sqrt(2 * n)
    # theta was trained too (least squares, up to the same sampling error)
    torch.testing.assert_close(sub.theta, torch.tensor([0.5, -1.0]), rtol=0, atol=0.03)
