r"""Figures of depth predictions and their uncertainty (matplotlib, Agg canvas, no pyplot).

* :func:`uncertainty_panel`: one row per image, RGB | ground truth | prediction | absolute
  error | predictive standard deviation (invalid ground-truth pixels shown blank);
* :func:`sparsification_plot`: sparsification curves (mean over images, from
  :func:`sparsification_curves`) with their oracles, several models on one axes;
* :func:`depth_calibration_plot`: observed against expected coverage of the per-pixel
  Gaussian intervals (from :func:`depth_coverage`, pooled over the valid pixels);
* :func:`comparison_plot`: grouped bars of one metric per adapter and engine;
* :func:`paired_scatter`: each engine's paired difference to its MAP, NLL against AUSE-RMSE, one
  point per cell with its 2-block-SE bars (the lower-left quadrant is "lower NLL and AUSE").

Curves are computed and plotted in two steps so that a long study can keep the few numbers of
every cell (and resume) instead of every pixel. As in :mod:`bayes_colora.plots`, each function returns the Figure, draws into ``ax`` when given,
and saves atomically with ``path=``.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .. import metrics as M
from ..metrics import DEFAULT_FRACTIONS, sparsification_curve
from ..plots import _axes, _diagonal, _finish, _numpy
from .metrics import valid_depth_mask

PANEL_COLUMNS = ("RGB", "ground truth", "prediction", "|error|", "uncertainty (std)")


def _maps(t: torch.Tensor, name: str, n: int | None = None) -> torch.Tensor:
    """``(N, H, W)`` from ``(N, H, W)`` or ``(N, 1, H, W)``."""
    t = torch.as_tensor(t).detach().cpu()
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 3 or (n is not None and t.shape[0] != n):
        raise ValueError(f"{name} must be depth maps (N, H, W) or (N, 1, H, W)"
                         f"{f' with N = {n}' if n is not None else ''}, got {tuple(t.shape)}")
    return t


def uncertainty_panel(images: torch.Tensor, gt_depth: torch.Tensor, mean: torch.Tensor,
                      std: torch.Tensor, min_depth: float = 1e-3, titles: Sequence[str] | None = None,
                      path: str | os.PathLike | None = None) -> Figure:
    """RGB | ground truth | prediction | |error| | std, one row per image.

    Args:
        images: RGB in ``[0, 1]``, ``(N, 3, H, W)`` (not normalised).
        gt_depth, mean, std: depth maps ``(N, 1, H, W)`` or ``(N, H, W)``, metres.
        min_depth: ground truth at or below it is invalid (blank in the GT and error maps).
        titles: one row label per image.
    """
    images = torch.as_tensor(images).detach().cpu()
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be RGB (N, 3, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    gt, mean, std = _maps(gt_depth, "gt_depth", n), _maps(mean, "mean", n), _maps(std, "std", n)
    valid = valid_depth_mask(gt, None, min_depth)
    nan = torch.full_like(gt, float("nan"))
    error = torch.where(valid, (mean - gt).abs(), nan)
    fig = Figure(figsize=(2.6 * len(PANEL_COLUMNS), 2.2 * n), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, len(PANEL_COLUMNS), squeeze=False)
    vmax = float(gt[valid].max()) if valid.any() else float(mean.max())
    for i in range(n):
        shown = [(images[i].permute(1, 2, 0).clamp(0, 1), {}),
                 (torch.where(valid[i], gt[i], nan[i]), {"cmap": "magma_r", "vmin": 0, "vmax": vmax}),
                 (mean[i], {"cmap": "magma_r", "vmin": 0, "vmax": vmax}),
                 (error[i], {"cmap": "inferno"}),
                 (std[i], {"cmap": "inferno"})]
        for j, (img, kw) in enumerate(shown):
            ax = axes[i, j]
            im = ax.imshow(_numpy(img), **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= 1:
                fig.colorbar(im, ax=ax, shrink=0.8)
            if i == 0:
                ax.set_title(PANEL_COLUMNS[j])
        if titles is not None:
            axes[i, 0].set_ylabel(titles[i])
    return _finish(fig, path)


def sparsification_curves(mean: torch.Tensor, std: torch.Tensor, gt_depth: torch.Tensor,
                          metric: str = "rmse", min_depth: float = 1e-3
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over images of the sparsification curve of ``std`` and of its oracle (removal by
    the true error), each ``(F,)`` at :data:`~bayes_colora.metrics.DEFAULT_FRACTIONS`.

    ``metric``: ``"rmse"`` (``|d - d*|``, root mean square) or ``"abs_rel"``
    (``|d - d*| / d*``, mean); the per-image curves are those of
    :func:`~bayes_colora.metrics.ause`.
    """
    if metric not in ("rmse", "abs_rel"):
        raise ValueError(f"metric must be 'rmse' or 'abs_rel', got {metric!r}")
    gt, mean, std = _maps(gt_depth, "gt_depth"), _maps(mean, "mean"), _maps(std, "std")
    valid = valid_depth_mask(gt, None, min_depth)
    safe = torch.where(valid, gt, torch.ones_like(gt))
    error = (mean.clamp_min(min_depth) - safe).abs()
    reduce = "rms"
    if metric == "abs_rel":
        error, reduce = error / safe, "mean"
    model = sparsification_curve(error, std, valid, reduce=reduce).mean(0)
    oracle = sparsification_curve(error, error, valid, reduce=reduce).mean(0)
    return model, oracle


def sparsification_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                        metric: str = "rmse", ax: Axes | None = None,
                        path: str | os.PathLike | None = None) -> Figure:
    """Sparsification curves (metric of the remaining pixels against the removed fraction) of
    several models, ``{label: (model_curve, oracle_curve)}`` as from :func:`sparsification_curves`;
    each oracle dashed in its model's colour. The gap between the two is the AUSE."""
    f = _numpy(torch.tensor(DEFAULT_FRACTIONS))
    fig, ax = _axes(ax, (5.0, 4.0))
    for label, (model, oracle) in curves.items():
        if len(model) != len(f) or len(oracle) != len(f):
            raise ValueError(f"curves of {label!r} must have {len(f)} points (DEFAULT_FRACTIONS), "
                             f"got {len(model)} and {len(oracle)}")
        line, = ax.plot(f, _numpy(torch.as_tensor(model)), label=label)
        ax.plot(f, _numpy(torch.as_tensor(oracle)), ls="--", color=line.get_color(), lw=1)
    ax.set(xlabel="fraction of pixels removed (most uncertain first)", ylabel=metric, xlim=(0, 1),
           title=f"sparsification ({metric}); dashed: oracle")
    ax.legend(fontsize="small")
    return _finish(fig, path)


def depth_coverage(mean: torch.Tensor, std: torch.Tensor, gt_depth: torch.Tensor,
                   levels: tuple[float, ...] = M.DEFAULT_LEVELS, min_depth: float = 1e-3) -> torch.Tensor:
    """Observed coverage of the central intervals of ``N(mean, std^2)`` at each level, pooled
    over the valid pixels (:func:`bayes_colora.metrics.regression_calibration`)."""
    gt, mean, std = _maps(gt_depth, "gt_depth"), _maps(mean, "mean"), _maps(std, "std")
    valid = valid_depth_mask(gt, None, min_depth)
    return M.regression_calibration(mean, std ** 2, gt, levels=levels, mask=valid)


def depth_calibration_plot(observed: Mapping[str, Sequence[float]],
                           levels: tuple[float, ...] = M.DEFAULT_LEVELS, ax: Axes | None = None,
                           path: str | os.PathLike | None = None) -> Figure:
    """Observed against expected coverage, ``{label: observed}`` as from :func:`depth_coverage`,
    with the diagonal of perfect calibration (above it: too wide; below: over-confident)."""
    lv = _numpy(torch.as_tensor(levels)).reshape(-1)
    fig, ax = _axes(ax, (4.5, 4.5))
    for label, obs in observed.items():
        if len(obs) != len(lv):
            raise ValueError(f"observed coverage of {label!r} has {len(obs)} levels, expected {len(lv)}")
        ax.plot(lv, _numpy(torch.as_tensor(obs)), marker="o", ms=3, label=label)
    _diagonal(ax)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="expected coverage", ylabel="observed coverage",
           title="per-pixel calibration")
    ax.legend(loc="upper left", fontsize="small")
    return _finish(fig, path)


def comparison_plot(rows: Iterable[dict[str, Any]], metric: str, group: str = "adapter",
                    hue: str = "engine", ax: Axes | None = None, title: str | None = None,
                    path: str | os.PathLike | None = None) -> Figure:
    """Grouped bars of ``row[metric]``: one group per value of ``row[group]``, one bar colour per
    value of ``row[hue]`` (e.g. adapters x engines of the depth study)."""
    rows = list(rows)
    missing = [r for r in rows if metric not in r or group not in r or hue not in r]
    if not rows or missing:
        raise ValueError(f"comparison_plot needs rows with keys {group!r}, {hue!r} and {metric!r}; "
                         f"{'no rows' if not rows else f'{len(missing)} rows lack them'}")
    groups = list(dict.fromkeys(r[group] for r in rows))
    hues = list(dict.fromkeys(r[hue] for r in rows))
    width = 0.8 / len(hues)
    fig, ax = _axes(ax, (1.2 + 1.1 * len(groups), 3.6))
    for k, h in enumerate(hues):
        xs, ys = [], []
        for g_i, g in enumerate(groups):
            vals = [float(r[metric]) for r in rows if r[group] == g and r[hue] == h]
            if vals:
                xs.append(g_i - 0.4 + width * (k + 0.5))
                ys.append(vals[0])
        ax.bar(xs, ys, width=width, label=str(h))
    ax.set_xticks(range(len(groups)), [str(g) for g in groups])
    ax.set(ylabel=metric, title=title or metric)
    ax.legend(fontsize="small", ncols=min(len(hues), 4))
    return _finish(fig, path)


def paired_scatter(entries: Iterable[dict[str, Any]], ax: Axes | None = None, title: str | None = None,
                   path: str | os.PathLike | None = None) -> Figure:
    r"""One point per cell of :func:`~bayes_colora.depth.experiment.paired_to_map` entries: ``x``
    the engine-minus-MAP NLL difference, ``y`` the AUSE-RMSE difference, error bars of two block
    SEs (none where there is no block SE), one colour per engine. The quadrant ``x < 0, y < 0``
    (the target: lower NLL and lower AUSE than MAP) is shaded. The NLL axis is symmetric-log
    (linear within ``|x| < 0.1``): its differences span three decades. Entries without per-image
    values are left out."""
    entries = [e for e in entries if e.get("nll") and e.get("ause_rmse") and e["nll"]["mean"] is not None
               and e["ause_rmse"]["mean"] is not None]
    if not entries:
        raise ValueError("paired_scatter needs paired_to_map entries with per-image NLL and AUSE-RMSE "
                         "differences; none has them")
    fig, ax = _axes(ax, (6.0, 4.5))
    for engine in dict.fromkeys(e["engine"] for e in entries):
        mine = [e for e in entries if e["engine"] == engine]
        x = [e["nll"]["mean"] for e in mine]
        y = [e["ause_rmse"]["mean"] for e in mine]
        xerr = [2 * (e["nll"]["se_block"] or 0.0) for e in mine]
        yerr = [2 * (e["ause_rmse"]["se_block"] or 0.0) for e in mine]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=4, capsize=2, lw=0.8,
                    label=f"{engine} ({sum(bool(e['meets_target']) for e in mine)} of {len(mine)} in the quadrant)")
    ax.set_xscale("symlog", linthresh=0.1)
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    ax.fill_between([x0, 0.0], y0, 0.0, color="tab:green", alpha=0.1, lw=0)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.axvline(0.0, color="0.5", lw=0.8)
    ax.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="Δ NLL (engine − MAP, nats per pixel)",
           ylabel="Δ AUSE-RMSE (engine − MAP, m)", title=title or "engines against their MAP")
    ax.legend(fontsize="small", loc="best")
    return _finish(fig, path)
