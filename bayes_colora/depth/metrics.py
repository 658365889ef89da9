r"""Depth metrics: the Eigen et al. error measures, NLL and calibration, and sparsification.

Depth maps are ``(B, H, W)`` or ``(B, 1, H, W)`` tensors in metres; the leading axis indexes
images. A pixel is *valid* when its ground truth is finite, ``> min_depth`` (default 1e-3 m),
``< max_depth`` (when given) and ``mask`` (when given) is True; predictions are clamped to
``[min_depth, max_depth]`` first, the Monodepth2 / Poggi et al. protocol. Error and
sparsification metrics are computed per image over its valid pixels and averaged over the images
that have any (the convention of the depth literature); NLL and calibration are per-pixel
averages pooled over all valid pixels of all images (:mod:`bayes_colora.metrics`).

Eigen et al. (2014) error measures over the N valid pixels of an image (``d`` predicted,
``d*`` true):

* ``abs_rel = mean |d - d*| / d*``, ``sq_rel = mean (d - d*)^2 / d*``,
* ``rmse = sqrt(mean (d - d*)^2)``, ``rmse_log = sqrt(mean (log d - log d*)^2)``,
* ``log10 = mean |log10 d - log10 d*|``,
* ``delta_i = mean 1[max(d / d*, d* / d) < 1.25^i]`` for i = 1, 2, 3.

Sparsification (Ilg et al. 2018; Poggi et al. CVPR 2020, "On the uncertainty of self-supervised
monocular depth estimation", ``compute_aucs`` of github.com/mattpoggi/mono-uncertainty): remove
the fraction ``f`` of most uncertain pixels and evaluate the metric on the rest, for
``f = 0, 0.02, ..., 0.98``; the curve is *not* normalised by its value at ``f = 0``, and a last
point ``(f = 1, 0)`` is appended, so areas are trapezoids over ``[0, 1]``. The *oracle* removes
pixels by their true error. ``AUSE = area(model) - area(oracle)`` (>= 0; 0 for a perfect
ranking). ``AURG = area(random) - area(model)``, where the random-removal curve is, in
expectation, the full-image metric at every ``f < 1`` and, like the others, 0 at ``f = 1``.
Differences from the reference code, all below one pixel or documented:

* exactly ``f N`` pixels are removed (a fractional last pixel counts with its fraction), where
  the reference keeps the pixels at or below an interpolated percentile;
* ties in the uncertainty are broken *in expectation*: tied pixels are removed as a group whose
  per-pixel error is the group mean, i.e. the expected remaining error sum over random orders of
  the tied pixels (exact for ``abs_rel``; for ``rmse`` the root of the expected squared error).
  So a constant uncertainty gives the random curve and ``AURG = 0`` (up to rounding; the reference keeps
  every tied pixel instead);
* the reference integrates the random curve as the constant full-image metric up to ``f = 1``,
  without the final 0 its own model curve has: its AURG is ours plus ``metric * (1 - f_last) / 2``
  (``0.01 * metric`` for the default fractions).
"""
from __future__ import annotations

import math

import torch

from .. import metrics as M
from ..predictive import Predictive

#: removed fractions of the sparsification curves: 0, 0.02, ..., 0.98 (50 steps)
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 50 for i in range(50))
#: per-pixel error of each sparsification metric and how it is reduced
SPARSIFICATION_METRICS: dict[str, str] = {"abs_rel": "mean", "rmse": "rms"}


# --------------------------------------------------------------------------- inputs

def _depth_maps(pred: torch.Tensor, gt: torch.Tensor, names: tuple[str, str] = ("pred_depth", "gt_depth")
                ) -> tuple[torch.Tensor, torch.Tensor]:
    pred, gt = M._tensor(pred, names[0]), M._tensor(gt, names[1])
    if pred.shape != gt.shape:
        raise ValueError(f"{names[0]} shape {tuple(pred.shape)} does not match {names[1]} shape "
                         f"{tuple(gt.shape)}")
    if gt.dim() < 3:
        raise ValueError(f"depth maps must have shape (B, H, W) or (B, 1, H, W), got "
                         f"{tuple(gt.shape)}; add a leading image axis for one image (x[None])")
    return pred, gt


def valid_depth_mask(gt_depth: torch.Tensor, mask: torch.Tensor | None = None,
                     min_depth: float = 1e-3, max_depth: float | None = None) -> torch.Tensor:
    """Boolean mask of the pixels that count: ``gt`` finite, ``> min_depth``, ``< max_depth``
    (when given) and ``mask`` (when given; True = valid)."""
    gt = M._tensor(gt_depth, "gt_depth")
    valid = torch.isfinite(gt) & (gt > min_depth)
    if max_depth is not None:
        if max_depth <= min_depth:
            raise ValueError(f"max_depth ({max_depth}) must exceed min_depth ({min_depth})")
        valid &= gt < max_depth
    if mask is not None:
        valid &= _bool_mask(mask, gt.shape, "gt_depth")
    return valid


def _bool_mask(mask: torch.Tensor, shape: torch.Size, of: str) -> torch.Tensor:
    mask = M._tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor (True = valid), got {mask.dtype}; "
                        f"use mask.bool() or a comparison such as gt > 0")
    if mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {of} shape {tuple(shape)}")
    return mask


def _check_min_depth(min_depth: float) -> None:
    if not (isinstance(min_depth, (int, float)) and math.isfinite(min_depth) and min_depth > 0):
        raise ValueError(f"min_depth must be a positive float (predictions are clamped to it "
                         f"before taking logs), got {min_depth!r}")


def _images(valid: torch.Tensor, **maps: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per image with any valid pixel, the float64 valid values of each map, ``(N_b,)`` each, in
    the order given; non-finite values at valid pixels raise, naming the map."""
    names = list(maps)
    out = []
    for b in range(valid.shape[0]):
        if valid[b].any():
            first, *rest = names
            out.append(M._valid_elements(maps[first][b], valid[b],
                                         **{n: maps[n][b] for n in rest}))
    if not out:
        raise ValueError("no valid pixel in any image: every ground-truth depth is missing, out of "
                         "[min_depth, max_depth] or masked out")
    return out


# --------------------------------------------------------------------------- Eigen metrics

def _eigen(d: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    ratio = torch.maximum(d / gt, gt / d)
    log_diff = d.log() - gt.log()
    sq = (d - gt) ** 2
    return {"abs_rel": ((d - gt).abs() / gt).mean().item(), "sq_rel": (sq / gt).mean().item(),
            "rmse": sq.mean().sqrt().item(), "rmse_log": log_diff.pow(2).mean().sqrt().item(),
            "log10": (log_diff.abs() / math.log(10)).mean().item(),
            **{f"delta{i}": (ratio < 1.25 ** i).double().mean().item() for i in (1, 2, 3)}}


def depth_metrics(pred_depth: torch.Tensor, gt_depth: torch.Tensor, mask: torch.Tensor | None = None,
                  min_depth: float = 1e-3, max_depth: float | None = None) -> dict[str, float]:
    r"""The Eigen et al. error measures (module notes), per image, averaged over images.

    Returns ``abs_rel``, ``sq_rel``, ``rmse``, ``rmse_log``, ``log10``, ``delta1``, ``delta2``,
    ``delta3``. ``pred_depth`` is clamped to ``[min_depth, max_depth]``; only valid pixels
    (:func:`valid_depth_mask`) count, and only they must be finite.
    """
    _check_min_depth(min_depth)
    pred, gt = _depth_maps(pred_depth, gt_depth)
    valid = valid_depth_mask(gt, mask, min_depth, max_depth)
    per_image = [_eigen(p.clamp(min_depth, max_depth), g)
                 for g, p in _images(valid, gt=gt, pred=pred)]
    return {k: sum(r[k] for r in per_image) / len(per_image) for k in per_image[0]}


def depth_nll(mean: torch.Tensor, var: torch.Tensor, gt_depth: torch.Tensor,
              mask: torch.Tensor | None = None, min_depth: float = 1e-3,
              max_depth: float | None = None) -> float:
    r"""Mean Gaussian negative log density per valid pixel, ``N(mean, var)`` moment-matched to
    the predictive (:func:`bayes_colora.metrics.gaussian_nll`, nats per pixel, pooled)."""
    mean, gt = _depth_maps(mean, gt_depth, ("mean", "gt_depth"))
    return M.gaussian_nll(mean, var, gt, valid_depth_mask(gt, mask, min_depth, max_depth))


# --------------------------------------------------------------------------- sparsification

def _fractions(fractions: tuple[float, ...] | torch.Tensor) -> torch.Tensor:
    f = M._tensor(fractions, "fractions").double().reshape(-1)
    if (f.numel() == 0 or f[0] != 0 or not torch.isfinite(f).all() or (f >= 1).any()
            or (f.diff() <= 0).any()):
        raise ValueError(f"fractions must increase strictly from 0 and stay below 1 (e.g. "
                         f"DEFAULT_FRACTIONS = 0, 0.02, ..., 0.98), got {f.tolist()}")
    return f


def _reduce_mode(reduce: str) -> str:
    if reduce not in ("mean", "rms"):
        raise ValueError(f"reduce must be 'mean' (e.g. abs_rel) or 'rms' (e.g. rmse from absolute "
                         f"errors), got {reduce!r}")
    return reduce


def _curve(error: torch.Tensor, uncertainty: torch.Tensor, f: torch.Tensor, reduce: str) -> torch.Tensor:
    """One image: the metric of the pixels left after removing the ``f N`` most uncertain ones,
    ties removed in expectation (module notes). ``error``, ``uncertainty`` (N,); returns (F,)."""
    n = error.numel()
    order = torch.argsort(uncertainty, descending=True, stable=True)
    u, e = uncertainty[order], error[order]
    if reduce == "rms":
        e = e ** 2
    group = torch.cat([e.new_zeros(1, dtype=torch.long), (u.diff() != 0).long().cumsum(0)])
    sums = torch.zeros(int(group[-1]) + 1, dtype=e.dtype, device=e.device).index_add(0, group, e)
    e = (sums / torch.bincount(group).to(e))[group]  # tied pixels share their group's mean error
    tail = e.flip(0).cumsum(0).flip(0)  # tail[i] = sum_{j >= i} e_j
    removed = f.to(e.device) * n
    i = removed.floor().long()
    kept = (tail[i] - (removed - i) * e[i]).clamp_min(0.0) / (n - removed)
    return kept.sqrt() if reduce == "rms" else kept


def _error_images(error: torch.Tensor, uncertainty: torch.Tensor,
                  mask: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    error, uncertainty = _depth_maps(error, uncertainty, ("error", "uncertainty"))
    valid = (torch.ones_like(error, dtype=torch.bool) if mask is None
             else _bool_mask(mask, error.shape, "error"))
    M._check_finite(error[valid], "error", mask is not None)
    images = _images(valid, error=error, uncertainty=uncertainty)
    if any((e < 0).any() for e, _ in images):
        raise ValueError("error must be non-negative per-pixel errors (|d - d*| / d* or "
                         "|d - d*|), not signed differences")
    return images


def sparsification_curve(error: torch.Tensor, uncertainty: torch.Tensor,
                         mask: torch.Tensor | None = None,
                         fractions: tuple[float, ...] | torch.Tensor = DEFAULT_FRACTIONS,
                         reduce: str = "mean") -> torch.Tensor:
    r"""Sparsification curves, one per image: the metric of the pixels left after removing the
    fraction ``f`` with the largest ``uncertainty``, for each ``f`` in ``fractions``.

    Args:
        error: non-negative per-pixel errors ``(B, H, W)`` or ``(B, 1, H, W)``:
            ``|d - d*| / d*`` with ``reduce="mean"`` gives AbsRel, ``|d - d*|`` with
            ``reduce="rms"`` gives RMSE. ``sparsification_curve(error, error)`` is the oracle.
        uncertainty: per-pixel uncertainty of ``error``'s shape (e.g. the predictive std).
        mask: boolean, True = valid pixel (default: all).
        fractions: removed fractions, strictly increasing from 0, below 1.
        reduce: ``"mean"`` (the mean of the remaining errors) or ``"rms"`` (their root mean square).

    Returns a float64 tensor ``(B', F)``, one row per image with any valid pixel. Removal counts
    exactly ``f N`` pixels and breaks uncertainty ties in expectation (module notes).
    """
    f, reduce = _fractions(fractions), _reduce_mode(reduce)
    return torch.stack([_curve(e, u, f, reduce) for e, u in _error_images(error, uncertainty, mask)])


def _areas(error: torch.Tensor, uncertainty: torch.Tensor, mask: torch.Tensor | None,
           fractions: tuple[float, ...] | torch.Tensor, reduce: str) -> torch.Tensor:
    """Per image ``(B', 3)``: areas under the random, model and oracle curves over ``[0, 1]``,
    each curve closed by the point ``(1, 0)``."""
    f, reduce = _fractions(fractions), _reduce_mode(reduce)
    x = torch.cat([f, f.new_ones(1)])
    rows = []
    for e, u in _error_images(error, uncertainty, mask):
        f_dev = f.to(e.device)
        model, oracle = _curve(e, u, f_dev, reduce), _curve(e, e, f_dev, reduce)
        random = model[:1].expand_as(model)  # the full-image metric at every fraction
        curves = torch.stack([random, model, oracle]).cpu()
        rows.append(torch.trapezoid(torch.cat([curves, curves.new_zeros(3, 1)], 1), x, dim=1))
    return torch.stack(rows)


def ause(error: torch.Tensor, uncertainty: torch.Tensor, mask: torch.Tensor | None = None,
         fractions: tuple[float, ...] | torch.Tensor = DEFAULT_FRACTIONS, reduce: str = "mean") -> float:
    r"""Area Under the Sparsification Error: ``area(model curve) - area(oracle curve)`` per
    image (trapezoids over ``[0, 1]``), averaged over images. Arguments as
    :func:`sparsification_curve`. 0 for a perfect ranking, larger is worse."""
    areas = _areas(error, uncertainty, mask, fractions, reduce)
    return (areas[:, 1] - areas[:, 2]).mean().item()


def aurg(error: torch.Tensor, uncertainty: torch.Tensor, mask: torch.Tensor | None = None,
         fractions: tuple[float, ...] | torch.Tensor = DEFAULT_FRACTIONS, reduce: str = "mean") -> float:
    r"""Area Under the Random Gain: ``area(random curve) - area(model curve)`` per image,
    averaged over images; the random curve is the full-image metric at every fraction below 1
    (its expectation under random removal). Positive when the uncertainty ranks errors better
    than chance, 0 for a constant uncertainty. Arguments as :func:`sparsification_curve`."""
    areas = _areas(error, uncertainty, mask, fractions, reduce)
    return (areas[:, 0] - areas[:, 1]).mean().item()


# --------------------------------------------------------------------------- summary

def evaluate_depth(pred: Predictive, gt_depth: torch.Tensor, mask: torch.Tensor | None = None,
                   min_depth: float = 1e-3, max_depth: float | None = None,
                   fractions: tuple[float, ...] | torch.Tensor = DEFAULT_FRACTIONS,
                   levels: tuple[float, ...] = M.DEFAULT_LEVELS) -> dict[str, float]:
    r"""All depth metrics of a depth :class:`~bayes_colora.predictive.Predictive` (``mean`` and
    ``total`` of ``gt_depth``'s shape, e.g. ``(B, 1, H, W)`` from ``bc.depth.DepthLikelihood``).

    Returns the :func:`depth_metrics` of ``pred.mean`` (per image, averaged); ``nll``
    (:func:`depth_nll` of ``N(pred.mean, pred.total)``), ``calibration_error``
    (:func:`bayes_colora.metrics.quantile_calibration_error` over ``levels``) and ``coverage_90``
    (pooled over valid pixels); and ``ause_abs_rel``, ``aurg_abs_rel``, ``ause_rmse``,
    ``aurg_rmse`` with the predictive standard deviation ``pred.std`` as the uncertainty, errors
    of the clamped prediction (per image, averaged).
    """
    _check_min_depth(min_depth)
    mean, gt = _depth_maps(pred.mean, gt_depth, ("pred.mean", "gt_depth"))
    valid = valid_depth_mask(gt, mask, min_depth, max_depth)
    out = depth_metrics(mean, gt, valid, min_depth, max_depth)
    out["nll"] = M.gaussian_nll(mean, pred.total, gt, valid)
    out["calibration_error"] = M.quantile_calibration_error(mean, pred.total, gt, levels, valid)
    out["coverage_90"] = M.interval_coverage(mean, pred.total, gt, 0.9, valid)
    clamped = mean.clamp(min_depth, max_depth)
    gt_safe = torch.where(valid, gt, torch.ones_like(gt))  # no 0/0 at pixels the mask drops
    errors = {"abs_rel": (clamped - gt_safe).abs() / gt_safe, "rmse": (clamped - gt_safe).abs()}
    std = pred.std
    for name, reduce in SPARSIFICATION_METRICS.items():
        areas = _areas(errors[name], std, valid, fractions, reduce)
        out[f"ause_{name}"] = (areas[:, 1] - areas[:, 2]).mean().item()
        out[f"aurg_{name}"] = (areas[:, 0] - areas[:, 1]).mean().item()
    return out
