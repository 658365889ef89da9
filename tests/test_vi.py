r"""Pyro VI on theta against the closed-form posterior of a model linear in theta.

Tolerances: for a Gaussian target the optimum of every guide family is known exactly (full:
``N(mu, Sigma)``; mean field: mean ``mu``, variances ``1 / Lambda_ii``). What is left is the
optimiser's jitter: Adam's step at the final learning rate (``lr * lr_decay^steps = 5e-4``) and
the Monte Carlo noise of the gradient with 64 particles keep the result within a few percent of a
posterior standard deviation (about 0.02 sd measured); we allow 0.1 sd for the mean and 0.1 for
covariance entries divided by ``sd_i sd_j``. A wrong likelihood scale (missing ``N / B``,
temperature ignored) changes the covariance by a factor 2 or more, far outside.
"""
from __future__ import annotations

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch.utils.data import DataLoader, TensorDataset

import bayes_colora as bc
from bayes_colora.inference.vi import make_guide, make_model
from linear_gaussian import exact_posterior, linear_data, linear_subspace, loader

D, N, SIGMA, S = 3, 64, 0.5, 1.0
STEPS = 400


def fit(guide, batch=N, temperature=1.0, steps=STEPS, particles=64, seed=0):
    x, y, _ = linear_data(N, D, SIGMA)
    sub = linear_subspace(D)
    torch.manual_seed(seed)
    post = bc.fit_vi(sub, loader(x, y, batch, shuffle=batch < N), bc.Gaussian(SIGMA), bc.NormalPrior(S),
                     guide=guide, steps=steps, lr=0.05, lr_decay=0.01 ** (1 / steps),
                     num_particles=particles, temperature=temperature, progress=False)
    return sub, post, x, y


def standardised_errors(post, mu, cov):
    sd = cov.diagonal().sqrt()
    return ((post.mean - mu) / sd).abs().max(), ((post.covariance - cov) / (sd[:, None] * sd)).abs().max()


@pytest.mark.parametrize("guide, kind", [("full", bc.GaussianPosterior),
                                         ("lowrank", bc.LowRankGaussianPosterior)])
def test_full_and_lowrank_guides_recover_the_exact_posterior(guide, kind):
    sub, post, x, y = fit(guide)
    mu, cov = exact_posterior(x, y, SIGMA, S)
    assert type(post) is kind
    err_mean, err_cov = standardised_errors(post, mu, cov)
    assert err_mean < 0.1 and err_cov < 0.1
    assert torch.allclose(sub.theta, post.mean)                      # sub left at the VI mean
    assert len(post.history) == STEPS and post.history[-1]["step"] == STEPS


def test_tempered_minibatch_posterior():
    # likelihood / T with T = 2 is the exact posterior with sigma^2 doubled; minibatches of 16
    # out of 64 are scaled by N / B = 4 inside the subsampled plate
    _, post, x, y = fit("full", batch=16, temperature=2.0, steps=600)
    mu, cov = exact_posterior(x, y, SIGMA * 2 ** 0.5, S)
    err_mean, err_cov = standardised_errors(post, mu, cov)
    assert err_mean < 0.15 and err_cov < 0.15                        # extra minibatch noise


def test_mean_field_guide_gives_exact_mean_and_inverse_precision_diagonal():
    _, post, x, y = fit("diag")
    mu, cov = exact_posterior(x, y, SIGMA, S)
    assert type(post) is bc.DiagGaussianPosterior
    want_var = 1 / torch.linalg.inv(cov).diagonal()                  # mean-field optimum
    assert ((post.mean - mu) / want_var.sqrt()).abs().max() < 0.1
    assert ((post.variance / want_var) - 1).abs().max() < 0.1


def test_vectorised_particles_equal_the_sequential_average_in_one_forward_call():
    x, y, _ = linear_data(N, D, SIGMA)
    sub, lik = linear_subspace(D), bc.Gaussian(SIGMA)
    model = make_model(sub, lik, bc.NormalPrior(S), N)
    pyro.clear_param_store()
    guide = make_guide(model, "lowrank", torch.zeros(D, dtype=torch.float64), 0.3, 2)
    guide(x, y)                                                      # create the parameters
    drawn = []

    def recording_guide(*args):
        out = guide(*args)
        drawn.append(out["theta"])
        return out

    calls = []
    hook = sub.model.register_forward_hook(lambda *_: calls.append(1))
    vectorised = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    loss = vectorised.loss(model, recording_guide, x, y)
    assert len(calls) == 1                                           # 8 particles, one forward
    thetas = drawn[0].reshape(-1, D)
    assert thetas.shape == (8, D) and thetas.std(0).min() > 0        # 8 distinct particles
    per_particle = []
    for t in thetas:                                                 # the same numbers, one by one
        m = poutine.trace(poutine.condition(model, {"theta": t})).get_trace(x, y)
        per_particle.append(m.log_prob_sum() - guide.get_posterior().log_prob(t))
    hook.remove()
    assert len(calls) == 9
    assert abs(loss + torch.stack(per_particle).mean().item()) < 1e-8 * abs(loss)


def test_unknown_guide_missing_prior_and_empty_loader_are_named():
    x, y, _ = linear_data(N, D, SIGMA)
    sub, lik = linear_subspace(D), bc.Gaussian(SIGMA)
    with pytest.raises(ValueError, match="unknown guide 'laplace'"):
        bc.fit_vi(sub, loader(x, y, 8), lik, bc.NormalPrior(1.0), guide="laplace", progress=False)
    with pytest.raises(ValueError, match="proper prior"):
        bc.fit_vi(sub, loader(x, y, 8), lik, None, progress=False)
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="loader is empty"):
        bc.fit_vi(sub, empty, lik, bc.NormalPrior(1.0), progress=False)
    with pytest.raises(ValueError, match="loader is empty"):             # N given: caught when cycling
        bc.fit_vi(sub, empty, lik, bc.NormalPrior(1.0), n_data=10, progress=False)


@pytest.mark.parametrize("guide", ["diag", "lowrank", "full"])
def test_save_load_gives_the_same_samples(guide, tmp_path):
    _, post, _, _ = fit(guide, steps=5, particles=2)
    post.save(tmp_path / "vi.pt")
    loaded = bc.load_posterior(tmp_path / "vi.pt")
    assert type(loaded) is type(post)
    a = post.sample(6, generator=torch.Generator().manual_seed(3))
    b = loaded.sample(6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert loaded.history == post.history


def test_two_fits_do_not_share_parameters():
    _, first, _, _ = fit("diag", steps=5, particles=2, seed=1)
    _, second, _, _ = fit("diag", steps=5, particles=2, seed=1)
    assert torch.equal(first.mean, second.mean) and torch.equal(first.std, second.std)
