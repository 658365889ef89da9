"""Adapter layers one by one: merge / unmerge on every supported layer kind, parameter counts
against the formulas in the adapters' docstrings, type targeting, stacking, and the safetensors
round trip of the adapter parameters."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import bayes_colora as bc
from bayes_colora.adapters.base import AdapterLayer


def _randomise(layer: nn.Module) -> nn.Module:
    """Non-trivial weights, biases and BatchNorm statistics (defaults are often 1 and 0)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 and not isinstance(
                layer, (nn.Linear, Conv1D, nn.modules.conv._ConvNd)) else 0.0))
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    return layer.eval()


LAYERS = {
    "linear": (lambda: nn.Linear(5, 7), (3, 5)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 6, 6)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 6, 6)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False), (2, 4, 6, 6)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), (2, 4, 5, 5)),
    "conv_transpose2d_grouped": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 5, 5)),
    "layernorm": (lambda: nn.LayerNorm(5), (3, 5)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(4), (2, 4, 6, 6)),
    "conv1d_hf": (lambda: Conv1D(7, 5), (3, 5)),  # transformers' Conv1D: nf=7 outputs, nx=5 inputs
}
LORA_OK = {"linear", "conv2d", "conv2d_grouped", "conv2d_depthwise", "conv_transpose2d",
           "conv_transpose2d_grouped", "conv1d_hf"}
KINDS = {
    "lora": lambda: [bc.LoRA(rank=2)],
    "bitfit": lambda: [bc.BitFit()],
    "difffit": lambda: [bc.DiffFit()],
    "stacked": lambda: [bc.LoRA(rank=2), bc.BitFit(), bc.DiffFit()],
    "stacked_reversed": lambda: [bc.DiffFit(), bc.LoRA(rank=2)],
    "norm_stacked": lambda: [bc.BitFit(), bc.DiffFit()],
}


def _merge_cases():
    for layer in LAYERS:
        for kind in KINDS:
            needs_lora = kind in ("lora", "stacked", "stacked_reversed")
            if needs_lora and layer not in LORA_OK:
                continue
            if kind == "bitfit" and layer == "conv2d_depthwise":  # no bias
                continue
            if kind == "norm_stacked" and layer in LORA_OK:
                continue
            yield layer, kind


def _layer_sub(layer_name: str, kind: str, seed: int = 0):
    torch.manual_seed(seed)
    make, shape = LAYERS[layer_name]
    layer = _randomise(make())
    x = torch.randn(*shape)
    ref = copy.deepcopy(layer)
    specs = KINDS[kind]()
    if layer_name == "conv2d_depthwise":  # no bias: BitFit has nothing to adapt there
        specs = [s for s in specs if not isinstance(s, bc.BitFit)]
    sub = bc.Subspace.from_model(nn.Sequential(layer), specs)
    return sub, layer, ref, x


@pytest.mark.parametrize("layer_name,kind", list(_merge_cases()))
def test_merge_gives_adapted_output_and_unmerge_restores(layer_name, kind, monkeypatch):
    sub, layer, ref, x = _layer_sub(layer_name, kind)
    g = torch.Generator().manual_seed(3)
    sub.theta = sub.theta + 0.3 * torch.randn(sub.dim, generator=g)
    with torch.no_grad():
        base_out = ref(x)
        adapted = sub(x)
        assert (adapted - base_out).abs().max() > 1e-2  # the delta is not zero
        sub.merge()
        # the original layer object now computes the adapted output by itself ...
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
        # ... and the adapter layers forward to their base only: their own delta is not applied
        for adapter in sub.adapter_layers().values():
            assert adapter.merged
            monkeypatch.setattr(type(adapter), "adapted_forward", _forbidden)
        torch.testing.assert_close(sub(x), adapted, rtol=1e-5, atol=1e-5)
        monkeypatch.undo()
        sub.unmerge()
    for (name, p), (_, q) in zip(layer.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=f"{name} not restored")
    with torch.no_grad():
        torch.testing.assert_close(sub(x), adapted, rtol=1e-5, atol=1e-5)


def _forbidden(self, x):
    raise AssertionError("a merged adapter ran its unmerged forward")


def test_merge_twice_and_unmerge_unmerged_raise():
    sub, *_ = _layer_sub("linear", "lora")
    with pytest.raises(RuntimeError, match="not merged"):
        sub.unmerge()
    sub.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        sub.merge()


def _own(layer: AdapterLayer) -> int:
    return sum(p.numel() for p in layer.parameters(recurse=False))


@pytest.mark.parametrize("layer_name,rank,want", [
    ("linear", 3, 3 * (5 + 7)),                     # r (in + out)
    ("conv1d_hf", 3, 3 * (5 + 7)),
    ("conv2d", 2, 2 * (6 + 4 * 9)),                 # r (cout + cin k^2)
    ("conv2d_grouped", 2, 2 * (6 + (4 // 2) * 9)),  # r (cout + cin/groups k^2)
    ("conv_transpose2d", 2, 2 * (4 + 6 * 9)),       # weight (cin, cout, k, k): r (cin + cout k^2)
])
def test_lora_parameter_count(layer_name, rank, want):
    layer = LAYERS[layer_name][0]()
    sub = bc.Subspace.from_model(nn.Sequential(layer), bc.LoRA(rank=rank))
    assert sub.dim == want


@pytest.mark.parametrize("layer_name,bitfit,difffit", [
    ("linear", 7, 14),                  # bias count; 2 out with a bias
    ("conv2d", 6, 12),
    ("conv2d_depthwise", None, 4),      # no bias: DiffFit has only the scale, BitFit nothing
    ("conv_transpose2d_grouped", 6, 12),
    ("layernorm", 5, 10),
    ("batchnorm2d", 4, 8),
    ("conv1d_hf", 7, 14),
])
def test_bitfit_difffit_parameter_counts(layer_name, bitfit, difffit):
    make = LAYERS[layer_name][0]
    assert bc.Subspace.from_model(nn.Sequential(make()), bc.DiffFit()).dim == difffit
    if bitfit is None:
        with pytest.raises(TypeError, match="nothing to adapt"):
            bc.Subspace.from_model(nn.Sequential(make()), bc.BitFit())
    else:
        assert bc.Subspace.from_model(nn.Sequential(make()), bc.BitFit()).dim == bitfit


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 5)).eval()


def test_counts_on_a_model_and_by_adapter():
    r = 2
    sub = bc.Subspace.from_model(_cnn(), [bc.BitFit(), bc.LoRA(rank=r), bc.DiffFit(targets=r"^1$")])
    lora = r * (8 + 3 * 9) + r * (4 + 8 * 9) + r * (16 + 5)
    bitfit = 8 + 8 + 5  # conv0 bias, bn bias, linear bias (conv3 has none)
    difffit = 2 * 8    # the BatchNorm: weight and bias
    assert sub.count_by_adapter() == {"LoRALinear": r * (16 + 5), "LoRAConv": lora - r * (16 + 5),
                                      "BitFitLayer": bitfit, "DiffFitLayer": difffit}
    assert sub.dim == lora + bitfit + difffit


def test_type_targeting_and_stacking():
    model = _cnn()
    sub = bc.Subspace.from_model(model, [bc.LoRA(rank=2, types=(nn.Conv2d,)),
                                         bc.BitFit(targets=r"^(0|5)$")])
    layers = sub.adapter_layers()
    # LoRA only on the convolutions; BitFit stacked on the first conv (it wraps the LoRA layer,
    # found under the original name) and on the linear layer
    assert type(model[0]).__name__ == "BitFitLayer" and type(model[0].base).__name__ == "LoRAConv"
    assert model[0].base_layer is layers["0.base"].base
    assert type(model[3]).__name__ == "LoRAConv"
    assert type(model[5]).__name__ == "BitFitLayer" and isinstance(model[5].base, nn.Linear)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert sub.dim == 2 * (8 + 27) + 2 * (4 + 72) + 8 + 5
    # types and targets together: only Linear layers among the matched names
    sub2 = bc.Subspace.from_model(_cnn(), bc.DiffFit(targets=r".", types=(nn.Linear,)))
    assert list(sub2.adapter_layers()) == ["5"]


def test_save_load_adapters_round_trip(tmp_path):
    spec = lambda: [bc.BitFit(), bc.LoRA(rank=2, types=(nn.Conv2d,))]  # noqa: E731
    sub = bc.Subspace.from_model(_cnn(), spec())
    sub.theta = torch.randn(sub.dim, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "adapters.safetensors"
    sub.save_adapters(path)
    assert os.listdir(tmp_path) == ["adapters.safetensors"]  # no temporary file left
    torch.manual_seed(123)  # a different LoRA initialisation
    other = bc.Subspace.from_model(_cnn(), spec())
    assert not torch.equal(other.theta, sub.theta)
    other.load_adapters(path)
    torch.testing.assert_close(other.theta, sub.theta, rtol=0, atol=0)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(other(x), sub(x), rtol=0, atol=0)


def test_load_adapters_into_a_different_subspace_fails_clearly(tmp_path):
    path = tmp_path / "adapters.safetensors"
    bc.Subspace.from_model(_cnn(), bc.LoRA(rank=2)).save_adapters(path)
    with pytest.raises(ValueError, match=r"0\.lora_A has shape \(2, 27\), this subspace has \(3, 27\)"):
        bc.Subspace.from_model(_cnn(), bc.LoRA(rank=3)).load_adapters(path)
    with pytest.raises(ValueError, match=r"does not fit this subspace: missing .*bias_delta.*unexpected .*lora_A"):
        bc.Subspace.from_model(_cnn(), bc.BitFit()).load_adapters(path)


def test_adapter_layers_expose_the_base_layers_attributes():
    """Model code that inspects a layer (Dinov2 reads ``projection.weight.dtype``) keeps working."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    sub = bc.Subspace.from_model(model, [bc.BitFit(), bc.LoRA(rank=2)])
    wrapped = sub.model[0]
    assert wrapped.weight is wrapped.base_layer.weight
    assert wrapped.out_channels == 4 and wrapped.kernel_size == (3, 3)
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute
