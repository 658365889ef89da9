"""``chunk_size="auto"``: the fastest chunking is measured once per shapes and remembered.

Known answers: with a scripted clock the choice is the candidate that took least; a subspace
times only on the first call with given shapes (the cache), and the auto-chunked outputs are the
unchunked ones, for the plain and the linearised predictive.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bayes_colora as bc
from bayes_colora import chunking


def test_fastest_chunk_picks_the_candidate_that_took_least():
    cost = {None: 5.0, 16: 3.0, 8: 1.0, 4: 2.0}
    now, seen = [0.0], []

    def run(chunk):
        seen.append(chunk)
        now[0] += cost[chunk]

    best = chunking.fastest_chunk(run, 32, torch.device("cpu"), clock=lambda: now[0])
    assert best == 8
    assert seen == [c for c in (None, 16, 8, 4) for _ in range(chunking.RUNS)]
    # candidates not smaller than S are skipped
    seen.clear()
    chunking.fastest_chunk(run, 8, torch.device("cpu"), clock=lambda: now[0])
    assert set(seen) == {None, 4}


def test_resolve_chunk_checks_its_argument():
    for bad in (0, -2, "fast"):
        with pytest.raises(ValueError, match="chunk_size"):
            chunking.resolve_chunk(bad, {}, "k", lambda c: None, 8, torch.device("cpu"))
    assert chunking.resolve_chunk(3, {}, "k", lambda c: None, 8, torch.device("cpu")) == 3


def test_auto_chunk_is_measured_once_per_shapes_and_changes_nothing(monkeypatch):
    torch.manual_seed(0)
    sub = bc.Subspace.from_model(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)), bc.LoRA(rank=2))
    calls = []
    real = chunking.fastest_chunk
    monkeypatch.setattr(chunking, "fastest_chunk", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    x = torch.randn(5, 4)
    thetas = sub.theta + 0.1 * torch.randn(32, sub.dim)
    with torch.no_grad():
        plain = sub(x, theta=thetas)
        auto = sub(x, theta=thetas, chunk_size="auto")
        again = sub(x, theta=thetas, chunk_size="auto")
        sub(torch.randn(7, 4), theta=thetas, chunk_size="auto")  # other shapes: measured again
    torch.testing.assert_close(auto, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, plain, rtol=0, atol=1e-6)
    assert calls == [32, 32]
    assert set(sub._chunk_choice.values()) <= {None, 16, 8, 4}

    post = bc.DiagGaussianPosterior(sub.theta, torch.full((sub.dim,), 0.05), likelihood=bc.Gaussian(sigma=0.1))
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    for linearized in (False, True):
        a = bc.predict(sub, post, x, n_samples=16, generator=g(), linearized=linearized)
        b = bc.predict(sub, post, x, n_samples=16, generator=g(), linearized=linearized, chunk_size="auto")
        torch.testing.assert_close(b.epistemic, a.epistemic, rtol=1e-5, atol=1e-8)
        assert a.epistemic.max() > 0
