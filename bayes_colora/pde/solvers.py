r"""Built-in reference solver: 1-D viscous Burgers on a periodic domain, Fourier pseudo-spectral
in space, integrating-factor RK4 in time (torch, float64).

.. math::  u_t + u u_x = \nu u_{xx}, \qquad x \in [0, L) \text{ periodic}.

In Fourier space ``hat u_t = -(i k / 2) FFT(u^2) - nu k^2 hat u``. The stiff diffusion is
integrated exactly by the factor ``E = exp(-nu k^2 h / 2)``, the nonlinear term by classical RK4
(Trefethen, "Spectral methods in MATLAB", program 27 style), with the 2/3 rule against aliasing.
Error: spectral in space for smooth solutions, ``O(h^4)`` in time.

Also the Cole-Hopf closed form :func:`burgers_cole_hopf` for tests.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .data import Trajectory


def burgers_1d(u0: torch.Tensor, nu: float, t_eval: torch.Tensor, length: float = 2 * math.pi,
               dt: float = 1e-3, dealias: bool = True) -> torch.Tensor:
    """Solve Burgers from ``u0`` (``(N,)`` on the grid ``x_j = j L / N``) and return ``(T, N)``
    at the times ``t_eval`` (``t_eval[0]`` the initial time; increasing).

    Each interval between outputs is split into ``ceil(gap / dt)`` equal steps.
    """
    if u0.dim() != 1:
        raise ValueError(f"u0 has shape {tuple(u0.shape)}, expected (N,) grid values")
    if nu < 0:
        raise ValueError(f"viscosity nu must be non-negative, got {nu}")
    t_eval = torch.as_tensor(t_eval, dtype=torch.float64)
    if (t_eval.diff() <= 0).any():
        raise ValueError("t_eval must be strictly increasing")
    n = u0.numel()
    k = torch.fft.rfftfreq(n, d=length / n, dtype=torch.float64) * 2 * math.pi
    keep = (torch.arange(k.numel()) < n / 3) if dealias else torch.ones(k.numel(), dtype=torch.bool)

    def nonlinear(v: torch.Tensor) -> torch.Tensor:
        w = torch.fft.irfft(v, n=n)
        return -0.5j * k * torch.fft.rfft(w * w) * keep

    v = torch.fft.rfft(u0.to(torch.float64))
    out = [u0.to(torch.float64)]
    for gap in t_eval.diff().tolist():
        steps = max(1, math.ceil(gap / dt - 1e-9))
        h = gap / steps
        e = torch.exp(-nu * k ** 2 * h / 2)
        e2 = e * e
        for _ in range(steps):
            a = nonlinear(v)
            b = nonlinear(e * (v + h / 2 * a))
            c = nonlinear(e * v + h / 2 * b)
            d = nonlinear(e2 * v + h * e * c)
            v = e2 * v + h / 6 * (e2 * a + 2 * e * (b + c) + d)
        out.append(torch.fft.irfft(v, n=n))
    return torch.stack(out)


def burgers_cole_hopf(x: torch.Tensor, t: torch.Tensor, nu: float, a: float = 2.0) -> torch.Tensor:
    r"""Exact periodic Burgers solution from Cole-Hopf, ``(T, N)``:

    ``phi = a + exp(-nu t) cos x`` solves the heat equation ``phi_t = nu phi_xx``, so
    ``u = -2 nu phi_x / phi = 2 nu exp(-nu t) sin x / (a + exp(-nu t) cos x)`` (``a > 1``)
    solves ``u_t + u u_x = nu u_xx`` on ``[0, 2 pi)``.
    """
    if a <= 1:
        raise ValueError(f"a must exceed 1 (phi > 0), got {a}")
    decay = torch.exp(-nu * t)[:, None]
    return 2 * nu * decay * torch.sin(x) / (a + decay * torch.cos(x))


def default_initial_condition(x: torch.Tensor) -> torch.Tensor:
    """``u0(x) = 0.5 + sin x``: a wave that travels right and steepens into a viscous shock."""
    return 0.5 + torch.sin(x)


def burgers_trajectories(nus: Sequence[float], n_x: int = 128, t_end: float = 2.0, n_t: int = 41,
                         u0: Callable[[torch.Tensor], torch.Tensor] = default_initial_condition,
                         dt: float = 2e-3, progress: bool = False) -> list[Trajectory]:
    """One 1-D Burgers trajectory per viscosity on ``[0, 2 pi)``, ``n_x`` points, ``n_t`` times in
    ``[0, t_end]``; ``u`` of shape ``(n_t, n_x, 1)``, float32."""
    x = torch.arange(n_x, dtype=torch.float64) * 2 * math.pi / n_x
    t = torch.linspace(0, t_end, n_t, dtype=torch.float64)
    out = []
    for nu in tqdm(nus, desc="burgers solver", disable=not progress):
        u = burgers_1d(u0(x), float(nu), t, dt=dt)
        out.append(Trajectory(u.float()[..., None], t.float(), [x.float()], float(nu), "burgers1d"))
    return out
