r"""PROD degradations: a clean image degraded by a random subset of degradations applied in a
random order (the pre-training recipe of the contribution-based CoLoRA paper, Wu et al. 2024).

Every degradation maps one image ``x`` of shape ``(C, H, W)`` with values in ``[0, 1]`` to a
degraded image of the same shape, drawing its random settings from a ``torch.Generator`` (CPU):

* ``blur``: isotropic Gaussian blur, ``k_sigma ~ U(sigma)``; kernel ``exp(-r^2 / 2 k_sigma^2)``
  normalised to sum 1, size ``2 ceil(3 k_sigma) + 1``, reflect padding.
* ``noise``: additive white Gaussian noise ``x + n``, ``n ~ N(0, s^2)``, ``s ~ U(noise)`` (on the
  ``[0, 1]`` scale: ``0.01 ... 0.1`` is 2.5 ... 25 of 255).
* ``rain``: rain streaks: sparse Bernoulli seeds (density ``~ U(rain_density)``) smeared along
  one random direction (a line kernel of length ``~ U(rain_length)``) and added with brightness
  ``~ U(rain_intensity)``, ``x + streaks`` (the additive rain model ``O = B + S`` of Yang et al. 2017).
* ``jpeg``: JPEG compression at quality ``~ U(jpeg_quality)`` (``torchvision.io.encode_jpeg`` /
  ``decode_jpeg``, 8-bit, on the CPU).
* ``motion``: motion blur: a line kernel of length ``~ U(motion_length)`` at a random angle,
  normalised to sum 1.

Results are clamped to ``[0, 1]`` after each step. :class:`PROD` picks a non-empty random subset
(each kind with probability ``p``, at least one) and applies it in a random order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

KINDS: tuple[str, ...] = ("blur", "noise", "rain", "jpeg", "motion")


def _uniform(bounds: tuple[float, float], generator: torch.Generator) -> float:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _check_image(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"degradations take one image of shape (C, H, W), got {got}; "
                         f"loop over a batch or use PROD.batch")


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 2-D filtering of ``x`` (C, H, W) by ``kernel`` (k, k), reflect padding."""
    k = kernel.shape[-1]
    c = x.shape[0]
    pad = min(k // 2, x.shape[-1] - 1, x.shape[-2] - 1)
    kernel = kernel.to(x)
    if pad < k // 2:  # image smaller than the kernel: crop the kernel to what reflect allows
        cut = k // 2 - pad
        kernel = kernel[cut:k - cut, cut:k - cut]
        kernel = kernel / kernel.sum()
    xp = F.pad(x[None], (pad,) * 4, mode="reflect")
    return F.conv2d(xp, kernel.expand(c, 1, *kernel.shape), groups=c)[0]


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised isotropic Gaussian kernel of size ``2 ceil(3 sigma) + 1``."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(t[:, None] ** 2 + t[None] ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).float()


def line_kernel(length: float, angle: float) -> torch.Tensor:
    """Normalised line kernel: a segment of ``length`` pixels through the centre at ``angle``
    (radians), drawn with bilinear weights along 4 samples per pixel."""
    r = max(1, math.ceil(length / 2))
    k = torch.zeros(2 * r + 1, 2 * r + 1, dtype=torch.float64)
    n = max(2, int(4 * length))
    for t in torch.linspace(-length / 2, length / 2, n).tolist():
        px, py = r + t * math.cos(angle), r + t * math.sin(angle)
        x0, y0 = math.floor(px), math.floor(py)
        fx, fy = px - x0, py - y0
        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                          (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            if 0 <= x0 + dx <= 2 * r and 0 <= y0 + dy <= 2 * r:
                k[y0 + dy, x0 + dx] += w
    return (k / k.sum()).float()


@dataclass
class PROD:
    """Random subset of degradations in random order; ``PROD()(x, generator)`` degrades one image.

    Args:
        kinds: the degradations to choose from (subset of :data:`KINDS`).
        p: probability of each kind being chosen (at least one always is).
        blur_sigma, noise, rain_density, rain_length, rain_intensity, jpeg_quality,
        motion_length: ranges ``(low, high)`` of the random settings (module docstring).
    """

    kinds: tuple[str, ...] = KINDS
    p: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 2.0)
    noise: tuple[float, float] = (0.01, 0.1)
    rain_density: tuple[float, float] = (0.002, 0.01)
    rain_length: tuple[float, float] = (5.0, 15.0)
    rain_intensity: tuple[float, float] = (0.3, 0.8)
    jpeg_quality: tuple[float, float] = (20.0, 80.0)
    motion_length: tuple[float, float] = (3.0, 9.0)
    _ops: dict[str, Callable] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown degradation kinds {unknown or list(self.kinds)}; choose a "
                             f"non-empty subset of {list(KINDS)}")
        if not 0 < self.p <= 1:
            raise ValueError(f"p must lie in (0, 1], got {self.p}")
        self._ops = {"blur": self.blur, "noise": self.add_noise, "rain": self.rain,
                     "jpeg": self.jpeg, "motion": self.motion_blur}

    # ------------------------------------------------------------------ single degradations
    def blur(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _filter(x, gaussian_kernel(_uniform(self.blur_sigma, generator)))

    def add_noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = _uniform(self.noise, generator)
        return x + s * torch.randn(x.shape, generator=generator).to(x)

    def rain(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        density = _uniform(self.rain_density, generator)
        length = _uniform(self.rain_length, generator)
        angle = math.pi / 2 + _uniform((-0.4, 0.4), generator)  # near-vertical streaks
        brightness = _uniform(self.rain_intensity, generator)
        seeds = (torch.rand(1, *x.shape[1:], generator=generator) < density).float().to(x)
        streaks = _filter(seeds, line_kernel(length, angle))
        streaks = streaks / streaks.max().clamp_min(1e-8) * brightness
        return x + streaks.expand_as(x)

    def jpeg(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from torchvision.io import decode_jpeg, encode_jpeg

        quality = int(round(_uniform(self.jpeg_quality, generator)))
        img = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        out = decode_jpeg(encode_jpeg(img, quality=quality))
        return out.to(device=x.device, dtype=x.dtype) / 255

    def motion_blur(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        length = _uniform(self.motion_length, generator)
        angle = _uniform((0.0, math.pi), generator)
        return _filter(x, line_kernel(length, angle))

    # ------------------------------------------------------------------ the pipeline
    def sample(self, generator: torch.Generator) -> list[str]:
        """A non-empty random subset of ``kinds`` in a random order."""
        chosen = [k for k in self.kinds if torch.rand((), generator=generator).item() < self.p]
        if not chosen:
            chosen = [self.kinds[int(torch.randint(len(self.kinds), (), generator=generator))]]
        order = torch.randperm(len(chosen), generator=generator).tolist()
        return [chosen[i] for i in order]

    def apply(self, x: torch.Tensor, kinds: list[str], generator: torch.Generator) -> torch.Tensor:
        """Apply ``kinds`` in the order given, clamping to ``[0, 1]`` after each."""
        _check_image(x)
        for kind in kinds:
            if kind not in self._ops:
                raise ValueError(f"unknown degradation {kind!r}; choose from {list(KINDS)}")
            x = self._ops[kind](x, generator).clamp(0.0, 1.0)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Degrade one image ``(C, H, W)`` in ``[0, 1]`` by a random subset in random order."""
        return self.apply(x, self.sample(generator), generator)

    def batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Degrade each image of ``(B, C, H, W)`` independently."""
        if x.dim() != 4:
            raise ValueError(f"PROD.batch takes (B, C, H, W), got {tuple(x.shape)}")
        return torch.stack([self(img, generator) for img in x])
