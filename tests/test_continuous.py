"""Continuous LoRA: alpha = 0 is the base layer, the delta is (A * alpha) B for both alpha
layouts, merge / unmerge, theta = the alphas only, the reference shift, and clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bayes_colora as bc
from bayes_colora.adapters.continuous import ContinuousLoRALinear, set_alpha_reference


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 3)).eval()


def test_alpha_zero_is_the_base_layer_bit_for_bit():
    model, x = _model(), torch.randn(7, 5)
    ref = model(x)
    sub = bc.Subspace.from_model(model, bc.ContinuousLoRA(rank=2, seed=1))
    assert torch.equal(sub(x), ref)
    assert torch.equal(sub(x, theta=torch.zeros(sub.dim)), ref)


@pytest.mark.parametrize("per, n_alpha", [("layer", 1), ("rank", 3)])
def test_delta_is_a_alpha_b_and_theta_is_the_alphas(per, n_alpha):
    model, x = _model(), torch.randn(4, 5)
    base = nn.Linear(5, 6)
    base.load_state_dict(model[0].state_dict())
    sub = bc.Subspace.from_model(model, bc.ContinuousLoRA(rank=3, per=per, seed=0))
    assert sub.dim == 2 * n_alpha                              # two linear layers, A and B frozen
    assert sub.param_names == ["0.alpha", "2.alpha"]
    theta = torch.randn(sub.dim, generator=torch.Generator().manual_seed(3))
    sub.theta = theta
    layer: ContinuousLoRALinear = sub.model[0]
    alpha = theta[:n_alpha]
    w = base.weight + (layer.lora_A * alpha) @ layer.lora_B     # (out, r) * (r,) then (r, in)
    torch.testing.assert_close(layer(x), x @ w.T + base.bias, rtol=1e-6, atol=1e-6)
    out = sub(x)
    sub.merge()
    torch.testing.assert_close(sub(x), out, rtol=1e-5, atol=1e-6)
    sub.unmerge()
    torch.testing.assert_close(sub.model[0].base_layer.weight, base.weight, rtol=0, atol=1e-6)


def test_batched_theta_matches_a_loop():
    model, x = _model(), torch.randn(4, 5)
    sub = bc.Subspace.from_model(model, bc.ContinuousLoRA(rank=2, per="rank", seed=0))
    thetas = torch.randn(5, sub.dim, generator=torch.Generator().manual_seed(0))
    batched = sub(x, theta=thetas)
    loop = torch.stack([sub(x, theta=t) for t in thetas])
    torch.testing.assert_close(batched, loop, rtol=1e-6, atol=1e-6)


def test_reference_shifts_the_origin_of_theta():
    model, x = _model(), torch.randn(4, 5)
    sub = bc.Subspace.from_model(model, bc.ContinuousLoRA(rank=2, seed=0))
    a = torch.tensor([0.7, -1.3])
    at_a = sub(x, theta=a)
    set_alpha_reference(sub.model, a)
    torch.testing.assert_close(sub(x, theta=torch.zeros(2)), at_a, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"alpha_ref has shape \(3,\), expected \(2,\)"):
        set_alpha_reference(sub.model, torch.zeros(3))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        bc.ContinuousLoRA(rank=0)
    with pytest.raises(ValueError, match="per must be one of"):
        bc.ContinuousLoRA(per="neuron")
    with pytest.raises(TypeError, match="not supported by ContinuousLoRA"):
        bc.Subspace.from_model(nn.Sequential(nn.Conv2d(1, 1, 3)), bc.ContinuousLoRA(targets="0"))
