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

Sparsification (:func:`sparsification_curve`, :func:`ause`, :func:`aurg`, :data:`DEFAULT_FRACTIONS`)
is the general one of :mod:`bayes_colora.metrics` (per-image curves, oracle, 2 % steps, the Poggi
et al. CVPR 2020 convention), re-exported here; :func:`evaluate_depth` applies it to AbsRel
(``error = |d - d*| / d*``, ``reduce="mean"``) and RMSE (``|d - d*|``, ``reduce="rms"``) with the
predictive std as the uncertainty.
"""
from __future__ import annotations

import math

import torch

from .. import metrics as M
from ..metrics import DEFAULT_FRACTIONS, aurg, ause, sparsification_curve
from ..predictive import Predictive

__all__ = ["DEFAULT_FRACTIONS", "SPARSIFICATION_METRICS", "aurg", "ause", "depth_metrics", "depth_nll",
           "depth_per_image", "evaluate_depth", "sparsification_curve", "valid_depth_mask"]

#: per-pixel error of each sparsification metric and how it is reduced
SPARSIFICATION_METRICS: dict[str, str] = {"abs_rel": "mean", "rmse": "rms"}


# --------------------------------------------------------------------------- inputs

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
        valid &= M._bool_mask(mask, gt.shape, "gt_depth")
    return valid


def _check_min_depth(min_depth: float) -> None:
    if not (isinstance(min_depth, (int, float)) and math.isfinite(min_depth) and min_depth > 0):
        raise ValueError(f"min_depth must be a positive float (predictions are clamped to it "
                         f"before taking logs), got {min_depth!r}")


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
    pred, gt = M._image_maps(pred_depth, gt_depth, ("pred_depth", "gt_depth"))
    valid = valid_depth_mask(gt, mask, min_depth, max_depth)
    if not valid.any():
        raise ValueError("no valid pixel in any image: every ground-truth depth is missing, out of "
                         "[min_depth, max_depth] or masked out")
    per_image = [_eigen(p.clamp(min_depth, max_depth), g)
                 for g, p in M._per_image(valid, gt=gt, pred=pred)]
    return {k: sum(r[k] for r in per_image) / len(per_image) for k in per_image[0]}


def depth_nll(mean: torch.Tensor, var: torch.Tensor, gt_depth: torch.Tensor,
              mask: torch.Tensor | None = None, min_depth: float = 1e-3,
              max_depth: float | None = None) -> float:
    r"""Mean Gaussian negative log density per valid pixel, ``N(mean, var)`` moment-matched to
    the predictive (:func:`bayes_colora.metrics.gaussian_nll`, nats per pixel, pooled)."""
    mean, gt = M._image_maps(mean, gt_depth, ("mean", "gt_depth"))
    return M.gaussian_nll(mean, var, gt, valid_depth_mask(gt, mask, min_depth, max_depth))


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
    mean, gt = M._image_maps(pred.mean, gt_depth, ("pred.mean", "gt_depth"))
    valid = valid_depth_mask(gt, mask, min_depth, max_depth)
    out = depth_metrics(mean, gt, valid, min_depth, max_depth)
    out["nll"] = M.gaussian_nll(mean, pred.total, gt, valid)
    out["calibration_error"] = M.quantile_calibration_error(mean, pred.total, gt, levels, valid)
    out["coverage_90"] = M.interval_coverage(mean, pred.total, gt, 0.9, valid)
    for name, areas in _sparsification_areas(mean, gt, valid, pred.std, min_depth, max_depth,
                                             fractions).items():
        out[f"ause_{name}"] = (areas[:, 1] - areas[:, 2]).mean().item()
        out[f"aurg_{name}"] = (areas[:, 0] - areas[:, 1]).mean().item()
    return out


def _sparsification_areas(mean: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, std: torch.Tensor,
                          min_depth: float, max_depth: float | None,
                          fractions: tuple[float, ...] | torch.Tensor) -> dict[str, torch.Tensor]:
    """For each of :data:`SPARSIFICATION_METRICS`, the ``(B', 3)`` random / model / oracle areas
    of the images with a valid pixel, in order, for the errors of the clamped prediction."""
    clamped = mean.clamp(min_depth, max_depth)
    gt_safe = torch.where(valid, gt, torch.ones_like(gt))  # no 0/0 at pixels the mask drops
    errors = {"abs_rel": (clamped - gt_safe).abs() / gt_safe, "rmse": (clamped - gt_safe).abs()}
    return {name: M._sparsification_areas(errors[name], std, valid, fractions, reduce)
            for name, reduce in SPARSIFICATION_METRICS.items()}


def depth_per_image(pred: Predictive, gt_depth: torch.Tensor, mask: torch.Tensor | None = None,
                    min_depth: float = 1e-3, max_depth: float | None = None,
                    fractions: tuple[float, ...] | torch.Tensor = DEFAULT_FRACTIONS
                    ) -> dict[str, list[float | int | None]]:
    r"""Per image ``b`` of ``B``, the pieces of :func:`evaluate_depth`'s ``nll``, ``ause_rmse`` and
    ``ause_abs_rel``, for paired comparisons between predictives of the same images.

    Returns lists of length ``B`` (the leading axis, in order):

    * ``n_valid``: ``n_b``, the number of valid pixels of image ``b``;
    * ``nll``: ``(1/n_b) sum_{i in b} 0.5 [(y_i - m_i)^2 / v_i + log v_i + log 2 pi]``, the
      image's mean Gaussian NLL per valid pixel;
    * ``ause_rmse``, ``ause_abs_rel``: the image's AUSE (model minus oracle area).

    Entries of an image without a valid pixel are ``None`` (``n_valid`` 0). The aggregates follow:
    ``evaluate_depth(...)["nll"] = sum_b n_b nll_b / sum_b n_b`` (NLL is pooled over pixels, so the
    per-image values are weighted by their valid-pixel counts) and ``ause_* = mean_b ause_b`` over
    the images with any valid pixel.
    """
    _check_min_depth(min_depth)
    mean, gt = M._image_maps(pred.mean, gt_depth, ("pred.mean", "gt_depth"))
    total = M._image_maps(pred.total, gt, ("pred.total", "gt_depth"))[0]
    valid = valid_depth_mask(gt, mask, min_depth, max_depth)
    n_valid = valid.flatten(1).sum(1).tolist()
    kept = [b for b, n in enumerate(n_valid) if n > 0]  # the rows of the areas, in order
    out: dict[str, list[float | int | None]] = {"n_valid": n_valid, "nll": [None] * len(n_valid)}
    for b in kept:
        one = slice(b, b + 1)
        out["nll"][b] = M.gaussian_nll(mean[one], total[one], gt[one], valid[one])
    for name, areas in _sparsification_areas(mean, gt, valid, pred.std, min_depth, max_depth,
                                             fractions).items():
        out[f"ause_{name}"] = [None] * len(n_valid)
        for b, value in zip(kept, (areas[:, 1] - areas[:, 2]).tolist()):
            out[f"ause_{name}"][b] = value
    return out
