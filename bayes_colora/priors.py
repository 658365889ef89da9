r"""Priors on theta. Centred at 0: for every adapter here theta = 0 (or its initial value, for
LoRA's A factor, whose B factor starts at 0) is the pretrained model."""
from __future__ import annotations

import math
from typing import Any

import torch


class NormalPrior:
    r"""Isotropic ``theta ~ N(0, scale^2 I)``; ``scale`` a float or a length-d tensor.

    ``log p(theta) = -0.5 ||theta / scale||^2 - sum log scale - (d / 2) log 2 pi``; its precision
    (the quantity Laplace and VI use) is ``1 / scale^2``.
    """

    def __init__(self, scale: float | torch.Tensor = 1.0):
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if (scale <= 0).any() or not torch.isfinite(scale).all():
            raise ValueError(f"prior scale must be positive and finite, got {scale}")
        self.scale = scale

    @property
    def precision(self) -> torch.Tensor:
        """``1 / scale^2`` (a scalar or a length-d tensor)."""
        return self.scale ** -2

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        """``log p(theta)`` for ``theta`` of shape ``(..., d)``; returns shape ``(...)``."""
        scale = self.scale.to(theta)
        z = theta / scale
        log_norm = torch.log(scale).expand(theta.shape[-1:]).sum() + 0.5 * theta.shape[-1] * math.log(2 * math.pi)
        return -0.5 * (z ** 2).sum(-1) - log_norm

    def config(self) -> dict[str, Any]:
        return {"kind": "NormalPrior", "scale": self.scale}

    def __repr__(self) -> str:
        return f"NormalPrior(scale={self.scale.numpy() if self.scale.dim() == 0 else f'<{self.scale.numel()} values>'})"
