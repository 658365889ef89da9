r"""Equation-driven online phase: Neural Galerkin time stepping of the online coordinates.

With the field ``u(x; alpha)`` (``alpha`` in R^d) and ``u_t = f(x, u)``, the residual
``|| J(alpha) alpha' - f(x, u(x; alpha)) ||^2`` over the points ``x_1..x_N`` is minimised by

.. math::  M(\alpha) \dot\alpha = F(\alpha), \qquad
           M = \frac1N \sum_i J_i^T J_i, \qquad F = \frac1N \sum_i J_i^T f(x_i, u(x_i; \alpha)),

``J_i = d u(x_i; alpha) / d alpha`` (``Q x d``), computed by forward-mode differentiation
(``d`` JVPs). ``M`` is solved in float64 with a Tikhonov shift ``reg * trace(M) / d``. The ODE
is integrated by an explicit Runge-Kutta scheme with a fixed step (Bruna, Peherstorfer &
Vanden-Eijnden, "Neural Galerkin schemes", 2024; Berman & Peherstorfer, CoLoRA, 2024).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.func import jacfwd
from tqdm.auto import tqdm

from .equations import Equation

#: explicit Runge-Kutta tableaus: (a rows, b weights, c nodes)
TABLEAUS: dict[str, tuple[list[list[float]], list[float], list[float]]] = {
    "euler": ([[]], [1.0], [0.0]),
    "heun": ([[], [1.0]], [0.5, 0.5], [0.0, 1.0]),
    "rk4": ([[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6], [0.0, 0.5, 0.5, 1.0]),
}

FieldFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def galerkin_system(field: FieldFn, equation: Equation, alpha: torch.Tensor,
                    x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, F)`` of the module docstring at ``alpha`` ``(d,)``: ``(d, d)`` and ``(d,)``.

    ``field(x, alpha)`` maps ``(N, D)`` points and ``(d,)`` coordinates to ``(N, Q)`` values.
    """
    with torch.enable_grad():
        jac = jacfwd(lambda a: field(x, a))(alpha.detach())          # (N, Q, d)
        _, f = equation.rhs(x, lambda pts: field(pts, alpha.detach()))
    jac = jac.reshape(-1, alpha.numel()).double()
    f = f.detach().reshape(-1).double()
    n = x.shape[0]
    return jac.T @ jac / n, jac.T @ f / n


def galerkin_velocity(field: FieldFn, equation: Equation, alpha: torch.Tensor, x: torch.Tensor,
                      reg: float = 1e-8) -> torch.Tensor:
    """``alpha' = M^{-1} F``, ``(d,)`` in ``alpha``'s dtype."""
    m, f = galerkin_system(field, equation, alpha, x)
    shift = reg * torch.diagonal(m).sum() / m.shape[0]
    m = m + shift * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return torch.linalg.solve(m, f).to(alpha)


def neural_galerkin(field: FieldFn, equation: Equation, alpha0: torch.Tensor, x: torch.Tensor,
                    t_eval: torch.Tensor, dt: float, scheme: str = "rk4", reg: float = 1e-8,
                    progress: bool = True) -> torch.Tensor:
    """Integrate ``M(alpha) alpha' = F(alpha)`` from ``alpha0`` at ``t_eval[0]``.

    Args:
        field: ``(x (N, D), alpha (d,)) -> (N, Q)``, e.g. ``lambda x, a: sub(x, theta=a)``.
        equation: the right-hand side, :mod:`.equations`.
        alpha0: ``(d,)``, the coordinates at ``t_eval[0]``.
        x: ``(N, D)`` collocation points.
        t_eval: ``(T,)`` increasing output times.
        dt: the largest step; each output interval is split into ``ceil(gap / dt)`` equal steps.
        scheme: ``"euler"``, ``"heun"`` or ``"rk4"``.
        reg: relative Tikhonov shift of ``M``.
        progress: tqdm bar over the steps.

    Returns:
        ``(T, d)``: the coordinates at ``t_eval``.
    """
    if scheme not in TABLEAUS:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {sorted(TABLEAUS)}")
    if alpha0.dim() != 1:
        raise ValueError(f"alpha0 has shape {tuple(alpha0.shape)}, expected (d,)")
    if dt <= 0:
        raise ValueError(f"dt must be positive, got {dt}")
    a_rows, b, _ = TABLEAUS[scheme]
    gaps = torch.as_tensor(t_eval, dtype=torch.float64).diff().tolist()
    if any(g <= 0 for g in gaps):
        raise ValueError("t_eval must be strictly increasing")
    n_steps = [max(1, math.ceil(g / dt - 1e-9)) for g in gaps]
    alpha = alpha0.detach().clone()
    out = [alpha.clone()]
    bar = tqdm(total=sum(n_steps), desc=f"galerkin {scheme}", disable=not progress, unit="step")
    for gap, steps in zip(gaps, n_steps):
        h = gap / steps
        for _ in range(steps):
            ks: list[torch.Tensor] = []
            for row in a_rows:
                stage = alpha + h * sum((a * k for a, k in zip(row, ks)), torch.zeros_like(alpha))
                ks.append(galerkin_velocity(field, equation, stage, x, reg))
            alpha = alpha + h * sum(w * k for w, k in zip(b, ks))
            if not torch.isfinite(alpha).all():
                raise ValueError(f"the Galerkin solution blew up near t = {float(t_eval[len(out) - 1]) + h}; "
                                 f"lower dt or raise reg")
            bar.update(1)
        out.append(alpha.clone())
    bar.close()
    return torch.stack(out)
