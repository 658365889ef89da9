"""The depth experiment pieces: the Fisher of the depth likelihoods, the GGN diagonal for a depth
network, the target-domain scenes, the depth figures, and the study's quick run (with resume)."""
import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import bayes_colora as bc
from bayes_colora.depth import DepthLikelihood
from bayes_colora.depth import plots as P
from bayes_colora.depth.scenes import procedural_scenes, shifted_scenes
from bayes_colora.inference.ggn import _unit_rows, ggn_diag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_fisher_diag_is_the_expected_squared_score(dist):
    """E[(d log p / d out)^2] by Monte Carlo against fisher_diag (2/v, 1/4 for the Laplace)."""
    torch.manual_seed(0)
    lik = DepthLikelihood(dist=dist, space="depth", heteroscedastic=True)
    n = 200_000
    mu, log_v = torch.tensor(3.0, dtype=torch.float64), torch.tensor(math.log(0.25), dtype=torch.float64)
    out = torch.stack([mu.expand(n), log_v.expand(n)]).T.reshape(n, 2, 1, 1).clone().requires_grad_(True)
    std = log_v.exp().sqrt()
    if dist == "gaussian":
        y = mu + std * torch.randn(n, dtype=torch.float64)
    else:
        y = mu + torch.distributions.Laplace(0.0, std / math.sqrt(2)).sample((n,)).double()
    y = y.reshape(n, 1, 1, 1)
    (score,) = torch.autograd.grad(lik.log_prob(out, y).sum(), out)
    sq = score.reshape(n, 2) ** 2
    mc, se = sq.mean(0), sq.std(0) / math.sqrt(n)
    fisher = lik.fisher_diag(out.detach()[:1], y[:1]).reshape(2)
    assert torch.all((mc - fisher).abs() < 5 * se + 1e-9), (mc, fisher, se)
    want = torch.tensor([1 / 0.25, 0.5] if dist == "gaussian" else [2 / 0.25, 0.25], dtype=torch.float64)
    assert torch.allclose(fisher, want)


def test_fisher_is_zero_at_invalid_pixels():
    lik = DepthLikelihood(sigma=0.5)
    out = torch.ones(1, 1, 2, 2)
    y = torch.tensor([[[[1.0, 0.0], [float("nan"), 2.0]]]])
    assert torch.equal(lik.fisher_diag(out, y), torch.tensor([[[[4.0, 0.0], [0.0, 4.0]]]]))


def _tiny_depth_subspace():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, padding=1))
    return bc.Subspace.from_model(net, bc.LoRA(rank=1))


def test_ggn_diagonal_of_a_depth_likelihood_matches_the_jacobian():
    """diag(J^T Lambda J) with the Fisher Lambda, against an explicit Jacobian."""
    sub = _tiny_depth_subspace()
    x = torch.randn(2, 3, 5, 5)
    y = torch.rand(2, 1, 5, 5) + 0.5
    y[0, 0, 0, :3] = 0.0  # invalid pixels
    lik = DepthLikelihood(dist="laplace", heteroscedastic=True)
    theta = sub.theta + 0.1 * torch.randn(sub.dim)
    diag, _ = ggn_diag(sub, [(x, y)], lik, theta, chunk_size=7)
    jac = torch.autograd.functional.jacobian(lambda t: sub(x, theta=t), theta).reshape(-1, sub.dim)
    lam = lik.fisher_diag(sub(x, theta=theta).detach(), y).reshape(-1)
    want = (jac ** 2 * lam[:, None]).sum(0)
    assert torch.allclose(diag, want, rtol=1e-4, atol=1e-6)
    probes, _ = ggn_diag(sub, [(x, y)] * 50, lik, theta, chunk_size=64, probes=64,
                         generator=torch.Generator().manual_seed(0))
    assert torch.allclose(probes / 50, want, rtol=0.25, atol=1e-3 * float(want.max()))


def test_unit_rows_are_rows_of_the_identity():
    rows = _unit_rows(slice(3, 7), 10, torch.zeros(1, dtype=torch.float64))
    assert torch.equal(rows, torch.eye(10, dtype=torch.float64)[3:7])


def test_shifted_scenes_scale_depth_and_recolour():
    base = procedural_scenes(2, 16, 20, seed=5).tensors
    img, depth = shifted_scenes(2, 16, 20, seed=5, depth_scale=2.0, gamma=0.5, tint=(1.0, 0.5, 0.25)).tensors
    assert torch.allclose(depth, 2.0 * base[1])
    tint = torch.tensor([1.0, 0.5, 0.25]).view(1, 3, 1, 1)
    assert torch.allclose(img, (tint * base[0].clamp_min(0) ** 0.5).clamp(0, 1))
    with pytest.raises(ValueError, match="positive"):
        shifted_scenes(1, depth_scale=0.0)


def test_sparsification_curves_of_the_true_error_are_the_oracle():
    torch.manual_seed(0)
    gt = torch.rand(3, 1, 8, 8) + 1.0
    mean = gt + 0.3 * torch.randn_like(gt)
    model, oracle = P.sparsification_curves(mean, (mean - gt).abs(), gt, "rmse")
    assert torch.allclose(model, oracle)
    model, oracle = P.sparsification_curves(mean, torch.rand_like(gt), gt, "abs_rel")
    assert model.shape == oracle.shape == (50,)
    assert torch.all(oracle <= model + 1e-12)
    assert float(oracle[0]) == pytest.approx(float(((mean - gt).abs() / gt).mean((1, 2, 3)).mean()), rel=1e-6)


def test_depth_coverage_of_exact_intervals():
    """Standard normal errors with std 1: the observed coverage of every level is that level."""
    torch.manual_seed(0)
    gt = torch.full((4, 1, 100, 100), 5.0)
    mean = gt + torch.randn_like(gt)
    cov = P.depth_coverage(mean, torch.ones_like(gt), gt, levels=(0.5, 0.9))
    assert torch.allclose(cov.double(), torch.tensor([0.5, 0.9], dtype=torch.float64), atol=0.01)


def test_depth_figures_have_their_panels(tmp_path):
    images = torch.rand(2, 3, 8, 10)
    gt = torch.rand(2, 1, 8, 10) + 1
    fig = P.uncertainty_panel(images, gt, gt + 0.1, torch.ones_like(gt), titles=["a", "b"],
                              path=tmp_path / "panel.png")
    assert (tmp_path / "panel.png").stat().st_size > 0
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == list(P.PANEL_COLUMNS)
    curve = [1.0] * 50
    fig = P.sparsification_plot({"map": (curve, curve), "vi": (curve, curve)})
    assert len(fig.axes[0].get_lines()) == 4
    fig = P.comparison_plot([{"adapter": "lora", "engine": "map", "nll": 1.0},
                             {"adapter": "lora", "engine": "vi", "nll": 0.5}], "nll")
    heights = sorted(p.get_height() for p in fig.axes[0].patches)
    assert heights == [0.5, 1.0]
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        P.uncertainty_panel(torch.rand(2, 8, 10), gt, gt, gt)
    with pytest.raises(ValueError, match="50 points"):
        P.sparsification_plot({"map": ([1.0], [1.0])})


def test_depth_study_quick_runs_and_resumes(tmp_path):
    """The quick study on built-in scenes: every cell has finite metrics, the figures exist, and
    a second run with the same --out finds every cell done (and changes nothing)."""
    out = tmp_path / "depth"
    cmd = [sys.executable, os.path.join(ROOT, "studies", "depth_uncertainty.py"), "--quick",
           "--out", str(out), "--no-progress", "--models", "mobilenet", "--adapters", "convcolora",
           "--size", "28", "42", "--source", "8", "--pretrain-epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["engine"] for r in rows] == ["map", "laplace", "swag", "swag-mean", "vi", "vi-mean"]
    for r in rows:
        for key in ("abs_rel", "rmse", "nll", "ause_rmse", "aurg_rmse", "calibration_error"):
            assert math.isfinite(r[key]), (r["engine"], key)
    assert rows[0]["d"] > 0 and all(r["d"] == rows[0]["d"] for r in rows)
    source = results["log"]["source_mobilenet"]  # the pre-trained model's fingerprint, in every row
    assert len(source) == 16 and all(r["source"] == source for r in rows)
    n_test = 8  # the quick grid's test images
    for r in rows:
        assert {k: len(v) for k, v in r["per_image"].items()} == dict.fromkeys(
            ("n_valid", "nll", "ause_rmse", "ause_abs_rel"), n_test)
    text = (out / "results.md").read_text()
    table, spread = text.split("## Paired differences to MAP")[1].split("## What the spread adds")
    assert all(f"| {e} | {n_test} | " in table for e in ("laplace", "swag", "swag-mean", "vi", "vi-mean"))
    assert all(f"| {e} | {n_test} | " in spread for e in ("swag", "vi")) and "laplace" not in spread
    # MAP's epistemic part is zero, a sampled posterior's is not: their NLLs differ
    assert rows[0]["nll"] != rows[2]["nll"]
    # SWAG's mean as a point is a sharper predictive than SWAG's samples around it
    by = {r["engine"]: r for r in rows}
    assert by["swag-mean"]["nll"] != by["swag"]["nll"] and by["swag-mean"]["map"] == by["swag"]["map"]
    for name in ("results.md", "sparsification-mobilenet-convcolora.png",
                 "calibration-mobilenet-convcolora.png", "compare-mobilenet-nll.png",
                 "panel-mobilenet-convcolora-vi.png"):
        assert (out / name).stat().st_size > 0, name
    assert results["timing"]["mobilenet/convcolora"]["ratio"] > 0
    before = (out / "results.json").read_text()
    done = subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    assert "d = " not in done.stdout  # no cell was fitted again
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(before)["rows"]
    # a lost cell is refitted from the saved MAP (not a re-trained one): the same numbers again
    saved = json.loads(before)
    saved["rows"] = [r for r in saved["rows"] if r["engine"] not in ("swag", "swag-mean")]
    for r in saved["rows"]:  # as written before rows kept their per-image values
        del r["per_image"]
    (out / "results.json").write_text(json.dumps(saved))
    again = subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.stdout.count("d = ") == 1 and "/ swag]" in again.stdout
    redone = {r["engine"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert redone["swag"]["source"] == source  # the cached pre-trained model, loaded again
    old = {r["engine"]: r for r in json.loads(before)["rows"]}
    assert redone["swag"]["nll"] == pytest.approx(old["swag"]["nll"], rel=1e-5)
    table = (out / "results.md").read_text().split("## Paired differences to MAP")[1]
    assert all(f"| {e} | - | - | - | - | - |" in table for e in ("laplace", "vi", "vi-mean"))


def _depth_study():
    spec = importlib.util.spec_from_file_location("depth_uncertainty", os.path.join(ROOT, "studies", "depth_uncertainty.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fingerprint_tells_bit_identical_models_apart():
    study = _depth_study()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    twin = copy.deepcopy(model)
    assert study.fingerprint(model) == study.fingerprint(twin)
    with torch.no_grad():  # one weight moved by one float32 ulp
        w = twin[0].weight
        w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(1e9))
    assert study.fingerprint(model) != study.fingerprint(twin)


def test_deterministic_kernels_restores_the_settings():
    study = _depth_study()
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    with study.deterministic_kernels(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic) == before


def test_depth_study_targets_choose_the_adapted_modules(tmp_path):
    """--targets restricts the adapters (the row's d is that of the same subspace built here), and
    a results folder is not mixed: another --targets on the same --out is refused."""
    out = tmp_path / "head"
    cmd = [sys.executable, os.path.join(ROOT, "studies", "depth_uncertainty.py"), "--quick",
           "--out", str(out), "--no-progress", "--models", "mobilenet", "--adapters", "convcolora",
           "--engines", "map", "--size", "28", "42", "--source", "8", "--pretrain-epochs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    head = r"^decoder\.head$"
    subprocess.run(cmd + ["--targets", head], check=True, cwd=ROOT, env=env, capture_output=True)
    row = json.loads((out / "results.json").read_text())["rows"][0]
    model = bc.depth.mobilenet_depth(aleatoric=True)
    want = bc.Subspace.from_model(model, bc.ConvCoLoRA(targets=head)).dim
    whole = bc.Subspace.from_model(bc.depth.mobilenet_depth(aleatoric=True),
                                   bc.ConvCoLoRA(targets=bc.depth.DECODER_TARGETS)).dim
    assert row["d"] == want < whole
    refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "use another --out for each --targets" in refused.stderr


def test_depth_study_shares_the_source_model_through_a_file(tmp_path):
    """--source-model: the first run pre-trains and writes the file, a run with a fresh --out loads
    it (no pre-training) and records the same fingerprint; a file of another architecture is
    refused with the fix, and so is resuming a results folder with another source model."""
    shared = tmp_path / "source"
    cmd = [sys.executable, os.path.join(ROOT, "studies", "depth_uncertainty.py"), "--quick",
           "--no-progress", "--models", "mobilenet", "--adapters", "bitfit", "--engines", "map",
           "--size", "28", "42", "--source", "8", "--pretrain-epochs", "1", "--source-model", str(shared)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    first = subprocess.run(cmd + ["--out", str(tmp_path / "a")], check=True, cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert "pre-training the source model" in first.stdout
    assert (shared / "pretrained-mobilenet.pt").is_file() and not (tmp_path / "a" / "pretrained-mobilenet.pt").exists()
    second = subprocess.run(cmd + ["--out", str(tmp_path / "b")], check=True, cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert "pre-training" not in second.stdout and "loaded from" in second.stdout
    a, b = (json.loads((tmp_path / o / "results.json").read_text()) for o in ("a", "b"))
    assert "pretrain_mobilenet" in a["log"] and "pretrain_mobilenet" not in b["log"]
    assert a["rows"][0]["source"] == b["rows"][0]["source"] == b["log"]["source_mobilenet"]
    assert b["config"]["source_model"] == str(shared)
    # the same source model and seed: the same MAP fit, so the same test NLL
    assert b["rows"][0]["nll"] == pytest.approx(a["rows"][0]["nll"], rel=1e-5)

    # a file saved for another architecture (MobileNet's state dict where Depth Anything's belongs)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "pretrained-depth_anything.pt").write_bytes((shared / "pretrained-mobilenet.pt").read_bytes())
    bad = cmd[:cmd.index("--models") + 1] + ["depth_anything"] + cmd[cmd.index("--models") + 2:-1]
    refused = subprocess.run(bad + [str(wrong), "--out", str(tmp_path / "c")], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    message = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode != 0 and str(wrong / "pretrained-depth_anything.pt") in message
    assert "Depth Anything 'tiny'" in message and "missing keys" in message and "--source-model" in message

    # resuming b with another source model (one weight moved) would mix rows of two source models
    state = torch.load(shared / "pretrained-mobilenet.pt")
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] += 1.0
    other = tmp_path / "other"
    other.mkdir()
    torch.save(state, other / "pretrained-mobilenet.pt")
    mixed = subprocess.run(cmd[:-1] + [str(other), "--out", str(tmp_path / "b"), "--engines", "map", "laplace"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    assert mixed.returncode != 0 and "use another --out for each source model" in mixed.stderr
    assert json.loads((tmp_path / "b" / "results.json").read_text())["rows"] == b["rows"]


def test_a_source_model_written_meanwhile_is_shared(tmp_path, monkeypatch):
    """If another process writes the source file while this one pre-trains, this one uses that
    file's model (so processes started together share the first finished model)."""
    study = _depth_study()
    args = study.parse_args(["--quick", "--out", str(tmp_path / "out"), "--source-model", str(tmp_path),
                             "--device", "cpu", "--no-progress"])
    cfg = study.config(args)
    torch.manual_seed(1)
    theirs = bc.depth.mobilenet_depth(aleatoric=True)
    path = tmp_path / "pretrained-mobilenet.pt"

    def other_process_finishes_first(model, *a, **k):
        torch.save(theirs.state_dict(), path)
        return [0.0]

    monkeypatch.setattr(study.E, "pretrain_depth", other_process_finishes_first)
    log = {}
    model = study.pretrained_model("mobilenet", args, cfg, DepthLikelihood(heteroscedastic=True), log)
    assert study.fingerprint(model) == study.fingerprint(theirs) == log["source_mobilenet"]
    assert log["pretrain_mobilenet"]["kept"] is False


@pytest.mark.parametrize("samples", [dict(n_samples=4000), dict(scale_samples=4000, n_samples=2)],
                         ids=["n_samples", "scale_samples"])
def test_covariance_scale_search_has_the_known_answer(samples):
    r"""tune_covariance_scale on a model linear in its one parameter, against the analytic NLLs.
    The search draws ``scale_samples`` samples, by default the test predictive's ``n_samples``
    (parametrised: either way 4000; 2 or the Laplace search's ``tune_samples = 8`` would break the
    tolerance below).

    The network outputs the constant depth map ``mu + theta`` (a zero 1x1 convolution with bias
    ``mu``, BitFit on that bias: ``theta`` is a scalar), the likelihood is ``N(y; mu + theta,
    s^2)`` in depth space, every pixel of the validation images has true depth ``y0 = mu + r``,
    and the posterior is ``N(0, 1)`` (mean at ``theta_MAP = 0``). Scaled by ``c``, the ``S``
    sampled outputs are ``mu + sqrt(c) e_s`` with ``e_s ~ N(0, 1)``, the same at every pixel, so
    the moment-matched predictive is ``N(mu + sqrt(c) e_bar, s^2 + c V)`` with ``e_bar`` and ``V``
    the sample mean and (population) variance of the ``e_s``, and the NLL per valid pixel
    (depth_nll's pooled mean over identical pixels) is that of one pixel:

        NLL(m, v) = 0.5 log(2 pi v) + (r - m)^2 / (2 v),  m = sqrt(c) e_bar,  v = s^2 + c V.

    As ``S -> inf``: ``m = 0``, ``v = s^2 + c``, the analytic NLL, whose argmin over
    (0.01, 1, 10, 100) is ``c = 10`` (about 444, 5.42, 2.52, 3.27 nats).

    Monte Carlo error with ``S`` samples: ``e_bar`` has sd ``1 / sqrt(S)``, so ``|m| <= dm =
    4 sqrt(c / S)`` at 4 sigma; ``V`` has mean ``(S - 1) / S`` and relative sd ``sqrt(2 / S)``, so
    ``|v - (s^2 + c)| <= dv = c (4 sqrt(2 / S) + 1 / S)`` (4 sigma plus the bias). By the mean
    value theorem over that box, ``|NLL(m, v) - NLL(0, s^2 + c)| <= sup|dNLL/dm| dm +
    sup|dNLL/dv| dv`` with ``dNLL/dm = -(r - m) / v`` and ``dNLL/dv = 1 / (2 v) - (r - m)^2 /
    (2 v^2)``, a difference of two positive terms, bounded on the box (``v >= v_lo = s^2 + c - dv``,
    ``|r - m| <= r + dm``) by ``(r + dm) / v_lo`` and ``max(1 / (2 v_lo), (r + dm)^2 / (2 v_lo^2))``.
    The bounds shrink as ``1 / sqrt(S)``: ``S = 4000`` keeps them well inside the gaps between the
    scales' NLLs (at ``S = 400`` the bound at ``c = 1`` is 70 % of its NLL) and still takes < 1 s.
    """
    from torch.utils.data import TensorDataset

    from bayes_colora.depth.experiment import EngineSettings, tune_covariance_scale

    mu, r, s, n_samples = 2.0, 3.0, 0.01, 4000
    scales = (0.01, 1.0, 10.0, 100.0)
    net = nn.Sequential(nn.Conv2d(3, 1, 1))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(mu)
    sub = bc.Subspace.from_model(net, bc.BitFit())
    assert sub.dim == 1
    gen = torch.Generator().manual_seed(0)
    val = TensorDataset(torch.rand(3, 3, 4, 5, generator=gen), torch.full((3, 1, 4, 5), mu + r))
    lik = DepthLikelihood(sigma=s, space="depth")
    post = bc.DiagGaussianPosterior(torch.zeros(1), torch.ones(1), likelihood=lik)
    settings = EngineSettings(covariance_scales=scales, **samples)
    tuned = tune_covariance_scale(sub, post, val, lik, settings, seed=0)

    def nll(m: float, v: float) -> float:
        return 0.5 * math.log(2 * math.pi * v) + (r - m) ** 2 / (2 * v)

    record = tuned.history[-1]
    by_scale = record["val_nll_by_scale"]
    assert list(by_scale) == list(scales)
    for c, got in by_scale.items():
        dm, dv = 4 * math.sqrt(c / n_samples), c * (4 * math.sqrt(2 / n_samples) + 1 / n_samples)
        v_lo = s ** 2 + c - dv
        tol = (r + dm) / v_lo * dm + max(1 / (2 * v_lo), (r + dm) ** 2 / (2 * v_lo ** 2)) * dv
        assert abs(got - nll(0.0, s ** 2 + c)) <= tol, (c, got, nll(0.0, s ** 2 + c), tol)
    assert min(scales, key=lambda c: nll(0.0, s ** 2 + c)) == 10.0
    assert record["covariance_scale"] == 10.0
    assert record["val_nll"] == by_scale[10.0]
    assert torch.allclose(tuned.variance, 10.0 * post.variance)


def test_depth_study_combines_engines_fitted_from_one_map(tmp_path):
    """The parallel recipe of the study's notes: fit the MAP once, copy the folder per engine, fit
    each engine in its copy, join with --combine. The joined rows keep one MAP row, every row
    records that MAP's fingerprint, and the paired table compares both engines with it; folders
    whose rows come from another MAP, and an --out that is one of the folders, are refused."""
    import shutil

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    script = os.path.join(ROOT, "studies", "depth_uncertainty.py")
    cmd = [sys.executable, script, "--quick", "--no-progress", "--models", "mobilenet", "--adapters",
           "bitfit", "--size", "28", "42", "--source", "8", "--pretrain-epochs", "1"]
    subprocess.run(cmd + ["--engines", "map", "--out", str(tmp_path / "map")], check=True, cwd=ROOT,
                   env=env, capture_output=True)
    for engine in ("swag", "vi"):
        shutil.copytree(tmp_path / "map", tmp_path / engine)
        done = subprocess.run(cmd + ["--engines", "map", engine, "--out", str(tmp_path / engine)], check=True,
                              cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.stdout.count("d = ") == 1  # only the engine: the MAP came with the copy
    joined = [str(tmp_path / e) for e in ("swag", "vi")]
    subprocess.run([sys.executable, script, "--combine", *joined, "--out", str(tmp_path / "all")],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    results = json.loads((tmp_path / "all" / "results.json").read_text())
    assert [r["engine"] for r in results["rows"]] == ["map", "swag", "swag-mean", "vi", "vi-mean"]
    theta = torch.load(tmp_path / "map" / "theta_map-mobilenet-bitfit.pt")
    assert {r["map"] for r in results["rows"]} == {_depth_study().fingerprint(theta)}
    table = (tmp_path / "all" / "results.md").read_text().split("## Paired differences to MAP")[1]
    assert all(f"| {e} | 8 | " in table for e in ("swag", "vi"))
    assert (tmp_path / "all" / "compare-mobilenet-nll.png").stat().st_size > 0

    # a folder whose VI started from another MAP (its rows say so) cannot be paired with this MAP
    vi = json.loads((tmp_path / "vi" / "results.json").read_text())
    for r in vi["rows"]:
        r["map"] = "0" * 16
    (tmp_path / "vi" / "results.json").write_text(json.dumps(vi))
    refused = subprocess.run([sys.executable, script, "--combine", *joined, "--out", str(tmp_path / "all2")],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "cell mobilenet/bitfit/map is in" in refused.stderr  # the copied MAP rows now differ
    del vi["rows"][0]  # without the MAP row, the VI row still names another MAP
    (tmp_path / "vi" / "results.json").write_text(json.dumps(vi))
    refused = subprocess.run([sys.executable, script, "--combine", *joined, "--out", str(tmp_path / "all2")],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "come from different MAPs" in refused.stderr
    overwrite = subprocess.run([sys.executable, script, "--combine", *joined, "--out", joined[0]],
                               cwd=ROOT, env=env, capture_output=True, text=True)
    assert overwrite.returncode != 0 and "would overwrite" in overwrite.stderr


def test_depth_study_tally_counts_the_cells_that_meet_the_target(tmp_path):
    """--tally over two folders: VI meets the target in each (lower NLL and AUSE-RMSE in every one
    of 40 frames, so also beyond 2 block SE), SWAG in neither; the totals add the folders."""
    frames = 40
    base = {"n_valid": [10] * frames, "nll": [1.0] * frames, "ause_rmse": [0.5] * frames,
            "ause_abs_rel": [0.2] * frames}
    rows = [{"model": "m", "adapter": "a", "engine": "map", "per_image": base},
            {"model": "m", "adapter": "a", "engine": "vi",
             "per_image": {**base, "nll": [0.9 - 0.01 * (i % 3) for i in range(frames)],
                           "ause_rmse": [0.4 + 0.01 * (i % 2) for i in range(frames)]}},
            {"model": "m", "adapter": "a", "engine": "swag",
             "per_image": {**base, "nll": [0.8] * frames, "ause_rmse": [0.6] * frames}}]
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"rows": rows}))
    study = _depth_study()
    study.run(["--tally", str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(tmp_path / "t")])
    lines = (tmp_path / "t" / "tally.md").read_text().splitlines()
    assert f"| {tmp_path / 'x'} | vi | 1 | 1 | 1 | a |" in lines
    assert f"| {tmp_path / 'y'} | swag | 1 | 0 | 0 | - |" in lines
    assert "| all | vi | 2 | 2 | 2 | |" in lines and "| all | all | 4 | 2 | 2 | |" in lines
    assert (tmp_path / "t" / "target-scatter.png").stat().st_size > 0
