r"""Matplotlib figures of predictive quality: reliability diagram, calibration curve, 1-D band.

Figures are built as ``matplotlib.figure.Figure`` objects with an Agg canvas, never through
``pyplot``, so a user's interactive backend is left alone and nothing opens a window. Every
function draws into ``ax`` when given (to put several models on one axes, each with its
``label``), returns the Figure, and with ``path=`` saves it atomically (a temporary file beside
``path``, then a rename; :func:`save_figure` does the same for any figure); the format follows
the file extension.
"""
from __future__ import annotations

import os

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import metrics
from .predictive import Predictive
from .subspace import _atomic_write

_DIAGONAL = "bayes_colora.diagonal"  # gid of the y = x reference line, drawn once per axes


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """``ax`` and its figure, or a new one-axes Figure on an Agg canvas."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Save ``fig`` to ``path`` atomically: into a temporary file beside it, then renamed.

    The format follows the extension (PNG without one); a failed save leaves no file behind.
    """
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _diagonal(ax: Axes) -> None:
    """The ``y = x`` line of perfect calibration on ``[0, 1]``, once per axes."""
    if not any(line.get_gid() == _DIAGONAL for line in ax.get_lines()):
        ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration",
                gid=_DIAGONAL)


def _append_title(ax: Axes, entry: str) -> None:
    """Add ``entry`` to the title, so models drawn on one axes each keep their number."""
    title = ax.get_title()
    ax.set_title(f"{title}; {entry}" if title else entry)


def _numpy(t: torch.Tensor):
    return torch.as_tensor(t).detach().cpu().double().numpy()


def reliability_diagram(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15,
                        ax: Axes | None = None, label: str | None = None,
                        path: str | os.PathLike | None = None) -> Figure:
    r"""Accuracy per top-label confidence bin as bars, against the diagonal ``accuracy = confidence``.

    One bar per non-empty bin of :func:`~bayes_colora.metrics.reliability_bins`, centred on
    the bin with the bin's width and height ``accuracy_b``; bars below the diagonal mean
    over-confidence. The ECE (:func:`~bayes_colora.metrics.ece`) goes into the title (and the
    legend entry when ``label`` is given). ``probs`` ``(B, C, ...)``, ``y`` ``(B, ...)``.
    """
    bins = metrics.reliability_bins(probs, y, n_bins)
    error = metrics.ece(probs, y, n_bins)
    fig, ax = _axes(ax, (4.5, 4.5))
    edges, filled = _numpy(bins.edges), _numpy(bins.counts) > 0
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    ax.bar(centres[filled], _numpy(bins.accuracy)[filled], width=width, alpha=0.6,
           edgecolor="black", linewidth=0.5,
           label="accuracy" if label is None else f"{label} (ECE {error:.3f})")
    _diagonal(ax)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    _append_title(ax, f"ECE = {error:.3f}" if label is None else f"{label}: ECE = {error:.3f}")
    ax.legend(loc="upper left")
    return _finish(fig, path)


def calibration_curve(mean: torch.Tensor, var: torch.Tensor | float, y: torch.Tensor,
                      levels: tuple[float, ...] = metrics.DEFAULT_LEVELS,
                      mask: torch.Tensor | None = None, ax: Axes | None = None,
                      label: str | None = None, path: str | os.PathLike | None = None) -> Figure:
    r"""Observed against expected coverage of central Gaussian prediction intervals.

    One point per level ``p`` at ``(p, coverage(p))`` from
    :func:`~bayes_colora.metrics.regression_calibration`, joined by a line, with the diagonal;
    above it the intervals are too wide (under-confident), below too narrow. The calibration
    error (:func:`~bayes_colora.metrics.quantile_calibration_error`) goes into the title.
    """
    observed = metrics.regression_calibration(mean, var, y, levels=levels, mask=mask)
    error = metrics.quantile_calibration_error(mean, var, y, levels=levels, mask=mask)
    fig, ax = _axes(ax, (4.5, 4.5))
    ax.plot(_numpy(levels).reshape(-1), _numpy(observed), marker="o", ms=3,
            label="observed" if label is None else f"{label} (error {error:.3f})")
    _diagonal(ax)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="expected coverage", ylabel="observed coverage")
    _append_title(ax, f"calibration error = {error:.3f}" if label is None
                  else f"{label}: error {error:.3f}")
    ax.legend(loc="upper left")
    return _finish(fig, path)


def _one_d(t: torch.Tensor, name: str, n: int | None = None) -> torch.Tensor:
    """``t`` as a 1-D tensor (a trailing axis of size 1 is dropped), of length ``n`` if given."""
    t = torch.as_tensor(t).detach()
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = "(N,) or (N, 1)" if n is None else f"({n},) or ({n}, 1), like x"
        raise ValueError(f"{name} must have shape {want} for a 1-D band plot, got {tuple(t.shape)}")
    return t


def predictive_band(x: torch.Tensor, pred: Predictive, y: torch.Tensor | None = None,
                    x_train: torch.Tensor | None = None, y_train: torch.Tensor | None = None,
                    n_std: float = 2.0, ax: Axes | None = None, label: str | None = None,
                    path: str | os.PathLike | None = None) -> Figure:
    r"""1-D regression: predictive mean with ``mean +- n_std * sqrt(total)`` and
    ``mean +- n_std * sqrt(epistemic)`` bands.

    ``x`` ``(N,)`` inputs (unsorted is fine), ``pred`` the predictive at ``x`` (moments of shape
    ``(N,)`` or ``(N, 1)``); ``y`` optional targets at ``x`` (dots); ``x_train``, ``y_train``
    optional training points (crosses). Line and bands of one call share a colour.
    """
    x = _one_d(x, "x")
    n = x.shape[0]
    mean, total, epistemic = (_one_d(getattr(pred, k), f"pred.{k}", n)
                              for k in ("mean", "total", "epistemic"))
    order = x.argsort()
    xs, mean = _numpy(x[order]), _numpy(mean[order])
    sd_total, sd_epi = _numpy(total[order].sqrt()), _numpy(epistemic[order].sqrt())
    fig, ax = _axes(ax, (6.0, 4.0))
    prefix = "" if label is None else f"{label}: "
    (line,) = ax.plot(xs, mean, lw=1.5, label=f"{prefix}predictive mean")
    colour = line.get_color()
    ax.fill_between(xs, mean - n_std * sd_total, mean + n_std * sd_total, color=colour, alpha=0.15,
                    lw=0, label=f"{prefix}total ±{n_std:g} sd")
    ax.fill_between(xs, mean - n_std * sd_epi, mean + n_std * sd_epi, color=colour, alpha=0.35,
                    lw=0, label=f"{prefix}epistemic ±{n_std:g} sd")
    if y is not None:
        ax.scatter(xs, _numpy(_one_d(y, "y", n)[order]), s=6, color=colour, alpha=0.6,
                   label=f"{prefix}targets")
    if x_train is not None or y_train is not None:
        if x_train is None or y_train is None:
            raise ValueError("give both x_train and y_train, or neither")
        x_train = _one_d(x_train, "x_train")
        ax.scatter(_numpy(x_train), _numpy(_one_d(y_train, "y_train", x_train.shape[0])),
                   marker="x", s=18, color="black", label="training data")
    ax.set(xlabel="x", ylabel="y")
    ax.legend(fontsize="small")
    return _finish(fig, path)
