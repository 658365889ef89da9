r"""The folded forward of conv adapters: ``conv(x, W + dW) + b`` against ``base(x) + conv(x, dW)``.

Known answer: the two-convolution form (the definition of the adapted layer). Tolerances come from
the standard rounding-error bound of a sum of products: a computed ``sum_j a_j b_j`` of ``n``
terms is within ``gamma_n sum_j |a_j| |b_j|`` of the exact value, ``gamma_n = n u / (1 - n u)``
(``u`` the unit roundoff), whatever the order of summation. Both forms compute the same exact
function, so they differ by at most twice the bound, where the sums of ``|a_j| |b_j|`` are what
the same computation gives on absolute values: the network with ``|x|``, ``|W|``, ``|b|`` and
every adapter factor replaced by its absolute value (each ``dW`` is a sum of products of factor
entries, so the absolute-value factors give the sum of the absolute values of its terms). For a
gradient the same holds with the absolute-value problem's gradient.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_colora as bc
from bayes_colora.adapters.conv import ConvDeltaLayer
from bayes_colora.adapters.layers import conv_apply

LAYERS = {  # (layer, input shape): groups, stride, dilation, padding modes, output padding, 1/2/3-d
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (2, 4, 9, 8)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), (2, 4, 6, 6)),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 7)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1,
                                                    dilation=2, groups=2), (2, 4, 5, 4)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=1), (2, 3, 11)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(2, 4, 2, stride=2, groups=2), (1, 2, 3, 3, 2)),
}
SPECS = {"colora": lambda: bc.ConvCoLoRA(), "tucker": lambda: bc.TuckerCoLoRA(ranks=(2, 2)),
         "lora": lambda: bc.LoRA(rank=2)}
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def _gamma(n: int, dtype: torch.dtype) -> float:
    nu = n * UNIT_ROUNDOFF[dtype]
    return nu / (1 - nu)


def _adapted(layer_name: str, spec: str, dtype: torch.dtype, seed: int = 0):
    """A randomised layer wrapped by one conv adapter with non-zero factors, and an input."""
    torch.manual_seed(seed)
    make, shape = LAYERS[layer_name]
    layer = make().to(dtype)
    sub = bc.Subspace.from_model(nn.Sequential(layer), SPECS[spec]())
    sub.theta = sub.theta + 0.5 * torch.randn(sub.dim, dtype=dtype)
    return sub, sub.model[0], torch.randn(*shape, dtype=dtype)


def _abs_copy(module: nn.Module) -> nn.Module:
    """The same module with every parameter replaced by its absolute value."""
    out = copy.deepcopy(module)
    with torch.no_grad():
        for p in out.parameters():
            p.abs_()
    return out


def _two_conv(adapter: ConvDeltaLayer, x: torch.Tensor) -> torch.Tensor:
    return adapter.base(x) + conv_apply(adapter.base_layer, x, adapter.delta_weight())


def _terms(adapter: ConvDeltaLayer) -> int:
    """An upper bound on the roundings along one output: the fan-in of an output (Conv:
    ``c1 prod(k)``, ConvTranspose: at most ``c0 prod(k)``), the terms of one ``dW`` entry (Tucker:
    ``r0 r1``, LoRA: ``r``, ConvCoLoRA: 1), and the additions of ``W + dW``, the bias and the outputs."""
    weight = adapter.base_layer.weight
    if hasattr(adapter, "core"):
        dw_terms = adapter.core.shape[0] * adapter.core.shape[1]
    else:
        dw_terms = adapter.lora_A.shape[0] if hasattr(adapter, "lora_A") else 1
    return max(weight[0].numel(), weight[:, 0].numel()) + dw_terms + 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_folded_equals_two_convolutions(layer_name, spec, dtype):
    sub, adapter, x = _adapted(layer_name, spec, dtype)
    assert adapter.folds()
    with torch.no_grad():
        folded, reference = sub(x), _two_conv(adapter, x)
        bound = 2 * _gamma(_terms(adapter), dtype) * _two_conv(_abs_copy(adapter), x.abs())
    assert (reference - adapter.base(x)).abs().max() > 0.1  # the delta is not zero
    assert torch.all((folded - reference).abs() <= bound)


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("layer_name", ["conv2d", "conv2d_depthwise", "conv_transpose2d"])
def test_folded_gradients_equal_two_convolutions(layer_name, spec):
    """The factors' gradients of ``sum(R * y)`` agree; the frozen kernel and bias get none."""
    dtype = torch.float64
    sub, adapter, x = _adapted(layer_name, spec, dtype)
    x.requires_grad_(True)
    weights = torch.randn(adapter(x).shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    factors = [p for p in adapter.parameters() if p.requires_grad]

    def grads(forward, module, inputs, out_weights):
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.autograd.grad((out_weights * forward(module, inputs)).sum(), params + [inputs])

    folded = grads(lambda m, v: m(v), adapter, x, weights)
    reference = grads(_two_conv, adapter, x, weights)
    absolute = _abs_copy(adapter)
    x_abs = x.detach().abs().requires_grad_(True)
    bound = grads(_two_conv, absolute, x_abs, weights.abs())
    gamma = 2 * _gamma(_terms(adapter) * weights.numel(), dtype)  # any gradient entry sums fewer terms
    assert len(folded) == len(factors) + 1
    for got, want, mag in zip(folded, reference, bound):
        assert want.abs().max() > 0
        assert torch.all((got - want).abs() <= gamma * mag)
    assert adapter.base_layer.weight.grad is None and adapter.base_layer.weight.requires_grad is False


@pytest.mark.parametrize("fold", [True, False])
def test_one_convolution_when_folded(monkeypatch, fold):
    """Folded: one conv2d call per adapted layer; two-convolution form: two."""
    sub, adapter, x = _adapted("conv2d", "colora", torch.float32)
    adapter.fold = fold
    calls = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(1) or conv2d(*a, **k))
    with torch.no_grad():
        sub(x)
    assert len(calls) == (1 if fold else 2)


class _OwnForward(nn.Conv2d):
    """A conv whose forward is not ``conv(x, W) + b`` (here: it doubles the input first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(2 * x)


def test_two_convolutions_where_folding_does_not_apply():
    """Stacked below another adapter, a conv with its own forward, a hooked base: the
    two-convolution form runs, and computes ``base(x) + conv(x, dW)``."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    # ConvCoLoRA stacked on BitFit: its base is the BitFit adapter, whose bias shift must stay
    sub = bc.Subspace.from_model(nn.Sequential(nn.Conv2d(3, 4, 3)), [bc.BitFit(), bc.ConvCoLoRA()])
    sub.theta = torch.randn(sub.dim)
    outer = sub.model[0]
    assert isinstance(outer, ConvDeltaLayer) and not outer.folds()
    conv = outer.base_layer
    with torch.no_grad():
        want = (F.conv2d(x, conv.weight + outer.delta_weight(), conv.bias)
                + outer.base.bias_delta.reshape(-1, 1, 1))
        torch.testing.assert_close(sub(x), want)
    # a conv subclass with its own forward
    sub = bc.Subspace.from_model(nn.Sequential(_OwnForward(3, 4, 3)), bc.ConvCoLoRA())
    sub.theta = torch.randn(sub.dim)
    adapter = sub.model[0]
    assert not adapter.folds()
    with torch.no_grad():
        torch.testing.assert_close(sub(x), _two_conv(adapter, x))
    # a forward hook on the base layer still runs
    sub, adapter, x = _adapted("conv2d", "colora", torch.float32)
    seen = []
    adapter.base.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not adapter.folds()
    with torch.no_grad():
        sub(x)
    assert len(seen) == 1


def _conv_net(dtype: torch.dtype) -> nn.Module:
    """Two linear layers in x (no nonlinearity), so the rounding bound composes: grouped,
    strided, dilated conv, then a grouped transposed conv."""
    return nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
                         nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2)).to(dtype)


@pytest.mark.parametrize("spec", list(SPECS))
def test_theta_batch_matches_loop(spec):
    """``sub(x, theta=T)`` for ``T`` of shape (S, d) (vmap, batched kernels ``W + dW_s``) equals the
    loop over samples and the two-convolution form of each sample."""
    dtype = torch.float64
    torch.manual_seed(0)
    sub = bc.Subspace.from_model(_conv_net(dtype), SPECS[spec]())
    x = torch.randn(3, 4, 9, 9, dtype=dtype)
    T = sub.theta + 0.5 * torch.randn(5, sub.dim, dtype=dtype)
    with torch.no_grad():
        batched = sub(x, theta=T)
        loop = torch.stack([sub(x, theta=t) for t in T])
        reference, bound = [], []
        for t in T:
            sub.theta = t
            layers = list(sub.model)
            absolute = [_abs_copy(m) for m in layers]
            reference.append(_two_conv(layers[1], _two_conv(layers[0], x)))
            bound.append(_two_conv(absolute[1], _two_conv(absolute[0], x.abs())))
    terms = sum(_terms(m) for m in layers)
    assert batched.shape == (5, 3, 4, 9, 9)
    assert torch.all((batched - loop).abs() <= 2 * _gamma(terms, dtype) * torch.stack(bound))
    assert torch.all((batched - torch.stack(reference)).abs() <= 2 * _gamma(terms, dtype) * torch.stack(bound))
