"""predict: a Dirac posterior has no epistemic variance; a Gaussian posterior on a model linear in
theta has epistemic variance x^T Sigma x; classification gives normalised probabilities."""
from __future__ import annotations

import math

import torch
from torch import nn

import bayes_colora as bc
from conftest import bert, linear_in_theta


def test_dirac_posterior_has_zero_epistemic_variance(tiny_mlp):
    model, x = tiny_mlp
    sub = bc.Subspace.from_model(model, [bc.LoRA(rank=2), bc.BitFit()])
    sub.theta = sub.theta + 0.1 * torch.randn(sub.dim, generator=torch.Generator().manual_seed(0))
    post = bc.DiracPosterior(sub.theta, likelihood=bc.Gaussian(sigma=0.2))
    pred = bc.predict(sub, post, x, n_samples=16, keep_outputs=True)
    assert torch.equal(pred.epistemic, torch.zeros_like(pred.mean))
    with torch.no_grad():
        torch.testing.assert_close(pred.mean, sub(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pred.aleatoric, torch.full_like(pred.mean, 0.04))
    torch.testing.assert_close(pred.total, pred.aleatoric)
    assert pred.outputs.shape == (1, 5, 3)  # one evaluation for a point mass


def test_gaussian_posterior_epistemic_is_x_sigma_x():
    p, n_samples = 3, 4000
    sub = linear_in_theta(p)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(p, p, generator=g)
    cov = 0.1 * (a @ a.T + 0.5 * torch.eye(p))
    loc = torch.randn(p, generator=g)
    post = bc.GaussianPosterior(loc, torch.linalg.cholesky(cov), likelihood=bc.Gaussian(sigma=0.1))
    x = torch.randn(6, p, generator=g)
    pred = bc.predict(sub, post, x, n_samples=n_samples, generator=torch.Generator().manual_seed(1))
    v = ((x @ cov) * x).sum(1, keepdim=True)  # x^T Sigma x
    mean = x.sum(1, keepdim=True) + x @ loc[:, None]
    # sample mean: sd sqrt(v / S); sample variance (divisor S) of normals: bias -v / S, sd v sqrt(2 / S)
    assert ((pred.mean - mean).abs() <= 5 * (v / n_samples).sqrt()).all()
    assert ((pred.epistemic - v).abs() <= v / n_samples + 5 * v * math.sqrt(2 / n_samples)).all()
    torch.testing.assert_close(pred.aleatoric, torch.full_like(v, 0.01))
    torch.testing.assert_close(pred.total, pred.aleatoric + pred.epistemic)
    # the samples are reproducible with the generator, and chunking does not change them
    again = bc.predict(sub, post, x, n_samples=n_samples, generator=torch.Generator().manual_seed(1),
                       chunk_size=1000)
    torch.testing.assert_close(again.epistemic, pred.epistemic)


def test_classification_probs_entropy_mutual_info():
    model, x = bert()  # dict inputs
    sub = bc.Subspace.from_model(model, bc.LoRA(rank=2, targets="classifier"))
    g = torch.Generator().manual_seed(0)
    post = bc.DiagGaussianPosterior(sub.theta, torch.full((sub.dim,), 0.5), likelihood=bc.Categorical())
    pred = bc.predict(sub, post, x, n_samples=8, generator=g)
    assert pred.probs.shape == (2, 3) and pred.entropy.shape == (2,) and pred.mutual_info.shape == (2,)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(2))
    # the reference: the same samples, softmax per sample, averaged
    thetas = post.sample(8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs_s = torch.stack([sub(x, theta=t).softmax(-1) for t in thetas])
    torch.testing.assert_close(pred.probs, probs_s.mean(0), rtol=1e-5, atol=1e-6)
    expected_entropy = -(probs_s * probs_s.log()).sum(-1).mean(0)
    torch.testing.assert_close(pred.mutual_info, pred.entropy - expected_entropy, rtol=1e-4, atol=1e-6)
    assert (pred.mutual_info > 0).all() and (pred.mutual_info <= pred.entropy).all()
