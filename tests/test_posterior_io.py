"""Posterior save / load: the same samples for the same generator, the likelihood restored, and
atomic writes (a failed write leaves neither a partial file nor a temporary one)."""
from __future__ import annotations

import os

import pytest
import torch

import bayes_colora as bc

D = 5


def _posteriors():
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(D, generator=g)
    a = torch.randn(D, D, generator=g)
    history = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]
    return {
        "dirac": bc.DiracPosterior(loc, likelihood=bc.Gaussian(sigma=0.3), history=history),
        "full": bc.GaussianPosterior(loc, torch.linalg.cholesky(a @ a.T + torch.eye(D)),
                                     likelihood=bc.Categorical()),
        "diag": bc.DiagGaussianPosterior(loc, torch.rand(D, generator=g) + 0.1,
                                         likelihood=bc.Gaussian(learn_sigma=True, sigma=0.7)),
        "lowrank": bc.LowRankGaussianPosterior(loc, torch.rand(D, generator=g), torch.randn(D, 2, generator=g),
                                               likelihood=bc.Gaussian(heteroscedastic=True, dim=1)),
    }


@pytest.mark.parametrize("kind", ["dirac", "full", "diag", "lowrank"])
def test_save_load_gives_the_same_samples(kind, tmp_path):
    post = _posteriors()[kind]
    path = tmp_path / f"{kind}.pt"
    post.save(path)
    loaded = bc.load_posterior(path)
    assert type(loaded) is type(post)
    want = post.sample(7, generator=torch.Generator().manual_seed(42))
    got = loaded.sample(7, generator=torch.Generator().manual_seed(42))
    assert got.shape == (7, D)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(loaded.mean, post.mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.variance, post.variance, rtol=0, atol=0)
    assert loaded.history == post.history
    assert type(loaded.likelihood) is type(post.likelihood)
    assert loaded.likelihood.config().keys() == post.likelihood.config().keys()
    for k, v in post.likelihood.state_dict().items():
        torch.testing.assert_close(loaded.likelihood.state_dict()[k], v)
    if kind != "dirac":  # a real spread: a sample is not the mean
        assert (want - post.mean).abs().max() > 1e-3
    assert os.listdir(tmp_path) == [f"{kind}.pt"]


def test_learned_sigma_survives_save_load(tmp_path):
    lik = bc.Gaussian(learn_sigma=True, sigma=1.0)
    with torch.no_grad():
        lik.log_sigma.fill_(-1.0)  # as if trained
    bc.DiracPosterior(torch.zeros(D), likelihood=lik).save(tmp_path / "p.pt")
    loaded = bc.load_posterior(tmp_path / "p.pt")
    torch.testing.assert_close(loaded.likelihood.sigma.detach(), torch.tensor(-1.0).exp())
    assert loaded.likelihood.learn_sigma


def _fail(*args, **kwargs):
    raise OSError("disk full")


def test_posterior_write_is_atomic(tmp_path, monkeypatch):
    post = _posteriors()["full"]
    path = tmp_path / "post.pt"
    monkeypatch.setattr(torch, "save", _fail)
    with pytest.raises(OSError, match="disk full"):
        post.save(path)
    assert os.listdir(tmp_path) == []  # no target, no temporary file
    monkeypatch.undo()
    _posteriors()["dirac"].save(path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _fail)
    with pytest.raises(OSError):
        post.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["post.pt"]  # old file intact
    monkeypatch.undo()
    assert isinstance(bc.load_posterior(path), bc.DiracPosterior)


def test_adapter_write_is_atomic(tmp_path, monkeypatch, tiny_mlp):
    import safetensors.torch

    model, _ = tiny_mlp
    sub = bc.Subspace.from_model(model, bc.BitFit())
    monkeypatch.setattr(safetensors.torch, "save_file", _fail)
    with pytest.raises(OSError, match="disk full"):
        sub.save_adapters(tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []
