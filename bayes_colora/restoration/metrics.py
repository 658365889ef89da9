r"""Restoration metrics: PSNR and SSIM of the restored image, and how well a per-pixel
uncertainty ranks the actual errors.

PSNR and SSIM come from torchmetrics (``data_range = 1``, SSIM with its default 11x11 Gaussian
window, sigma 1.5), per image, averaged over images. For the uncertainty, per pixel

.. math::  e = \sqrt{\tfrac1C \sum_c (\hat y_c - y_c)^2}, \qquad
           u = \sqrt{\tfrac1C \sum_c \sigma^2_c},

and the sparsification curves remove the pixels with the largest ``u`` and report the RMSE of
the rest (``reduce="rms"``); ``AUSE`` and ``AURG`` are those of :mod:`bayes_colora.metrics`
(:func:`~bayes_colora.metrics.ause`, :func:`~bayes_colora.metrics.aurg`), per image, averaged.
"""
from __future__ import annotations

import torch

from .. import metrics as M
from ..predictive import Predictive


def _pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"restored images {tuple(pred.shape)} and targets {tuple(target.shape)} must "
                         f"both have shape (B, C, H, W)")
    return pred.float(), target.float()


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over images of ``10 log10(1 / MSE)`` (images in ``[0, 1]``; ``pred`` is clamped)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    pred, target = _pair(pred, target)
    return peak_signal_noise_ratio(pred.clamp(0, 1), target, data_range=1.0, reduction="elementwise_mean",
                                   dim=(1, 2, 3)).item()


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM over images (torchmetrics, ``data_range = 1``; ``pred`` is clamped)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, target = _pair(pred, target)
    return structural_similarity_index_measure(pred.clamp(0, 1), target, data_range=1.0).item()


def pixel_error_and_uncertainty(mean: torch.Tensor, var: torch.Tensor, target: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel RMS error over channels and RMS predictive std over channels, ``(B, H, W)`` each."""
    mean, target = _pair(mean, target)
    if var.shape != mean.shape:
        raise ValueError(f"variance shape {tuple(var.shape)} does not match the mean's {tuple(mean.shape)}")
    return (mean.clamp(0, 1) - target).pow(2).mean(1).sqrt(), var.float().mean(1).sqrt()


def evaluate_restoration(pred: Predictive, target: torch.Tensor) -> dict[str, float]:
    """PSNR, SSIM, Gaussian NLL per element (of ``N(pred.mean, pred.total)``), ``ause`` /
    ``aurg`` (RMSE sparsification) of the per-pixel total std against the actual error, and the
    AURG of each part of the total alone: ``aurg_aleatoric`` (the std from
    ``pred.aleatoric``) and ``aurg_epistemic`` (from ``pred.epistemic``; 0 for a point
    estimate: a constant ranks like chance). All use the same error, that of ``pred.mean``."""
    error, unc = pixel_error_and_uncertainty(pred.mean, pred.total, target)
    aleatoric = pixel_error_and_uncertainty(pred.mean, pred.aleatoric, target)[1]
    epistemic = pixel_error_and_uncertainty(pred.mean, pred.epistemic, target)[1]
    return {"psnr": psnr(pred.mean, target), "ssim": ssim(pred.mean, target),
            "nll": M.gaussian_nll(pred.mean.float(), pred.total.float(), target.float()),
            "ause": M.ause(error, unc, reduce="rms"), "aurg": M.aurg(error, unc, reduce="rms"),
            "aurg_aleatoric": M.aurg(error, aleatoric, reduce="rms"),
            "aurg_epistemic": M.aurg(error, epistemic, reduce="rms")}
