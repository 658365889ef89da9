r"""Metrics of predictive quality: error, negative log-likelihood, calibration, sparsification,
and paired differences between two methods on the same test items (mean with standard errors).

Pure functions on tensors (any device). Scalar metrics return Python floats; curves return
tensors. Everything is computed in float64.

Regression (``mean``, ``var``, ``y`` of one shape; ``var`` may be anything that broadcasts to
it, e.g. a float ``sigma**2``) treats the predictive of each element as ``N(mean, var)`` and
accepts ``mask``, a boolean tensor of ``y``'s shape marking the valid elements: only those enter
the metric, and only those must be finite (invalid pixels of a depth map may hold NaN).

Classification takes ``probs`` of shape ``(B, C)`` or ``(B, C, ...)`` (classes along axis 1, as
``bc.Categorical``) and integer class indices ``y`` of shape ``(B,)`` or ``(B, ...)``; every
position is one prediction.

Sparsification (how well a per-pixel uncertainty ranks the per-pixel errors) takes maps of shape
``(B, H, W)`` or ``(B, C, H, W)`` whose leading axis indexes images; a curve is computed per image
over its valid pixels (``mask``, True = valid) and scalars are averaged over the images that have
any. The convention is that of the common depth-uncertainty evaluation code (Ilg et al. 2018;
Poggi et al. CVPR 2020, "On the uncertainty of self-supervised monocular depth estimation",
``compute_aucs`` of github.com/mattpoggi/mono-uncertainty): remove the fraction ``f`` of the
pixels with the largest uncertainty and evaluate the metric on the rest, for
``f = 0, 0.02, ..., 0.98`` (2 % steps, :data:`DEFAULT_FRACTIONS`); the curve is *not* normalised
by its value at ``f = 0``, and a last point ``(f = 1, 0)`` is appended, so areas are trapezoids
over ``[0, 1]``. The *oracle* removes pixels by their true error (``uncertainty = error``).
``AUSE = area(model) - area(oracle)`` (>= 0; 0 for a perfect ranking).
``AURG = area(random) - area(model)``, where the random-removal curve is, in expectation, the
full-image metric at every ``f < 1`` and, like the others, 0 at ``f = 1``. Differences from the
reference code, all below one pixel or documented:

* exactly ``f N`` of an image's ``N`` valid pixels are removed (a fractional last pixel counts
  with its fraction), where the reference keeps the pixels at or below an interpolated percentile;
* ties in the uncertainty are broken *in expectation*: tied pixels are removed as a group whose
  per-pixel error is the group mean, i.e. the expected remaining error sum over random orders of
  the tied pixels (exact for ``reduce="mean"``; for ``reduce="rms"`` the root of the expected
  squared error). So a constant uncertainty gives the random curve and ``AURG = 0`` (up to
  rounding; the reference keeps every tied pixel instead);
* the reference integrates the random curve as the constant full-image metric up to ``f = 1``,
  without the final 0 its own model curve has: its AURG is ours plus ``metric * (1 - f_last) / 2``
  (``0.01 * metric`` for the default fractions).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .likelihoods import Likelihood
from .predictive import Predictive

#: default central-interval probability levels: 0.05, 0.10, ..., 0.95
DEFAULT_LEVELS: tuple[float, ...] = tuple(i / 20 for i in range(1, 20))
#: removed fractions of the sparsification curves: 0, 0.02, ..., 0.98 (50 steps)
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 50 for i in range(50))


# --------------------------------------------------------------------------- input checks

def _tensor(x: torch.Tensor | float, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}") from err
    return x.detach()


def _check_finite(t: torch.Tensor, name: str, masked: bool | None = None) -> None:
    """Raise naming ``t``; ``masked``: None (no mask possible), False (none given), True (given)."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        fix = {None: "clean the input",
               False: "clean the input or pass mask= (True = valid) to leave those elements out",
               True: "at valid elements; fix the data or the mask"}[masked]
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf); {fix}")


def _valid_elements(y: torch.Tensor, mask: torch.Tensor | None,
                    **preds: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """Flattened float64 valid elements of ``y`` and of each prediction (``var`` broadcasts).

    Returns ``(y_valid, *preds_valid)`` in the order given, each of shape ``(N,)``.
    """
    y = _tensor(y, "y")
    out = []
    for name, p in preds.items():
        p = _tensor(p, name)
        if name == "var":
            if not _broadcasts_to(p, y):
                raise ValueError(f"var shape {tuple(p.shape)} does not broadcast to the target "
                                 f"shape {tuple(y.shape)}")
            p = p.expand(y.shape)
        elif p.shape != y.shape:
            raise ValueError(f"{name} shape {tuple(p.shape)} does not match target shape "
                             f"{tuple(y.shape)}; give one prediction per target element")
        out.append(p)
    if mask is not None:
        mask = _tensor(mask, "mask")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean tensor (True = valid), got {mask.dtype}; "
                            f"use mask.bool() or a comparison such as y > 0")
        if mask.shape != y.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match target shape "
                             f"{tuple(y.shape)}")
        y, out = y[mask], [p[mask] for p in out]
    if y.numel() == 0:
        raise ValueError("no valid element to evaluate: the target is empty or the mask is all False")
    y = y.reshape(-1).double()
    _check_finite(y, "y", mask is not None)
    flat = []
    for name, p in zip(preds, out):
        p = p.reshape(-1).double()
        _check_finite(p, name, mask is not None)
        if name == "var" and (p <= 0).any():
            raise ValueError(f"var must be positive, got minimum {p.min().item():.3g}; pass a "
                             f"variance (sigma**2), not a log-variance")
        flat.append(p)
    return (y, *flat)


def _broadcasts_to(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` broadcasts to ``b``'s shape (without enlarging it)."""
    try:
        return torch.broadcast_shapes(a.shape, b.shape) == b.shape
    except RuntimeError:
        return False


def _bool_mask(mask: torch.Tensor, shape: torch.Size, of: str) -> torch.Tensor:
    """``mask`` after checking that it is boolean (True = valid) and has ``of``'s ``shape``."""
    mask = _tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor (True = valid), got {mask.dtype}; "
                        f"use mask.bool() or a comparison such as gt > 0")
    if mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {of} shape {tuple(shape)}")
    return mask


def _image_maps(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two per-pixel maps of one shape ``(B, H, W)`` or ``(B, C, H, W)`` (leading image axis)."""
    a, b = _tensor(a, names[0]), _tensor(b, names[1])
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} shape {tuple(a.shape)} does not match {names[1]} shape "
                         f"{tuple(b.shape)}")
    if b.dim() < 3:
        raise ValueError(f"{names[0]} and {names[1]} must be maps of shape (B, H, W) or "
                         f"(B, C, H, W), got {tuple(b.shape)}; add a leading image axis for one "
                         f"image (x[None])")
    return a, b


def _per_image(valid: torch.Tensor, **maps: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per image (leading axis of ``valid``, ``(B, ...)``) with any valid pixel, the float64 valid
    values of each map, ``(N_b,)`` each, in the order given; non-finite values at valid pixels
    raise, naming the map."""
    first, *rest = maps
    out = [_valid_elements(maps[first][b], valid[b], **{n: maps[n][b] for n in rest})
           for b in range(valid.shape[0]) if valid[b].any()]
    if not out:
        raise ValueError("no valid pixel in any image: the maps are empty or the mask is all False")
    return out


def _classification_inputs(probs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs (N, C) float64, y (N,) int64)`` after checking shapes, range and normalisation."""
    probs, y = _tensor(probs, "probs"), _tensor(y, "y")
    if probs.dim() < 2:
        raise ValueError(f"probs must have shape (B, C) or (B, C, ...), got {tuple(probs.shape)}")
    want = (probs.shape[0],) + tuple(probs.shape[2:])
    if tuple(y.shape) != want:
        raise ValueError(f"target shape {tuple(y.shape)} does not match probs shape "
                         f"{tuple(probs.shape)}: class indices of shape {want} expected")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got {y.dtype}; use y.long()")
    if y.numel() == 0:
        raise ValueError("no element to evaluate: the target is empty")
    n_classes = probs.shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"class index out of range [0, {n_classes}): min {int(y.min())}, "
                         f"max {int(y.max())}")
    _check_finite(probs, "probs")
    probs = probs.movedim(1, -1).reshape(-1, n_classes).double()
    if (probs < 0).any() or (probs.sum(-1) - 1).abs().max() > 1e-3:
        raise ValueError("probs must be probabilities summing to 1 along axis 1 (classes); got "
                         "values outside [0, 1] or sums away from 1: pass logits.softmax(1), not logits")
    return probs, y.reshape(-1).long()


def _levels(levels: torch.Tensor | tuple[float, ...] | float, device: torch.device) -> torch.Tensor:
    p = _tensor(levels, "levels").to(device, torch.float64).reshape(-1)
    if p.numel() == 0 or not torch.isfinite(p).all() or (p <= 0).any() or (p >= 1).any():
        raise ValueError(f"levels must be probabilities strictly inside (0, 1), got {p.tolist()}")
    return p


# --------------------------------------------------------------------------- regression

def rmse(mean: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    r"""Root mean squared error ``sqrt( (1/N) sum_i (y_i - mean_i)^2 )`` over the valid elements."""
    y, mean = _valid_elements(y, mask, mean=mean)
    return (y - mean).pow(2).mean().sqrt().item()


def mae(mean: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    r"""Mean absolute error ``(1/N) sum_i |y_i - mean_i|`` over the valid elements."""
    y, mean = _valid_elements(y, mask, mean=mean)
    return (y - mean).abs().mean().item()


def gaussian_nll(mean: torch.Tensor, var: torch.Tensor | float, y: torch.Tensor,
                 mask: torch.Tensor | None = None) -> float:
    r"""Mean negative log density per element under ``N(mean, var)``:

    ``(1/N) sum_i 0.5 [ (y_i - mean_i)^2 / var_i + log var_i + log 2 pi ]`` (nats).

    For a sampled predictive pass ``var = pred.total``: the Gaussian with the predictive's first
    two moments (exact for a Gaussian posterior of a linear model, an approximation otherwise).
    """
    y, mean, var = _valid_elements(y, mask, mean=mean, var=var)
    return (0.5 * ((y - mean) ** 2 / var + var.log() + math.log(2 * math.pi))).mean().item()


def _standardised_errors(mean: torch.Tensor, var: torch.Tensor | float, y: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """Sorted ``|y - mean| / sqrt(var)`` of the valid elements, shape ``(N,)``."""
    y, mean, var = _valid_elements(y, mask, mean=mean, var=var)
    return ((y - mean).abs() / var.sqrt()).sort().values


def regression_calibration(mean: torch.Tensor, var: torch.Tensor | float, y: torch.Tensor,
                           levels: torch.Tensor | tuple[float, ...] = DEFAULT_LEVELS,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Observed coverage of the central prediction intervals at probability levels ``p``.

    The central interval of ``N(mean_i, var_i)`` at level ``p`` is
    ``mean_i +- z_p sqrt(var_i)`` with ``z_p = Phi^{-1}((1 + p) / 2)``; its observed coverage is
    ``(1/N) #{i : |y_i - mean_i| <= z_p sqrt(var_i)}``. A calibrated predictive covers ``p``.

    Returns a float64 tensor of shape ``(L,)``, one coverage per level (``levels``: ``L``
    values strictly inside (0, 1)). Computed from the sorted standardised errors, ``O(N log N)``.
    """
    r = _standardised_errors(mean, var, y, mask)
    p = _levels(levels, r.device)
    z = torch.special.ndtri((1 + p) / 2)
    return torch.searchsorted(r, z, right=True).double() / r.numel()


def quantile_calibration_error(mean: torch.Tensor, var: torch.Tensor | float, y: torch.Tensor,
                               levels: torch.Tensor | tuple[float, ...] = DEFAULT_LEVELS,
                               mask: torch.Tensor | None = None) -> float:
    r"""Mean absolute miscalibration of central prediction intervals:

    ``(1/L) sum_l |coverage(p_l) - p_l|`` with ``coverage`` from :func:`regression_calibration`.

    Convention: *central intervals* (the "interval" proportions of Uncertainty Toolbox's mean
    absolute calibration error), not the one-sided quantiles ``P(y <= F^{-1}(p))`` of Kuleshov
    et al. (2018); absolute, not squared, error; an unweighted mean over the given levels
    (default 0.05, 0.10, ..., 0.95). 0 is perfect; over- and under-coverage both count.
    """
    p = _levels(levels, torch.device("cpu"))
    observed = regression_calibration(mean, var, y, levels=p, mask=mask)
    return (observed.cpu() - p).abs().mean().item()


def interval_coverage(mean: torch.Tensor, var: torch.Tensor | float, y: torch.Tensor,
                      level: float = 0.9, mask: torch.Tensor | None = None) -> float:
    r"""Fraction of valid elements inside the central ``level`` interval
    ``mean +- Phi^{-1}((1 + level) / 2) sqrt(var)``; ``level`` for a calibrated predictive."""
    return regression_calibration(mean, var, y, levels=(level,), mask=mask).item()


# --------------------------------------------------------------------------- sparsification

def _fractions(fractions: tuple[float, ...] | torch.Tensor) -> torch.Tensor:
    f = _tensor(fractions, "fractions").double().reshape(-1)
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
    """Per image with any valid pixel, its valid ``(error, uncertainty)``, ``(N_b,)`` each."""
    error, uncertainty = _image_maps(error, uncertainty, ("error", "uncertainty"))
    valid = (torch.ones_like(error, dtype=torch.bool) if mask is None
             else _bool_mask(mask, error.shape, "error"))
    _check_finite(error[valid], "error", mask is not None)
    images = _per_image(valid, error=error, uncertainty=uncertainty)
    if any((e < 0).any() for e, _ in images):
        raise ValueError("error must be non-negative per-pixel errors (|y - y*| or "
                         "|y - y*| / y*), not signed differences")
    return images


def sparsification_curve(error: torch.Tensor, uncertainty: torch.Tensor,
                         mask: torch.Tensor | None = None,
                         fractions: tuple[float, ...] | torch.Tensor = DEFAULT_FRACTIONS,
                         reduce: str = "mean") -> torch.Tensor:
    r"""Sparsification curves, one per image: the metric of the pixels left after removing the
    fraction ``f`` with the largest ``uncertainty``, for each ``f`` in ``fractions``.

    For an image with ``N`` valid pixels, errors ``e_1, ..., e_N`` in order of decreasing
    uncertainty, ``k = f N`` pixels are removed and, with ``i = floor(k)``,
    ``curve(f) = (sum_{j > i} e_j - (k - i) e_{i+1}) / (N - k)`` for ``reduce="mean"``; for
    ``reduce="rms"`` the same with ``e_j^2`` inside and a square root outside. Tied
    uncertainties share their group's mean ``e_j`` (``e_j^2``): removal in expectation over the
    orders of the tie (module notes).

    Args:
        error: non-negative per-pixel errors ``(B, H, W)`` or ``(B, C, H, W)``, one image per
            leading index: ``|d - d*| / d*`` with ``reduce="mean"`` gives AbsRel, ``|d - d*|``
            with ``reduce="rms"`` gives RMSE. ``sparsification_curve(error, error)`` is the oracle.
        uncertainty: per-pixel uncertainty of ``error``'s shape (e.g. the predictive std).
        mask: boolean, True = valid pixel (default: all).
        fractions: removed fractions, strictly increasing from 0, below 1
            (default :data:`DEFAULT_FRACTIONS`, 2 % steps).
        reduce: ``"mean"`` (the mean of the remaining errors) or ``"rms"`` (their root mean square).

    Returns a float64 tensor ``(B', F)``, one row per image with any valid pixel.
    """
    f, reduce = _fractions(fractions), _reduce_mode(reduce)
    return torch.stack([_curve(e, u, f, reduce) for e, u in _error_images(error, uncertainty, mask)])


def _sparsification_areas(error: torch.Tensor, uncertainty: torch.Tensor, mask: torch.Tensor | None,
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
    image (trapezoids over ``[0, 1]``, closed by ``(1, 0)``), averaged over images. Arguments as
    :func:`sparsification_curve`. 0 for a perfect ranking, larger is worse."""
    areas = _sparsification_areas(error, uncertainty, mask, fractions, reduce)
    return (areas[:, 1] - areas[:, 2]).mean().item()


def aurg(error: torch.Tensor, uncertainty: torch.Tensor, mask: torch.Tensor | None = None,
         fractions: tuple[float, ...] | torch.Tensor = DEFAULT_FRACTIONS, reduce: str = "mean") -> float:
    r"""Area Under the Random Gain: ``area(random curve) - area(model curve)`` per image,
    averaged over images; the random curve is the full-image metric at every fraction below 1
    (its expectation under random removal). Positive when the uncertainty ranks errors better
    than chance, 0 for a constant uncertainty. Arguments as :func:`sparsification_curve`."""
    areas = _sparsification_areas(error, uncertainty, mask, fractions, reduce)
    return (areas[:, 0] - areas[:, 1]).mean().item()


# --------------------------------------------------------------------------- classification

def categorical_nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    r"""Mean negative log-probability of the true class, ``-(1/N) sum_i log p_i[y_i]`` (nats).

    Probabilities are clamped below at ``1e-12`` so that a confidently wrong prediction costs
    ``-log 1e-12 = 27.6`` nats rather than infinity.
    """
    probs, y = _classification_inputs(probs, y)
    picked = probs.gather(1, y[:, None]).squeeze(1)
    return -picked.clamp_min(1e-12).log().mean().item()


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    r"""Fraction of predictions whose most probable class is the true one,
    ``(1/N) #{i : argmax_c p_i[c] = y_i}``."""
    probs, y = _classification_inputs(probs, y)
    return (probs.argmax(1) == y).double().mean().item()


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of top-label confidence; ``n_bins`` entries each (``edges``: n_bins + 1).

    ``confidence`` and ``accuracy`` are NaN for empty bins.
    """

    edges: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    counts: torch.Tensor


def _bin_sums(probs: torch.Tensor, y: torch.Tensor, n_bins: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Edges ``(n_bins + 1,)``; per bin counts, summed confidence, summed correctness; and N."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    probs, y = _classification_inputs(probs, y)
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=conf.device)
    idx = torch.bucketize(conf, edges[1:-1])  # bin b holds confidences in (edges[b], edges[b+1]]
    counts = torch.bincount(idx, minlength=n_bins)
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    return edges, counts, zeros.index_add(0, idx, conf), zeros.index_add(0, idx, correct), conf.numel()


def reliability_bins(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> ReliabilityBins:
    r"""Top-label reliability statistics in ``n_bins`` equal-width confidence bins.

    The confidence of prediction ``i`` is ``c_i = max_c p_i[c]``; bin ``b`` holds the ``n_b``
    predictions with ``c_i`` in ``(b/n_bins, (b+1)/n_bins]``. Per bin:
    ``confidence_b = mean_{i in b} c_i``, ``accuracy_b = mean_{i in b} 1[argmax p_i = y_i]``,
    ``counts_b = n_b``. Tensors of shape ``(n_bins,)`` (float64; counts int64).
    """
    edges, counts, conf_sum, correct_sum, _ = _bin_sums(probs, y, n_bins)
    nan = torch.full_like(conf_sum, float("nan"))
    filled = counts > 0
    return ReliabilityBins(edges, torch.where(filled, conf_sum / counts.clamp_min(1), nan),
                           torch.where(filled, correct_sum / counts.clamp_min(1), nan), counts)


def ece(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> float:
    r"""Expected calibration error, top-label, equal-width bins (Guo et al., 2017):

    ``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|
          = (1/N) sum_b | sum_{i in b} (1[argmax p_i = y_i] - c_i) |``

    with the bins of :func:`reliability_bins`. 0 is perfect calibration; a finite sample of a
    calibrated predictor gives ``O(sqrt(n_bins / N))`` from binomial noise.
    """
    _, _, conf_sum, correct_sum, n = _bin_sums(probs, y, n_bins)
    return ((correct_sum - conf_sum).abs().sum() / n).item()


# --------------------------------------------------------------------------- summary

def summarize(pred: Predictive, y: torch.Tensor, likelihood_task: str | Likelihood,
              mask: torch.Tensor | None = None, levels: tuple[float, ...] = DEFAULT_LEVELS,
              n_bins: int = 15) -> dict[str, float]:
    r"""The relevant metrics of a :class:`~bayes_colora.predictive.Predictive` against targets.

    ``likelihood_task`` is ``"regression"`` or ``"classification"`` (or a likelihood, whose
    ``task`` is used).

    * regression (Gaussian predictive ``N(pred.mean, pred.total)``): ``rmse``, ``mae``, ``nll``
      (:func:`gaussian_nll`), ``calibration_error`` (:func:`quantile_calibration_error` over
      ``levels``) and ``coverage_90`` (:func:`interval_coverage` at 0.9); ``mask`` selects the
      valid elements;
    * classification (``pred.probs``): ``accuracy``, ``nll`` (:func:`categorical_nll`) and
      ``ece`` (:func:`ece` with ``n_bins``).
    """
    task = likelihood_task.task if isinstance(likelihood_task, Likelihood) else likelihood_task
    if task == "regression":
        return {"rmse": rmse(pred.mean, y, mask), "mae": mae(pred.mean, y, mask),
                "nll": gaussian_nll(pred.mean, pred.total, y, mask),
                "calibration_error": quantile_calibration_error(pred.mean, pred.total, y, levels, mask),
                "coverage_90": interval_coverage(pred.mean, pred.total, y, 0.9, mask)}
    if task == "classification":
        if pred.probs is None:
            raise ValueError("this Predictive has no class probabilities (pred.probs is None); it "
                             "comes from a regression likelihood: use likelihood_task='regression'")
        if mask is not None:
            raise ValueError("mask is supported for regression only; select the valid positions "
                             "of probs and y before calling summarize")
        return {"accuracy": accuracy(pred.probs, y), "nll": categorical_nll(pred.probs, y),
                "ece": ece(pred.probs, y, n_bins)}
    raise ValueError(f"likelihood_task must be 'regression' or 'classification' (or a "
                     f"likelihood), got {likelihood_task!r}")


# --------------------------------------------------------------------------- paired differences

def _clustered_se(diff: torch.Tensor, weight: torch.Tensor, mean: float,
                  cluster: torch.Tensor) -> float | None:
    """Linearised standard error of a weighted mean over clusters; ``None`` below 2 clusters."""
    resid = weight * (diff - mean)
    sums = torch.zeros(int(cluster.max()) + 1, dtype=diff.dtype).index_add_(0, cluster, resid)
    mass = torch.zeros_like(sums).index_add_(0, cluster, weight)
    sums = sums[mass > 0]
    g = sums.numel()
    if g < 2:
        return None
    return math.sqrt(g / (g - 1) * float(sums.pow(2).sum())) / float(weight.sum())


def paired_difference(diff: list[float | None], weight: list[float] | None = None,
                      block: int | None = None) -> dict[str, float | int | None]:
    r"""Mean of per-frame paired differences ``d_t`` (e.g. engine minus MAP on test frame ``t``)
    with two standard errors.

    With weights ``w_t`` (default 1; frames whose ``d_t`` is ``None`` get ``w_t = 0``) the mean is
    ``dbar = sum_t w_t d_t / W``, ``W = sum_t w_t``: for valid-pixel counts it is the difference of
    the pooled aggregates. Grouping the frames into clusters ``g`` of ``G`` (those with ``W_g > 0``),
    ``SE^2 = G / (G - 1) sum_g (sum_{t in g} w_t (d_t - dbar))^2 / W^2``, the linearised (ratio
    estimator) variance. With equal weights and equal clusters it is the textbook one:
    ``SE = sd(cluster means) / sqrt(G)`` (sample sd, ``G - 1``).

    * ``se_frame``: clusters of one frame (``sd(d) / sqrt(T)`` unweighted), which treats the
      frames as independent; consecutive video frames are not, so it understates the error.
    * ``se_block``: clusters of ``block`` consecutive frames (the last one possibly shorter);
      ``None`` unless ``block`` is given and there are at least ``2 block`` frames.

    Either SE is ``None`` with fewer than 2 clusters. Returns ``mean``, ``se_frame``, ``se_block``
    and ``frames`` (those with positive weight).
    """
    if block is not None and block < 1:
        raise ValueError(f"block must be a positive number of frames, got {block}")
    t = len(diff)
    w = torch.tensor([1.0] * t if weight is None else [float(v) for v in weight], dtype=torch.float64)
    if w.numel() != t:
        raise ValueError(f"{w.numel()} weights for {t} differences")
    present = torch.tensor([v is not None for v in diff], dtype=torch.bool)
    w = torch.where(present, w, torch.zeros_like(w))
    d = torch.tensor([0.0 if v is None else float(v) for v in diff], dtype=torch.float64)
    frames = int((w > 0).sum())
    if frames == 0:
        return {"mean": None, "se_frame": None, "se_block": None, "frames": 0}
    mean = float((w * d).sum() / w.sum())
    index = torch.arange(t)
    se_block = _clustered_se(d, w, mean, index // block) if block and t >= 2 * block else None
    return {"mean": mean, "se_frame": _clustered_se(d, w, mean, index), "se_block": se_block,
            "frames": frames}
