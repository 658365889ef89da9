r"""Per-pixel predictive depth and its uncertainty maps, from any posterior over theta.

``predict_depth`` is :func:`bayes_colora.predict` for depth maps: with ``S`` samples
``theta_s ~ q(theta)`` evaluated in one vectorised call, the likelihood's ``moments`` give per
pixel the predictive mean and the law-of-total-variance split
``total = aleatoric (E_s Var[y | theta_s]) + epistemic (Var_s E[y | theta_s])``, returned here as
standard deviations: ``total_std^2 = aleatoric_std^2 + epistemic_std^2``.

When every adapter sits in the decoder of a :class:`~bayes_colora.depth.models.DepthNet`, the
encoder sees no theta and runs once per image for all ``S`` samples (``vmap`` leaves
computations that depend on no batched tensor unbatched); with ``chunk_size`` it runs once per
chunk of samples.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..likelihoods import Likelihood
from ..posterior import Posterior
from ..predictive import predict
from ..subspace import Subspace


@dataclass
class DepthPrediction:
    """Predictive depth maps, each ``(B, 1, H, W)``: the mean and three standard deviations."""

    mean: torch.Tensor
    aleatoric_std: torch.Tensor
    epistemic_std: torch.Tensor
    total_std: torch.Tensor

    def to(self, device: torch.device | str) -> "DepthPrediction":
        return DepthPrediction(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def predict_depth(sub: Subspace, post: Posterior, images: torch.Tensor, n_samples: int = 32,
                  generator: torch.Generator | None = None, chunk_size: int | None = None,
                  likelihood: Likelihood | None = None, linearized: bool = False) -> DepthPrediction:
    """Predictive depth mean and aleatoric / epistemic / total standard deviation per pixel.

    Args:
        sub: a subspace over a depth network whose output is ``(B, 1 or 2, H, W)``.
        post: any posterior over ``sub``'s theta; a Dirac posterior has ``epistemic_std = 0``.
        images: RGB images ``(B, 3, H, W)``.
        n_samples: S, the number of posterior samples.
        generator: for reproducible samples.
        chunk_size: evaluate at most this many samples at once (memory).
        likelihood: defaults to the posterior's; a per-pixel one whose predictive mean is
            ``(B, 1, H, W)`` (a depth likelihood, or ``bc.Gaussian(heteroscedastic=True, dim=1)``
            for a two-channel model).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"predict_depth expects images of shape (B, 3, H, W), got {got}")
    pred = predict(sub, post, images, n_samples=n_samples, likelihood=likelihood,
                   generator=generator, chunk_size=chunk_size, linearized=linearized)
    want = (images.shape[0], 1, *images.shape[-2:])
    if tuple(pred.mean.shape) != want:
        raise ValueError(f"the predictive mean has shape {tuple(pred.mean.shape)}, expected a depth "
                         f"map {want}: use a per-pixel likelihood that reads the depth (and "
                         f"log-variance) channels, e.g. bc.Gaussian(heteroscedastic=True, dim=1) "
                         f"for a model with aleatoric=True")
    return DepthPrediction(mean=pred.mean, aleatoric_std=pred.aleatoric.clamp_min(0).sqrt(),
                           epistemic_std=pred.epistemic.clamp_min(0).sqrt(),
                           total_std=pred.total.clamp_min(0).sqrt())
