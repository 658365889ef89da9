"""Subspace on an MLP, timm's resnet18 and tiny transformers models (BERT, ViT, GPT-2 with its
Conv1D, Depth Anything with its Conv2d / ConvTranspose2d DPT neck), for every adapter kind.

Known answers: a fresh subspace is the base model (every delta is exactly zero); the vectorised
forward over S thetas equals the loop over them; the setter and the functional forward agree.
"""
from __future__ import annotations

import copy

import pytest
import torch

import bayes_colora as bc
from bayes_colora.subspace import call_model, default_output
from conftest import MODEL_CASES

CASES = [(model, kind) for model, (_, specs) in MODEL_CASES.items() for kind in specs]


def _build(model_name: str, kind: str):
    builder, specs = MODEL_CASES[model_name]
    model, x = builder()
    reference = copy.deepcopy(model)
    sub = bc.Subspace.from_model(model, specs[kind]())
    return sub, reference, x


@pytest.mark.parametrize("model_name,kind", CASES)
def test_fresh_subspace_is_the_base_model(model_name, kind):
    sub, reference, x = _build(model_name, kind)
    with torch.no_grad():
        want = default_output(call_model(reference, x))
        got = sub(x)
        got_functional = sub(x, theta=sub.theta)
    assert sub.dim > 0
    assert want.std() > 0  # the comparison is not between two constants
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_functional, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_name,kind", CASES)
def test_batched_theta_equals_loop_and_setter(model_name, kind):
    sub, reference, x = _build(model_name, kind)
    g = torch.Generator().manual_seed(1)
    theta0 = sub.theta.clone()
    thetas = theta0 + 0.1 * torch.randn(3, sub.dim, generator=g)
    with torch.no_grad():
        base = sub(x)
        batched = sub(x, theta=thetas)
        assert batched.shape == (3, *base.shape)
        for s in range(3):
            single = sub(x, theta=thetas[s])
            torch.testing.assert_close(batched[s], single, rtol=0, atol=1e-5)
            sub.theta = thetas[s]
            torch.testing.assert_close(sub(x), single, rtol=0, atol=1e-5)
            assert (single - base).abs().max() > 1e-4  # theta changes the output
        sub.theta = theta0
        torch.testing.assert_close(sub(x), base, rtol=0, atol=0)
        # chunked evaluation is the same computation
        torch.testing.assert_close(sub(x, theta=thetas, chunk_size=2), batched, rtol=0, atol=1e-5)


def test_theta_layout_matches_unflatten(tiny_mlp):
    model, _ = tiny_mlp
    sub = bc.Subspace.from_model(model, [bc.BitFit(), bc.LoRA(rank=2, targets=r"^0$")])
    pieces = sub.unflatten(torch.arange(sub.dim, dtype=torch.float32))
    params = dict(sub.model.named_parameters())
    start = 0
    for name, piece in pieces.items():
        assert piece.shape == params[name].shape
        assert piece.reshape(-1)[0] == start  # consecutive, in parameter order
        start += piece.numel()
    assert start == sub.dim
    # the base model is frozen and in eval mode: only adapter parameters are trainable
    trainable = [n for n, p in sub.model.named_parameters() if p.requires_grad]
    assert trainable == sub.param_names and all("base." not in n.split(".")[-2:] for n in trainable)
    assert not sub.model.training


def test_frozen_layers_below_the_first_adapter_run_once_for_all_samples():
    """``sub(x, theta=T)`` with T of shape (S, d): a frozen layer below every adapter receives and
    returns plain (not vmap-batched) tensors, so it runs once for all S samples (the saving the
    benchmark ``vmap_vs_loop`` measures for top-of-network adapters); the adapted layer and the
    layers above it see batched ones. Moving the adapter to the first layer makes that layer's
    output batched (the check can fail)."""
    from torch._C._functorch import is_batchedtensor

    def batched_io(targets: str) -> list[tuple[bool, bool]]:
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                                  torch.nn.Tanh(), torch.nn.Linear(8, 1))
        sub = bc.Subspace.from_model(mlp, bc.LoRA(rank=2, targets=targets))
        seen = []
        for layer in (mlp[0], mlp[2], mlp[4]):  # the adapter module where one wraps the layer
            layer.register_forward_hook(
                lambda m, i, o: seen.append((is_batchedtensor(i[0]), is_batchedtensor(o))))
        with torch.no_grad():
            out = sub(torch.randn(5, 4), theta=sub.theta + torch.randn(6, sub.dim))
        assert out.shape == (6, 5, 1)
        return seen

    assert batched_io(r"^4$") == [(False, False), (False, False), (False, True)]
    assert batched_io(r"^0$") == [(False, True), (True, True), (True, True)]
