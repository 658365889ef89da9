"""``fit_map``'s per-epoch hook and its merge-and-reset schedule.

Known answers: the hook sees each epoch's history record and the estimate of that epoch (also in
``sub.theta``); returning ``True`` stops training there. ``merge_and_reset=True`` is exactly the
manual recipe it replaces, one-epoch ``fit_map`` calls (each with a fresh AdamW) each followed by
``sub.merge_and_reset``, with the same draws of the restarted factors.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import bayes_colora as bc


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 6, 6, generator=g)
    y = x.mean(dim=(1, 2, 3)).unsqueeze(1) * 3 + 0.1 * torch.randn(24, 1, generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]


def _sub(spec: bc.AdapterSpec | None = None) -> bc.Subspace:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Flatten(), nn.Linear(144, 1))
    return bc.Subspace.from_model(model, spec or bc.ConvCoLoRA())


def test_on_epoch_sees_each_record_and_estimate_and_can_stop():
    sub, data, seen = _sub(), _data(), []

    def hook(record, theta):
        assert torch.equal(sub.theta, theta)  # sub(x) evaluates this epoch's estimate
        with torch.no_grad():
            torch.testing.assert_close(sub(data[0][0]), sub(data[0][0], theta=theta), rtol=0, atol=0)
        seen.append((dict(record), theta.clone()))
        return record["epoch"] == 2

    post = bc.fit_map(sub, data, bc.Gaussian(sigma=0.5), prior=bc.NormalPrior(1.0), epochs=5, lr=1e-2,
                      progress=False, on_epoch=hook)
    assert [r["epoch"] for r, _ in seen] == [1, 2]
    assert post.history == [r for r, _ in seen]  # stopped after epoch 2, its record last
    assert not torch.equal(seen[0][1], seen[1][1])  # the estimate moved between epochs
    torch.testing.assert_close(post.mean, seen[1][1], rtol=0, atol=0)


def test_merge_and_reset_equals_the_manual_recipe():
    data, lik, prior = _data(), bc.Gaussian(sigma=0.5), bc.NormalPrior(1.0)
    auto, manual = _sub(), _sub()
    bc.fit_map(auto, data, lik, prior=prior, epochs=3, lr=1e-2, progress=False, merge_and_reset=True,
               generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        bc.fit_map(manual, data, lik, prior=prior, epochs=1, lr=1e-2, progress=False)
        manual.merge_and_reset(gen)
    torch.testing.assert_close(auto.theta, manual.theta, rtol=0, atol=1e-6)
    for (name, a), b in zip(auto.model.state_dict().items(), manual.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # the merged kernels moved: training happened and was folded into the frozen weights
    fresh = _sub()
    kernel = "0.base.weight"
    assert (auto.model.state_dict()[kernel] - fresh.model.state_dict()[kernel]).abs().max() > 1e-3


def test_merge_and_reset_refuses_a_checkpoint_and_adapters_that_cannot_reset(tmp_path):
    data, lik = _data(), bc.Gaussian(sigma=0.5)
    with pytest.raises(ValueError, match="checkpoint"):
        bc.fit_map(_sub(), data, lik, epochs=1, progress=False, merge_and_reset=True,
                   checkpoint=tmp_path / "c.pt")
    with pytest.raises(ValueError, match="can be reset"):
        bc.fit_map(_sub(bc.BitFit()), data, lik, epochs=1, progress=False, merge_and_reset=True)


def test_compiled_fit_map_matches_the_eager_one():
    """``compile=True`` computes the same loss and gradients (``torch.compile`` may reorder float
    operations: agreement to float32 rounding accumulated over 6 AdamW steps, not bit for bit)."""
    data, lik, prior = _data(), bc.Gaussian(sigma=0.5), bc.NormalPrior(1.0)
    eager, compiled = _sub(), _sub()
    a = bc.fit_map(eager, data, lik, prior=prior, epochs=2, lr=1e-2, progress=False)
    counters.clear()
    b = bc.fit_map(compiled, data, lik, prior=prior, epochs=2, lr=1e-2, progress=False, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled path ran
    for ra, rb in zip(a.history, b.history):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert (a.mean - eager.theta).abs().max() == 0 and (b.mean - compiled.theta).abs().max() == 0
    torch.testing.assert_close(b.mean, a.mean, rtol=1e-4, atol=1e-5)
    assert (a.mean - _sub().theta).abs().max() > 1e-3  # training moved theta
