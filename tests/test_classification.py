"""Classification kit (bayes_colora.classification) and the conv_classification study.

Known answers: the arrays written to the .npz file, torch's own bilinear resize, the tensors of a
weights file, W + dW computed by hand, the adapted network's logits (for the merged plain
network), and the class balance the synthetic set is built with.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_colora as bc
from bayes_colora.classification import (classifier, conv_targets, load_medmnist, mobilenet_v2, prepare_images,
                                         synthetic_medmnist, timm_classifier, tiny_cnn)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT / ".." / "shared" / "data" / "medmnist" / "pneumoniamnist_train_val.npz"
SHARED_WEIGHTS = ROOT / ".." / "shared" / "weights" / "mobilenetv2_imagenet_features.pt"


def _npz(path: Path, n: int = 5, rgb: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (n, 6, 7, 3) if rgb else (n, 6, 7)
    arrays = {"train_images": rng.integers(0, 256, shape, dtype=np.uint8),
              "train_labels": rng.integers(0, 4, (n, 1)),
              "val_images": rng.integers(0, 256, (2,) + shape[1:], dtype=np.uint8),
              "val_labels": rng.integers(0, 4, (2, 1))}
    np.savez(path, **arrays)
    return arrays


# ------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("rgb", [False, True])
def test_load_medmnist_layout(tmp_path, rgb):
    arrays = _npz(tmp_path / "octmnist.npz", rgb=rgb)
    x, y = load_medmnist(tmp_path / "octmnist.npz", "train")
    want = torch.from_numpy(arrays["train_images"]).float() / 255
    want = want.permute(0, 3, 1, 2) if rgb else want[:, None]
    assert x.shape == ((5, 3, 6, 7) if rgb else (5, 1, 6, 7)) and x.dtype == torch.float32
    assert torch.equal(x, want)
    assert torch.equal(y, torch.from_numpy(arrays["train_labels"][:, 0]))
    xv, _ = load_medmnist(tmp_path / "octmnist.npz", "val", size=16)
    assert xv.shape == (2, 3, 16, 16)


def test_load_medmnist_errors(tmp_path):
    _npz(tmp_path / "a.npz")
    with pytest.raises(KeyError, match="no test split .* splits present: train, val"):
        load_medmnist(tmp_path / "a.npz", "test")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_medmnist(tmp_path / "a.npz", "dev")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_medmnist(tmp_path / "missing.npz", "train")
    np.savez(tmp_path / "b.npz", train_images=np.zeros((4, 5, 5), np.uint8), train_labels=np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"train_labels has shape \(3, 1\), expected \(4, 1\)"):
        load_medmnist(tmp_path / "b.npz", "train")


def test_prepare_images():
    """Grey is repeated to three identical channels and resized exactly as torch's bilinear resize."""
    grey = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = prepare_images(grey, 64)
    want = F.interpolate(grey, size=(64, 64), mode="bilinear", align_corners=False)
    assert out.shape == (2, 3, 64, 64)
    for c in range(3):
        torch.testing.assert_close(out[:, c:c + 1], want)
    rgb = torch.rand(2, 3, 32, 32)
    assert prepare_images(rgb, 32) is rgb
    with pytest.raises(ValueError, match=r"got \(2, 2, 8, 8\)"):
        prepare_images(torch.rand(2, 2, 8, 8), 16)


@pytest.mark.skipif(not SHARED_DATA.is_file(), reason=f"{SHARED_DATA} is absent (no shared/ folder)")
def test_pneumoniamnist_real_file():
    x, y = load_medmnist(SHARED_DATA, "train")
    xv, yv = load_medmnist(SHARED_DATA, "val")
    assert x.shape == (3882, 1, 28, 28) and xv.shape == (524, 1, 28, 28)
    assert set(y.tolist()) == {0, 1} and set(yv.tolist()) == {0, 1}
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.std()) > 0.1


def test_synthetic_set(tmp_path):
    synthetic_medmnist(tmp_path / "s.npz", n_train=40, n_val=20, seed=3)
    x, y = load_medmnist(tmp_path / "s.npz", "train")
    assert x.shape == (40, 1, 28, 28) and int(y.sum()) == 20  # balanced: classes alternate
    synthetic_medmnist(tmp_path / "t.npz", n_train=40, n_val=20, seed=3)
    assert torch.equal(x, load_medmnist(tmp_path / "t.npz", "train")[0])  # seeded


# ------------------------------------------------------------------------------- backbones
def test_zero_head_and_grey_equals_rgb():
    """A fresh head predicts zeros; a grey image equals its three-channel copy."""
    torch.manual_seed(0)
    model = tiny_cnn(3)
    grey = torch.rand(2, 1, 20, 20)
    with torch.no_grad():
        assert torch.equal(model(grey), torch.zeros(2, 3))
        model.net.classifier.weight.normal_()
        torch.testing.assert_close(model(grey), model(grey.expand(-1, 3, -1, -1)))


def test_timm_classifier_from_local_weights(tmp_path):
    """Every non-head tensor comes from the file; the head is new (zero) with C outputs."""
    import timm

    torch.manual_seed(1)
    src = timm.create_model("mobilenetv2_035", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = timm_classifier("mobilenetv2_035", 4, weights=tmp_path / "w.pt", input_size=32)
    got = model.net.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(got[k], v), k
    assert model.head_name == "net.classifier" and got["classifier.weight"].shape == (4, 1280)
    assert not got["classifier.weight"].any()
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit this model"):
        timm_classifier("mobilenetv2_035", 4, weights=tmp_path / "bad.pt")


def test_mobilenet_features_from_file(tmp_path):
    from torchvision.models import mobilenet_v2 as tv

    torch.manual_seed(2)
    state = {"features." + k: v for k, v in tv().features.state_dict().items()}
    torch.save(state, tmp_path / "f.pt")
    model = classifier("mobilenet_v2", 2, weights=tmp_path / "f.pt", input_size=32)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), model.net.features.state_dict().values()))
    assert model.head_name == "net.classifier.1"


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason=f"{SHARED_WEIGHTS} is absent (no shared/ folder)")
def test_mobilenet_imagenet_features():
    """With ImageNet features, two different X-ray-like inputs give different pooled features."""
    model = mobilenet_v2(2, weights=SHARED_WEIGHTS, input_size=64)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.net.features((prepare_images(x, 64) - model.pixel_mean) / model.pixel_std)
    assert feats.shape == (2, 1280, 2, 2) and (feats[0] - feats[1]).abs().max() > 1e-2


def test_conv_targets_mobilenet():
    """MobileNetV2: 1 dense 3x3 stem + 17 depthwise 3x3 convolutions, 34 pointwise ones."""
    model = mobilenet_v2(2, weights=None, input_size=32)
    spatial, pointwise = conv_targets(model, "spatial"), conv_targets(model, "pointwise")
    assert (len(spatial), len(pointwise), len(conv_targets(model, "all"))) == (18, 34, 52)
    sub = bc.Subspace.from_model(model, bc.ConvCoLoRA(targets=spatial))
    # ConvCoLoRA on a (c, c1, 3, 3) kernel: c * c1 + 9 c parameters
    want = sum(m.weight.shape[0] * (m.weight.shape[1] + 9) for m in sub.adapter_layers().values())
    assert sub.dim == want == 71744
    with pytest.raises(ValueError, match="unknown conv kind"):
        conv_targets(model, "dense")


# ------------------------------------------------------------------------- head and merging
def test_dense_delta_is_full_update():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    sub = bc.Subspace.from_model(nn.Sequential(layer), bc.DenseDelta())
    assert sub.dim == 18
    theta = torch.randn(18)
    sub.theta = theta
    x = torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(sub(x), x @ (w + theta[:15].reshape(3, 5)).T + b + theta[15:])


def test_dense_delta_without_bias_updates_the_weight_only():
    """out * in parameters; the adapted and the merged plain layer both compute (W + dW) x."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, bias=False)
    w = layer.weight.detach().clone()
    sub = bc.Subspace.from_model(nn.Sequential(layer), bc.DenseDelta())
    assert sub.dim == 15
    theta = torch.randn(15)
    sub.theta = theta
    x = torch.randn(4, 5)
    want = x @ (w + theta.reshape(3, 5)).T
    with torch.no_grad():
        torch.testing.assert_close(sub(x), want)
        plain = bc.merged_model(sub)
        torch.testing.assert_close(plain(x), want)
    assert type(plain[0]) is nn.Linear and plain[0].bias is None
    assert not any(p.requires_grad for p in plain.parameters()) and not plain.training


def _adapted_tiny() -> tuple[bc.Subspace, nn.Module]:
    torch.manual_seed(0)
    model = tiny_cnn(3, input_size=16)
    base = copy.deepcopy(model)
    head = r"^net\.classifier$"
    sub = bc.Subspace.from_model(model, [bc.ConvCoLoRA(targets=conv_targets(model, "spatial")),
                                         bc.DenseDelta(targets=head), bc.BitFit(targets=r"norm$")])
    sub.theta = sub.theta + 0.3 * torch.randn(sub.dim, generator=torch.Generator().manual_seed(1))
    return sub, base


def test_merged_model_is_exact():
    """The merged plain network has no adapter module, the base's architecture, and the adapted
    logits (float32 rounding of W + dW only); the subspace itself is left unmerged."""
    sub, base = _adapted_tiny()
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = sub(x)
        plain = bc.merged_model(sub)
        merged = plain(x)
    assert not any(isinstance(m, bc.AdapterLayer) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in base.modules()]
    assert adapted.abs().max() > 0.1
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not any(layer.merged for layer in sub.adapter_layers().values())
    with torch.no_grad():
        assert not torch.equal(base(x), adapted)  # the adapters do change the function


def test_merge_and_reset_keeps_function():
    """merge_and_reset folds ConvCoLoRA into the kernels and restarts it at zero; the function and
    the merged plain network stay the same."""
    sub, _ = _adapted_tiny()
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = sub(x)
        sub.merge_and_reset(torch.Generator().manual_seed(3))
        torch.testing.assert_close(sub(x), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bc.merged_model(sub)(x), before, rtol=1e-5, atol=1e-5)
    depth = [m.depthwise for m in sub.adapter_layers().values() if hasattr(m, "depthwise")]
    assert depth and all(not d.any() for d in depth)


# ----------------------------------------------------------------------------------- study
def _study():
    spec = importlib.util.spec_from_file_location("conv_classification", ROOT / "studies" / "conv_classification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_quick(tmp_path):
    """--quick on the built-in set: the table, figures and a consistent results.json."""
    study = _study()
    res = study.main(["--quick", "--out", str(tmp_path), "--no-progress", "--epochs", "1",
                      "--methods", "full", "linear", "colora", "--n-samples", "4", "--laplace-probes", "2",
                      "--subset", "160", "--vi-epochs", "1"])
    for name in ("results.json", "results.md", "reliability.png", "accuracy_vs_params.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in saved["methods"]}
    assert rows["full"]["trainable"] == rows["full"]["network_params"]
    assert rows["colora"]["fraction"] == pytest.approx(rows["colora"]["trainable"] / rows["full"]["trainable"])
    assert [r["engine"] for r in saved["engines"]] == ["map", "laplace", "swag", "vi"]
    assert saved["merge"]["adapter_modules_left"] == 0 and saved["merge"]["max_abs_logit_diff"] < 1e-4
    for r in saved["methods"] + saved["engines"]:
        assert 0 <= r["ece"] <= 1 and r["nll"] > 0 and 0 <= r["auc"] <= 1
    assert set(res["targets"]) >= {"colora_within_1pt_of_full", "laplace_lower_ece_and_nll_than_map"}
    # every engine's settings come from its grid, chosen on the holdout
    eng = {r["engine"]: r for r in saved["engines"]}
    assert eng["map"]["chosen"] == {}
    assert eng["laplace"]["chosen"]["prior_precision"] in study.LAPLACE_PRIOR_GRID
    assert eng["laplace"]["chosen"]["temperature"] in study.LAPLACE_TEMPERATURES
    assert eng["laplace"]["chosen"]["predictive"] in ("linearized", "samples")
    assert eng["swag"]["chosen"]["scale"] in study.SWAG_SCALES
    assert eng["swag"]["chosen"]["lr"] in [f * study.QUICK["lr"] for f in study.SWAG_LR_FRACTIONS]
    assert eng["vi"]["chosen"]["temperature"] in study.VI_TEMPERATURES
    assert eng["vi"]["chosen"]["lr"] in [f * study.QUICK["lr"] for f in study.VI_LR_FRACTIONS]
    assert all(r["holdout_nll"] > 0 for r in saved["engines"])


def test_study_seeds(tmp_path):
    """--seeds 2: two per-seed rows per method (seeds 0 and 1, different training runs on the same
    split), means and sample standard deviations of exactly those rows, engines on seed 0 only."""
    study = _study()
    study.main(["--quick", "--out", str(tmp_path), "--no-progress", "--epochs", "1", "--seeds", "2",
                "--methods", "linear", "colora", "--n-samples", "4", "--laplace-probes", "2",
                "--subset", "160", "--vi-epochs", "1", "--swag-epochs", "1"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved["methods"]] == ["linear", "colora"]
    for row in saved["methods"]:
        runs = row["per_seed"]
        assert [r["seed"] for r in runs] == row["seeds"] == [0, 1]
        assert row["best_epoch"] == [r["best_epoch"] for r in runs]
        assert all(r["trainable"] == row["trainable"] for r in runs)
        # different seeds shuffle differently: the holdout curves differ
        assert runs[0]["holdout_nll"] != runs[1]["holdout_nll"]
        for k in study.SEED_METRICS:
            a, b = runs[0][k], runs[1][k]
            assert row[k] == pytest.approx((a + b) / 2, rel=1e-12, abs=1e-15)
            # sample standard deviation of two values: |a - b| / sqrt(2)
            assert row[k + "_std"] == pytest.approx(abs(a - b) / 2 ** 0.5, rel=1e-12, abs=1e-15)
    assert [r["engine"] for r in saved["engines"]] == ["map", "laplace", "swag", "vi"]
    assert {r["seed"] for r in saved["engines"]} == {0} and saved["merge"]["seed"] == 0
    # the MAP engine is seed 0's ConvCoLoRA
    colora0 = saved["methods"][1]["per_seed"][0]
    assert saved["engines"][0]["accuracy"] == colora0["accuracy"] and saved["engines"][0]["nll"] == pytest.approx(
        colora0["nll"], rel=1e-6)
    table = (tmp_path / "results.md").read_text()
    assert "over 2 seeds" in table and "seed 0 only" in table and " ± " in table


def test_study_engine_seeds_and_combine(tmp_path):
    """--engine-seeds 2 runs the engines on both seeds' MAPs and tables each engine's mean paired
    difference to MAP with its standard error; --combine joins a seed-0 run and a seed-1 run on the
    same split (--split-seed 0) into exactly the rows of the two-seed run, keeps a run at another
    learning rate apart, and refuses runs on different splits."""
    study = _study()
    common = ["--quick", "--no-progress", "--epochs", "1", "--n-samples", "4", "--laplace-probes", "2",
              "--subset", "96", "--vi-epochs", "1", "--swag-epochs", "1", "--methods", "colora"]
    both = study.main(common + ["--out", str(tmp_path / "both"), "--seeds", "2", "--engine-seeds", "2"])
    assert [(r["seed"], r["engine"]) for r in both["engines"]] == [
        (s, e) for s in (0, 1) for e in study.ENGINE_ORDER]
    by = {(r["seed"], r["engine"]): r for r in both["engines"]}
    for r in study.engine_summary(both["engines"]):
        d = [by[(s, r["engine"])]["nll"] - by[(s, "map")]["nll"] for s in (0, 1)]
        assert r["d_nll"] == pytest.approx(sum(d) / 2)
        assert r["d_nll_se"] == pytest.approx(abs(d[0] - d[1]) / 2 ** 0.5 / 2 ** 0.5)  # std / sqrt(2)
        assert both["targets"][f"{r['engine']}_lower_ece_and_nll_than_map"] == (r["d_nll"] < 0 and r["d_ece"] < 0)
    assert "mean over seeds ± standard error" in (tmp_path / "both" / "results.md").read_text()

    study.main(common + ["--out", str(tmp_path / "s0"), "--engine-seeds", "0"])
    study.main(common + ["--out", str(tmp_path / "s1"), "--seed", "1", "--split-seed", "0", "--engine-seeds", "0"])
    study.main(common + ["--out", str(tmp_path / "lr"), "--lr", "3e-2", "--engine-seeds", "0"])
    joined = study.main(["--combine", *(str(tmp_path / d / "results.json") for d in ("s0", "s1", "lr")),
                         "--out", str(tmp_path / "joined")])
    rows = {r["method"]: r for r in joined["methods"]}
    assert set(rows) == {"colora", "colora@lr0.03"}
    for k in study.SEED_METRICS[:4]:  # the same training runs: equal metrics (times differ)
        assert rows["colora"][k] == pytest.approx(both["methods"][0][k], rel=1e-6)
        assert rows["colora"][k + "_std"] == pytest.approx(both["methods"][0][k + "_std"], rel=1e-5, abs=1e-9)
    assert rows["colora"]["seeds"] == [0, 1] and joined["engines"] == []
    study.main(common + ["--out", str(tmp_path / "other"), "--split-seed", "5", "--engine-seeds", "0"])
    with pytest.raises(ValueError, match="split_seed"):
        study.main(["--combine", str(tmp_path / "s0" / "results.json"), str(tmp_path / "other" / "results.json"),
                    "--out", str(tmp_path / "bad")])


def test_study_subset_is_random(tmp_path):
    """A split stored sorted by class still gives both classes in a --subset, and the holdout
    and fit parts partition the subset."""
    n = 40
    np.savez(tmp_path / "sorted.npz", train_images=np.zeros((n, 4, 4), np.uint8),
             train_labels=(np.arange(n) >= n // 2).astype(np.int64)[:, None],
             val_images=np.zeros((n, 4, 4), np.uint8), val_labels=(np.arange(n) >= n // 2)[:, None].astype(np.int64))
    study = _study()
    args = study.parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "sorted.npz"), "--subset", "12",
                             "--holdout", "0.25"])
    data = study.load_data(args)
    assert [len(data[k][1]) for k in ("fit", "holdout", "val")] == [9, 3, 12]
    assert set(torch.cat([data["fit"][1], data["holdout"][1]]).tolist()) == {0, 1}
    assert set(data["val"][1].tolist()) == {0, 1}


def test_colora_bn_is_colora_plus_the_bitfit_biases():
    """The study's ``colora_bn`` subspace is ConvCoLoRA's plus every non-head bias: its dimension is
    dim(colora) + dim(bitfit) - dim(head), and a fresh one is the base network (zero deltas)."""
    study = _study()
    args = study.parse_args(["--quick", "--out", "unused"])
    dims = {}
    for method in ("linear", "bitfit", "colora", "colora_bn"):
        torch.manual_seed(0)
        model = classifier("tiny_cnn", 2, None, 32)
        base = copy.deepcopy(model)
        sub = bc.Subspace.from_model(model, study.specs(method, model, args))
        dims[method] = sub.dim
        x = torch.rand(4, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(sub(x), base(x), rtol=0, atol=0)
    assert dims["bitfit"] > dims["linear"] and dims["colora"] > dims["linear"]
    assert dims["colora_bn"] == dims["colora"] + dims["bitfit"] - dims["linear"]


_RESUME = ["--quick", "--no-progress", "--epochs", "1", "--n-samples", "4", "--laplace-probes", "2",
           "--subset", "96", "--vi-epochs", "1", "--swag-epochs", "1", "--methods", "colora",
           "--seeds", "2", "--engine-seeds", "2"]


def _count(study, monkeypatch, calls: dict[str, int], name: str, fail_at: int | None = None) -> None:
    """Wrap ``study.<name>``: count its calls in ``calls[name]``, raise on call number ``fail_at``."""
    real = getattr(study, name)

    def wrapped(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        if calls[name] == fail_at:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(study, name, wrapped)


def test_study_resumes(tmp_path, monkeypatch, capsys):
    """A run stopped in seed 1's SWAG (after both training cells, seed 0's engines, the merge check
    and seed 1's MAP and Laplace) leaves a partial results.json that --combine refuses; rerun with the same flags it
    computes only the missing cells (no training run, no merge check, each remaining tuner once,
    from the saved MAP), and ends with an uninterrupted run's results (CPU: deterministic)."""
    study = _study()
    whole = study.main(_RESUME + ["--out", str(tmp_path / "whole")])
    out = tmp_path / "resumed"
    names = ("run_method", "merge_check", "tune_laplace", "tune_swag", "tune_vi")
    calls: dict[str, int] = {}
    for name in names:
        _count(study, monkeypatch, calls, name, fail_at=2 if name == "tune_swag" else None)
    with pytest.raises(RuntimeError, match="interrupted"):
        study.main(_RESUME + ["--out", str(out)])
    partial = json.loads((out / "results.json").read_text())
    assert not partial["complete"] and partial["merge"]["seed"] == 0
    assert [(r["method"], r["seed"]) for r in partial["seed_rows"]] == [("colora", 0), ("colora", 1)]
    assert [(r["seed"], r["engine"]) for r in partial["engines"]] == [
        (0, e) for e in study.ENGINE_ORDER] + [(1, "map"), (1, "laplace")]
    assert (out / "results.md").read_text().startswith(study.PARTIAL)
    assert set(torch.load(out / "map_colora_seed1.pt")) == {"theta"}  # theta only: the network is rebuilt
    with pytest.raises(ValueError, match="partial run"):
        study.main(["--combine", str(out / "results.json"), "--out", str(tmp_path / "joined")])

    calls.clear()
    capsys.readouterr()
    resumed = study.main(_RESUME + ["--out", str(out)])
    assert calls == {"tune_swag": 1, "tune_vi": 1}  # seed 1's missing engines only
    log = capsys.readouterr().out
    assert "cell vi seed 1: NLL" in log and "cell colora seed" not in log
    assert resumed["complete"] and (out / "reliability.png").stat().st_size > 0
    assert not (out / "results.md").read_text().startswith(study.PARTIAL)
    metrics = ("accuracy", "auc", "nll", "ece")
    for a, b in zip(whole["methods"][0]["per_seed"], resumed["methods"][0]["per_seed"]):
        assert [a[k] for k in (*metrics, "holdout_nll", "seed")] == [b[k] for k in (*metrics, "holdout_nll", "seed")]
    assert len(whole["engines"]) == len(resumed["engines"]) == 8
    for a, b in zip(whole["engines"], resumed["engines"]):
        keys = (*metrics, "seed", "engine", "chosen", "holdout_nll")
        assert [a[k] for k in keys] == [b[k] for k in keys]
    assert whole["merge"]["max_abs_logit_diff"] == resumed["merge"]["max_abs_logit_diff"]
    assert whole["targets"] == resumed["targets"] and set(whole["targets"]) >= {"vi_lower_ece_and_nll_than_map"}


def test_study_refuses_other_settings(tmp_path, monkeypatch):
    """A rerun in the same --out with another setting is refused, naming it, and the folder is left
    alone; with the same settings (--no-progress may differ) a finished run trains nothing again.
    Without --engine-method (colora) in --methods no engine runs, and the run still completes."""
    study = _study()
    common = ["--quick", "--out", str(tmp_path), "--epochs", "1", "--subset", "64", "--methods", "linear"]
    first = study.main(common + ["--no-progress"])
    assert first["complete"] and first["engines"] == [] and first["merge"] is None
    saved = (tmp_path / "results.json").read_text()
    with pytest.raises(SystemExit, match=r"other settings \(epochs: 1 -> 2\); pass the same flags to resume "
                                         r"it, or another --out"):
        study.main(common + ["--no-progress", "--epochs", "2"])
    assert (tmp_path / "results.json").read_text() == saved
    calls: dict[str, int] = {}
    _count(study, monkeypatch, calls, "run_method")
    again = study.main(common)
    assert calls == {} and again["methods"] == first["methods"]


def test_saved_map_rebuilds_the_subspace(tmp_path):
    """``load_map`` rebuilds a trained subspace's function exactly under any global RNG state:
    from theta alone for colora and lora (the frozen network and the adapters are rebuilt), from
    the whole state for colora_reset, whose merges moved part of the update into the base kernels,
    where theta alone does not reach."""
    study = _study()
    args = study.parse_args(["--quick", "--out", str(tmp_path)])
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for method in ("colora", "lora", "colora_reset"):
        model = study.build(args, 2)
        sub = bc.Subspace.from_model(model, study.specs(method, model, args))
        step = torch.Generator().manual_seed(1)
        sub.theta = sub.theta + 0.1 * torch.randn(sub.dim, generator=step)
        if method == "colora_reset":
            sub.merge_and_reset(torch.Generator().manual_seed(2))
            sub.theta = sub.theta + 0.1 * torch.randn(sub.dim, generator=step)
        study.save_map(sub, method, tmp_path / f"{method}.pt")
        torch.manual_seed(123)
        loaded, base = study.load_map(method, args, 2, tmp_path / f"{method}.pt")
        with torch.no_grad():
            want = sub(x)
            assert torch.equal(loaded(x), want) and not torch.equal(base(x), want)
            if method == "colora_reset":
                loaded, _ = study.load_map("colora", args, 2, tmp_path / "colora.pt")
                loaded.theta = sub.theta
                assert (loaded(x) - want).abs().max() > 1e-3
