"""bc.plots: the figures carry the computed numbers, saves are valid PNGs and atomic."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

import bayes_colora as bc
from bayes_colora import metrics as M
from bayes_colora import plots as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def classification_data(seed: int = 0, n: int = 500, n_classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    probs = (2 * torch.randn(n, n_classes, generator=g)).softmax(1)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return probs, y


def regression_data(seed: int = 0, n: int = 2000):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=g)
    var = 0.5 + torch.rand(n, generator=g)
    y = mean + 2 * var.sqrt() * torch.randn(n, generator=g)  # too-narrow intervals
    return mean, var, y


def assert_png(path) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temporary left over


def diagonals(ax):
    return [l for l in ax.get_lines() if list(l.get_xdata()) == [0, 1] and list(l.get_ydata()) == [0, 1]]


def test_reliability_diagram_bars_are_the_bin_accuracies(tmp_path):
    probs, y = classification_data()
    path = tmp_path / "reliability.png"
    fig = P.reliability_diagram(probs, y, n_bins=10, path=path)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    bins = M.reliability_bins(probs, y, n_bins=10)
    filled = bins.counts > 0
    heights = np.array([bar.get_height() for bar in ax.patches])
    centres = np.array([bar.get_x() + bar.get_width() / 2 for bar in ax.patches])
    np.testing.assert_allclose(heights, bins.accuracy[filled].numpy(), rtol=1e-12)
    np.testing.assert_allclose(centres, (np.arange(10)[filled.numpy()] + 0.5) / 10, rtol=1e-12)
    assert len(diagonals(ax)) == 1
    assert f"ECE = {M.ece(probs, y, n_bins=10):.3f}" in ax.get_title()
    assert_png(path)


def test_several_models_share_one_axes():
    probs, y = classification_data()
    sharp = (3 * probs.log()).softmax(1)
    fig = Figure()
    ax = fig.add_subplot()
    assert P.reliability_diagram(probs, y, ax=ax, label="laplace") is fig
    P.reliability_diagram(sharp, y, ax=ax, label="map")
    assert len(diagonals(ax)) == 1 and len(ax.containers) == 2
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("laplace (ECE") for t in legend) and any(t.startswith("map (ECE") for t in legend)
    assert f"map: ECE = {M.ece(sharp, y):.3f}" in ax.get_title()
    assert f"laplace: ECE = {M.ece(probs, y):.3f}" in ax.get_title()


def test_calibration_curve_plots_observed_against_expected_coverage(tmp_path):
    mean, var, y = regression_data()
    path = tmp_path / "calibration.png"
    fig = P.calibration_curve(mean, var, y, path=path, label="vi")
    (ax,) = fig.axes
    (curve,) = [l for l in ax.get_lines() if l not in diagonals(ax)]
    np.testing.assert_allclose(curve.get_xdata(), M.DEFAULT_LEVELS)
    np.testing.assert_allclose(curve.get_ydata(), M.regression_calibration(mean, var, y).numpy())
    assert (curve.get_ydata() < np.array(M.DEFAULT_LEVELS)).all()  # too-narrow intervals under-cover
    assert len(diagonals(ax)) == 1
    assert f"vi: error {M.quantile_calibration_error(mean, var, y):.3f}" in ax.get_title()
    assert_png(path)


def band_vertices_contain(collection, xs, ys) -> bool:
    verts = collection.get_paths()[0].vertices
    return all(np.isclose(verts, [x, v], rtol=1e-6, atol=1e-6).all(1).any() for x, v in zip(xs, ys))


def test_predictive_band_draws_mean_and_both_bands(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 40
    x = torch.rand(n, generator=g) * 6 - 3  # unsorted
    epistemic = 0.01 + 0.1 * x.abs()
    pred = bc.Predictive(mean=x.sin()[:, None], aleatoric=torch.full((n, 1), 0.04),
                         epistemic=epistemic[:, None], total=(epistemic + 0.04)[:, None])
    x_train, y_train = torch.linspace(-1, 1, 5), torch.linspace(0, 2, 5)
    y = x.sin() + 0.1
    path = tmp_path / "band.png"
    fig = P.predictive_band(x, pred, y=y, x_train=x_train, y_train=y_train, label="swag", path=path)
    (ax,) = fig.axes
    xs = np.sort(x.numpy())
    order = x.argsort().numpy()
    mean = x.sin().numpy()[order]
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), xs)
    np.testing.assert_allclose(line.get_ydata(), mean)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    sd_total = (epistemic + 0.04).sqrt().numpy()[order]
    sd_epi = epistemic.sqrt().numpy()[order]
    assert band_vertices_contain(bands[0], xs, mean + 2 * sd_total)
    assert band_vertices_contain(bands[0], xs, mean - 2 * sd_total)
    assert band_vertices_contain(bands[1], xs, mean + 2 * sd_epi)
    assert not band_vertices_contain(bands[1], xs, mean + 2 * sd_total)
    assert to_rgb(bands[0].get_facecolor()[0]) == pytest.approx(to_rgb(line.get_color()))
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    np.testing.assert_allclose(points[0].get_offsets(), np.stack([xs, y.numpy()[order]], 1), rtol=1e-6)
    np.testing.assert_allclose(points[1].get_offsets(), np.stack([x_train, y_train], 1))
    assert "swag: epistemic ±2 sd" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert_png(path)


def test_predictive_band_errors():
    pred = bc.Predictive(mean=torch.zeros(5), aleatoric=torch.ones(5), epistemic=torch.zeros(5),
                         total=torch.ones(5))
    with pytest.raises(ValueError, match=r"x must have shape \(N,\) or \(N, 1\).*got \(5, 2\)"):
        P.predictive_band(torch.zeros(5, 2), pred)
    with pytest.raises(ValueError, match=r"pred.mean must have shape \(4,\).*got \(5,\)"):
        P.predictive_band(torch.zeros(4), pred)
    with pytest.raises(ValueError, match="both x_train and y_train"):
        P.predictive_band(torch.arange(5.0), pred, x_train=torch.zeros(3))


def test_save_figure_is_atomic(tmp_path):
    fig = Figure()  # a user's figure without an Agg canvas
    fig.add_subplot().plot([0, 1], [1, 0])
    P.save_figure(fig, tmp_path / "sub" / "user.png")
    assert_png(tmp_path / "sub" / "user.png")
    with pytest.raises(ValueError, match="not supported"):
        P.save_figure(fig, tmp_path / "bad.notaformat")
    assert sorted(os.listdir(tmp_path)) == ["sub"]  # the failed save left nothing behind


def test_plots_leave_pyplot_and_the_backend_alone(tmp_path):
    code = (
        "import sys, matplotlib, torch\n"
        "matplotlib.use('svg')\n"
        "import bayes_colora as bc\n"
        "g = torch.Generator().manual_seed(0)\n"
        "p = torch.rand(50, 2, generator=g).softmax(1); y = torch.randint(0, 2, (50,), generator=g)\n"
        f"bc.plots.reliability_diagram(p, y, path={str(tmp_path / 'r.png')!r})\n"
        "bc.plots.calibration_curve(torch.zeros(50), 1.0, torch.randn(50, generator=g))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert_png(tmp_path / "r.png")
