r"""Per-pixel likelihoods for depth maps, with invalid pixels masked out.

The network output for a batch is ``(B, 1, H, W)`` (the location ``mu`` of every pixel) or, when
heteroscedastic, ``(B, 2, H, W)``: channel 0 is ``mu``, channel 1 is ``s = log v``, the
log-*variance* of the noise in the likelihood's space. Targets are depth maps ``(B, 1, H, W)``
in metres; a pixel is *valid* when its depth is finite and ``> min_depth`` (sensor holes are
stored as 0 or NaN). Only valid pixels enter ``log_prob``; the network output at an invalid pixel
has no effect on it (nor on its gradient).

Two noise families, both parametrised by their variance ``v`` (``v = sigma^2`` when
homoscedastic, so ``sigma`` is always a standard deviation):

* ``dist="gaussian"``: ``N(mu, v)``;
* ``dist="laplace"``: ``Laplace(mu, b)`` with scale ``b = sqrt(v / 2)`` (variance ``2 b^2 = v``),
  ``log p = -|z - mu| / b - log 2b``.

Two spaces:

* ``space="depth"``: the noise acts on the depth ``y`` itself, ``y ~ D(mu, v)``;
* ``space="log"``: it acts on ``z = log y`` (``mu`` is a log-depth). ``log_prob`` stays a density
  of *depth*: ``log p(y) = log p_Z(log y) - log y`` (the Jacobian ``|dz/dy| = 1/y``), so values of
  both spaces are comparable. The Gaussian case is the log-normal.

``moments`` turn sampled outputs ``(S, B, C, H, W)`` into depth-space predictive moments per pixel,
``(B, 1, H, W)`` each. With ``m_s`` and ``u_s`` the depth mean and variance given sample ``s``:
``mean = E_s m_s``, ``aleatoric = E_s u_s``, ``epistemic = Var_s m_s`` (population variance), and
``total`` their sum. In depth space ``m_s = mu_s``, ``u_s = v_s``. In log space the Gaussian gives
the log-normal moments ``m = exp(mu + v/2)``, ``u = (exp(v) - 1) exp(2 mu + v)``. The log-Laplace
has ``E[y] = e^mu / (1 - b^2)`` (``b < 1``) and ``E[y^2] = e^{2 mu} / (1 - 4 b^2)`` (``b < 1/2``):
its right tail falls as a power ``y^{-1 - 1/b}``, so its variance is *infinite* for ``v >= 1/2``.
To keep uncertainty maps finite, the log-space Laplace is moment-matched to the log-normal with the
same log-space mean ``mu`` and variance ``v`` (agreeing with the exact log-Laplace mean to
``O(b^4)``: ``e^{mu + b^2}`` against ``e^mu (1 + b^2 + b^4 + ...)``).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..likelihoods import NoiseScaled, mixture_moments

_DISTS = ("gaussian", "laplace")
_SPACES = ("depth", "log")
#: bounds on the log-variance channel, as in ``bc.Gaussian`` (keeps exp finite in float32)
_LOG_VAR_CLAMP = 30.0


class DepthLikelihood(NoiseScaled):
    r"""Gaussian or Laplace noise per valid pixel of a depth map, in depth or log-depth space.

    Args:
        dist: ``"gaussian"`` or ``"laplace"``.
        space: ``"depth"`` (noise on ``y``) or ``"log"`` (noise on ``log y``; ``log_prob``
            includes the Jacobian ``-log y``, so it is a density of depth).
        sigma: the noise standard deviation (in the likelihood's space) when homoscedastic; the
            initial value when ``learn_sigma``. A Laplace has scale ``b = sigma / sqrt 2``.
        learn_sigma: learn one ``sigma`` (stored as ``log sigma``, trained by ``fit_map``).
        heteroscedastic: the network outputs two channels, ``mu`` and ``log v``.
        min_depth: pixels with depth ``<= min_depth`` or non-finite are invalid (default 1e-3 m;
            0 keeps every positive depth).

    ``log_prob(out, y)`` is ``sum over valid pixels of log p(y_pixel | out_pixel)`` per example,
    shape ``out.shape[:-3]`` (leading sample axes broadcast against ``y`` of shape
    ``(B, 1, H, W)``).
    """

    task = "regression"

    def __init__(self, dist: str = "gaussian", space: str = "depth", sigma: float = 1.0,
                 learn_sigma: bool = False, heteroscedastic: bool = False, min_depth: float = 1e-3):
        super().__init__()
        if dist not in _DISTS:
            raise ValueError(f"dist must be one of {_DISTS}, got {dist!r}")
        if space not in _SPACES:
            raise ValueError(f"space must be one of {_SPACES}, got {space!r}")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive float (a standard deviation), got {sigma!r}")
        if not (isinstance(min_depth, (int, float)) and math.isfinite(min_depth) and min_depth >= 0):
            raise ValueError(f"min_depth must be a finite float >= 0, got {min_depth!r}")
        self.dist, self.space = dist, space
        self.min_depth = float(min_depth)
        self._init_noise(torch.tensor(float(sigma)), learn_sigma, heteroscedastic)

    @property
    def channels(self) -> int:
        """Output channels the network must produce: 2 when heteroscedastic, else 1."""
        return 2 if self.heteroscedastic else 1

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, v)`` per pixel, each ``(..., 1, H, W)``, from an output ``(..., C, H, W)``:
        the location and the noise variance in the likelihood's space."""
        if out.dim() < 4 or out.shape[-3] != self.channels:
            raise ValueError(f"DepthLikelihood(heteroscedastic={self.heteroscedastic}) needs network "
                             f"outputs of shape (B, {self.channels}, H, W), got {tuple(out.shape)}")
        mu = out.narrow(-3, 0, 1)
        if self.heteroscedastic:
            return mu, out.narrow(-3, 1, 1).clamp(-_LOG_VAR_CLAMP, _LOG_VAR_CLAMP).exp()
        return mu, (self.sigma ** 2).to(out).expand_as(mu)

    def mean_output(self, out: torch.Tensor) -> torch.Tensor:
        """Channel 0, the location ``mu`` (a log-depth when ``space="log"``), ``(B, 1, H, W)``."""
        return self.split(out)[0]

    def valid(self, y: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the valid target pixels: finite and ``> min_depth``."""
        return torch.isfinite(y) & (y > self.min_depth)

    def check_target(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming both shapes unless ``y`` is ``(B, 1, H, W)`` for an
        output ``(B, C, H, W)`` with the right number ``C`` of channels."""
        self.split(out)
        super().check_target(out, y)

    def log_prob(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""``sum_{valid pixels} log p(y | out)`` per example, shape ``out.shape[:-3]``."""
        valid = self.valid(y)
        # placeholders at invalid pixels keep every term finite, so their zero weight gives zero
        # gradient (also to a shared learned sigma) even for a NaN/0 target or an inf output
        y = torch.where(valid, y, torch.ones_like(y))
        mu, var = self.split(torch.where(valid, out, torch.zeros_like(out)))
        z = y.log() if self.space == "log" else y
        if self.dist == "gaussian":
            elem = -0.5 * ((z - mu) ** 2 / var + var.log() + math.log(2 * math.pi))
        else:
            b = (var / 2).sqrt()
            elem = -(z - mu).abs() / b - (2 * b).log()
        if self.space == "log":
            elem = elem - z  # Jacobian of z = log y: p(y) = p_Z(log y) / y
        elem = torch.where(valid, elem, torch.zeros_like(elem))
        return elem.reshape(*elem.shape[:-3], -1).sum(-1)

    def fisher_diag(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""The Fisher information per output element, the GGN's ``Lambda`` (diagonal here):
        shape ``out.shape``, zero at invalid pixels.

        For the location ``mu``: ``1 / v`` (Gaussian) and ``1 / b^2 = 2 / v`` (Laplace; its
        log-density has zero curvature almost everywhere, so the Fisher, not the Hessian, is the
        useful curvature). For the log-variance channel ``s = log v``: ``1 / 2`` (Gaussian) and
        ``1 / 4`` (Laplace: ``d log p / ds = (|e| / b - 1) / 2`` with ``|e| / b ~ Exp(1)``, of
        variance 1). The cross terms vanish by symmetry. In log space the same holds for ``log y``.
        """
        valid = self.valid(y).to(out.dtype)
        mu, var = self.split(out.detach())
        location = (2.0 if self.dist == "laplace" else 1.0) / var * valid
        if not self.heteroscedastic:
            return location
        scale = (0.25 if self.dist == "laplace" else 0.5) * valid
        return torch.cat([location, scale.expand_as(location)], dim=-3)

    def output_precision(self, out: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``Lambda v`` with the Fisher :meth:`fisher_diag` (used by ``bc.fit_laplace``)."""
        return self.fisher_diag(out, y) * v

    def output_precision_sqrt(self, out: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``Lambda^{1/2} z`` (``Lambda`` is diagonal), for the Monte-Carlo GGN diagonal."""
        return self.fisher_diag(out, y).sqrt() * z

    def depth_moments(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth-space mean and variance given one output ``(..., C, H, W)``, ``(..., 1, H, W)``
        each (the log-normal moments in log space, for both families; see the module notes)."""
        mu, var = self.split(out)
        if self.space == "depth":
            return mu, var
        mean = (mu + var / 2).exp()
        return mean, var.expm1() * mean ** 2

    def moments(self, outs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictive depth moments per pixel from outputs ``(S, B, C, H, W)``: ``mean``,
        ``aleatoric``, ``epistemic``, ``total``, each ``(B, 1, H, W)``."""
        return mixture_moments(*self.depth_moments(outs))

    def config(self) -> dict[str, Any]:
        sigma = 1.0 if self.heteroscedastic else float(self.sigma.detach())
        return {"kind": "DepthLikelihood", "module": type(self).__module__, "dist": self.dist,
                "space": self.space, "sigma": sigma,
                "learn_sigma": self.learn_sigma, "heteroscedastic": self.heteroscedastic,
                "min_depth": self.min_depth}

    def extra_repr(self) -> str:
        noise = "heteroscedastic" if self.heteroscedastic else \
            f"sigma={float(self.sigma.detach()):.4g}, learn_sigma={self.learn_sigma}"
        return f"dist={self.dist!r}, space={self.space!r}, {noise}, min_depth={self.min_depth}"
