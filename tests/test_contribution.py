"""ContributionLoRA rank allocation and FAIG contribution scores, against closed forms."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayes_colora as bc
from bayes_colora.adapters.contribution import allocate_ranks, lora_shape
from bayes_colora.contribution import finetune, integrated_gradients


# --------------------------------------------------------------------------- allocation

def test_allocation_proportional_when_exact():
    # lambda (10*3 + 10*1) = 80 -> lambda = 2 -> ranks 6, 2, all 80 parameters spent
    assert allocate_ranks({"a": 3.0, "b": 1.0}, {"a": 10, "b": 10}, 80) == {"a": 6, "b": 2}


def test_allocation_largest_remainder_and_budget():
    # lambda = 30 / 8 = 3.75 -> t = 3.75, 3.75 -> floors 3, 3 (24 params), 6 left:
    # a (+3) fits, then b (+5) does not
    ranks = allocate_ranks({"a": 1.0, "b": 1.0}, {"a": 3, "b": 5}, 30)
    assert ranks == {"a": 4, "b": 3}
    assert 3 * ranks["a"] + 5 * ranks["b"] <= 30


def test_allocation_caps_redistribute():
    # a capped at 4 (40 params); the remaining 40 go to b: 40 / 10 = 4
    assert allocate_ranks({"a": 10.0, "b": 1.0}, {"a": 10, "b": 10}, 80, {"a": 4, "b": 50}) == {"a": 4, "b": 4}
    # everything fits at the caps
    assert allocate_ranks({"a": 1.0, "b": 0.0}, {"a": 2, "b": 2}, 100, {"a": 3, "b": 5}) == {"a": 3, "b": 0}


def test_allocation_zero_score_and_min_rank():
    assert allocate_ranks({"a": 1.0, "b": 0.0}, {"a": 4, "b": 4}, 16) == {"a": 4, "b": 0}
    # min_rank 1 on both (8 params), the other 8 proportional: a gets them
    assert allocate_ranks({"a": 1.0, "b": 0.0}, {"a": 4, "b": 4}, 16, min_rank=1) == {"a": 3, "b": 1}


@pytest.mark.parametrize("kwargs, match", [
    (dict(scores={"a": -1.0}, costs={"a": 1}, budget=4), "finite and >= 0"),
    (dict(scores={"a": 1.0}, costs={"b": 1}, budget=4), "same layers"),
    (dict(scores={"a": 0.0}, costs={"a": 1}, budget=4), "every score is 0"),
    (dict(scores={"a": 1.0}, costs={"a": 5}, budget=4, min_rank=1), "below"),
])
def test_allocation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate_ranks(**kwargs)


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                         nn.Conv2d(8, 3, 3, padding=1))


def test_contribution_lora_spec_builds_per_layer_ranks():
    model = _convnet()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    # costs per rank: conv0 8 + 27 = 35 (max 8), conv2 8 + 8 = 16 (max 8), conv4 3 + 72 = 75 (max 3)
    assert [sum(lora_shape(model[i])) for i in (0, 2, 4)] == [35, 16, 75]
    scores = {"0": 2.0, "2": 0.0, "4": 1.0}
    # lambda (35*2 + 75*1) = 290 -> lambda = 2 -> ranks 4 and 2, exactly 290 parameters
    spec = bc.ContributionLoRA(budget=290, scores=scores)
    sub = bc.Subspace.from_model(model, spec)
    assert spec.ranks == {"0": 4, "2": 0, "4": 2}
    assert sub.dim == spec.n_params == 290
    layers = sub.adapter_layers()
    assert set(layers) == {"0", "4"} and layers["0"].lora_A.shape == (4, 27)
    assert layers["4"].lora_B.shape == (3, 2) and layers["0"].scale == 1.0
    torch.testing.assert_close(sub(x), ref)  # zero delta at initialisation
    assert [r["rank"] for r in spec.allocation()] == [4, 0, 2]


def test_contribution_lora_errors():
    with pytest.raises(ValueError, match="no score"):
        bc.Subspace.from_model(_convnet(), bc.ContributionLoRA(100, {"0": 1.0}))
    with pytest.raises(ValueError, match="buys no rank-1"):
        bc.Subspace.from_model(_convnet(), bc.ContributionLoRA(10, {"0": 1.0, "2": 1.0, "4": 1.0}))


# --------------------------------------------------------------------------- FAIG

def _linear_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.randn(4, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _mse(out, y):
    return ((out - y) ** 2).mean()


def test_integrated_gradients_completeness_and_exact_scores():
    """A deep linear net with MSE is quadratic along the path only when one layer moves; with
    two moving layers it is quartic, and midpoint IG converges as 1/K^2. Completeness:
    sum IG = L(ft) - L(pre)."""
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ft = copy.deepcopy(pre)
    with torch.no_grad():
        ft[1].weight.add_(0.3 * torch.randn(2, 3))
    loader = _linear_task()
    x, y = next(iter(DataLoader(loader.dataset, batch_size=32)))
    gap = (_mse(ft(x), y) - _mse(pre(x), y)).item()
    ig = integrated_gradients(pre, ft, loader, _mse, steps=1, progress=False)
    # only layer 1 moved and L is quadratic in it: the midpoint rule is exact with K = 1
    total = sum(v.sum() for v in ig.values()).item()
    assert total == pytest.approx(gap, rel=1e-5, abs=1e-6)
    assert ig["0.weight"].abs().max() == 0
    scores = bc.contribution_scores(pre, loader, _mse, finetuned=ft, steps=1, progress=False)
    assert scores["0"] == 0.0
    # per filter (output row o of layer 1): |sum_j IG_oj|, summed
    expect = ig["1.weight"].sum(1).abs().sum().item()
    assert scores["1"] == pytest.approx(expect, rel=1e-6)


def test_integrated_gradients_converge_when_all_layers_move():
    torch.manual_seed(1)
    pre = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ft = copy.deepcopy(pre)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.2 * torch.randn_like(p))
    loader = _linear_task(1)
    x, y = next(iter(DataLoader(loader.dataset, batch_size=32)))
    gap = (_mse(ft(x), y) - _mse(pre(x), y)).item()
    def total(k: int) -> float:
        ig = integrated_gradients(pre, ft, loader, _mse, steps=k, progress=False)
        return sum(v.sum() for v in ig.values()).item()

    err = [abs(total(k) - gap) for k in (2, 8)]
    # midpoint rule: error ~ C / K^2, so 4x the points cut it about 16x (allow 8x)
    assert err[1] < err[0] / 8 and err[1] < 1e-3 * abs(gap)


def test_contribution_scores_runs_its_own_finetune():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = _linear_task()
    scores = bc.contribution_scores(model, loader, _mse, steps=4, finetune_steps=20, finetune_lr=1e-2,
                                    progress=False)
    assert list(scores) == ["0", "2"] and all(s > 0 for s in scores.values())
    for k, v in model.state_dict().items():  # the pre-trained model is untouched
        torch.testing.assert_close(v, before[k])
    tuned = finetune(model, loader, _mse, steps=20, lr=1e-2, progress=False)
    x, y = loader.dataset.tensors
    assert _mse(tuned(x), y) < _mse(model(x), y)


def test_contribution_scores_errors():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="does not match"):
        integrated_gradients(model, nn.Sequential(nn.Linear(4, 3)), _linear_task(), _mse, progress=False)
    with pytest.raises(ValueError, match="empty"):
        bc.contribution_scores(model, [], _mse, finetuned=copy.deepcopy(model), progress=False)
    # no weight change, no contribution: Delta = 0 makes every IG exactly 0
    assert bc.contribution_scores(model, _linear_task(), _mse, finetuned=copy.deepcopy(model),
                                  progress=False) == {"0": 0.0}
