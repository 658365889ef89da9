r"""Right-hand sides ``f(x, u)`` of ``u_t = f(x, u)`` evaluated on a neural field.

``rhs(x, u_fn)`` takes points ``x`` ``(N, D)`` and a field ``u_fn: (N, D) -> (N, Q)`` that acts
point-wise (row ``i`` of the output depends only on row ``i`` of ``x``), and returns
``(u, f)``, both ``(N, Q)``. Spatial derivatives are exact derivatives of the field by automatic
differentiation: because the field acts point-wise, the gradient of ``sum_i u_q(x_i)`` with
respect to ``x`` is ``grad u_q`` at every point.

* :class:`Burgers1D`: ``u_t = -u u_x + nu u_xx``.
* :class:`Burgers2D`: ``u_t = -u (u_x + u_y) + nu (u_xx + u_yy)``, the equation of the 2-D
  Burgers data set (a least-squares fit of finite differences of the ``mu = 0.00793`` file gives
  coefficients ``-1.000, -1.000, 0.00794``).
* :class:`RDE`: the rotating detonation model of Koch et al. (Phys. Rev. E 101, 013106, 2020),

  .. math::
     u_t &= -u u_x + q (1 - \lambda) \omega(u) + \nu u_{xx} - \epsilon u^2, \\
     \lambda_t &= (1 - \lambda) \omega(u) - \beta(u) \lambda + \nu \lambda_{xx},

  ``omega(u) = k exp((u - u_c) / a)``, ``beta(u) = s u_p / (1 + exp(r (u - u_p)))``, with the
  physics parameter ``mu = s``. The constants default to Koch et al.'s; the data set's files do
  not store theirs, so this right-hand side is not checked against the RDE data.
"""
from __future__ import annotations

from typing import Callable

import torch

Field = Callable[[torch.Tensor], torch.Tensor]


def gradient(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``d y_i / d x_i`` for a point-wise ``y`` ``(N,)`` of ``x`` ``(N, D)``: ``(N, D)``, kept
    differentiable (``create_graph``) for higher derivatives; zero where ``y`` does not depend
    on ``x``."""
    if not y.requires_grad:
        return torch.zeros_like(x)
    return torch.autograd.grad(y.sum(), x, create_graph=True, materialize_grads=True)[0]


class Equation:
    """Base class: ``dim`` spatial dimensions, ``fields`` unknowns, ``rhs(x, u_fn) -> (u, f)``."""

    dim = 1
    fields = 1

    def derivatives(self, x: torch.Tensor, u_fn: Field) -> tuple[torch.Tensor, list, list]:
        """``u`` ``(N, Q)``, first derivatives ``[(N, D)] * Q`` and Laplacians ``[(N,)] * Q``."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (N, {self.dim}) for "
                             f"{type(self).__name__}")
        x = x.detach().requires_grad_(True)
        u = u_fn(x)
        if u.shape != (x.shape[0], self.fields):
            raise ValueError(f"the field returned shape {tuple(u.shape)}, expected "
                             f"({x.shape[0]}, {self.fields}) for {type(self).__name__}")
        grads, laps = [], []
        for q in range(self.fields):
            g = gradient(u[:, q], x)
            grads.append(g)
            laps.append(sum(gradient(g[:, d], x)[:, d] for d in range(self.dim)))
        return u, grads, laps

    def rhs(self, x: torch.Tensor, u_fn: Field) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class Burgers1D(Equation):
    """``u_t = -u u_x + nu u_xx``."""

    def __init__(self, nu: float):
        self.nu = float(nu)

    def rhs(self, x: torch.Tensor, u_fn: Field) -> tuple[torch.Tensor, torch.Tensor]:
        u, (g,), (lap,) = self.derivatives(x, u_fn)
        return u, (-u[:, 0] * g[:, 0] + self.nu * lap)[:, None]


class Burgers2D(Equation):
    """``u_t = -u (u_x + u_y) + nu (u_xx + u_yy)``."""

    dim = 2

    def __init__(self, nu: float):
        self.nu = float(nu)

    def rhs(self, x: torch.Tensor, u_fn: Field) -> tuple[torch.Tensor, torch.Tensor]:
        u, (g,), (lap,) = self.derivatives(x, u_fn)
        return u, (-u[:, 0] * g.sum(-1) + self.nu * lap)[:, None]


class RDE(Equation):
    """Rotating detonation model (module docstring); fields ``(u, lambda)``, ``mu = s``."""

    fields = 2

    def __init__(self, s: float, q: float = 1.0, k: float = 1.0, u_c: float = 1.1, a: float = 0.3,
                 u_p: float = 0.5, r: float = 5.0, nu: float = 0.0075, eps: float = 0.15):
        self.s, self.q, self.k, self.u_c, self.a = float(s), q, k, u_c, a
        self.u_p, self.r, self.nu, self.eps = u_p, r, nu, eps

    def rhs(self, x: torch.Tensor, u_fn: Field) -> tuple[torch.Tensor, torch.Tensor]:
        w, (gu, _), (lap_u, lap_l) = self.derivatives(x, u_fn)
        u, lam = w[:, 0], w[:, 1]
        omega = self.k * torch.exp((u - self.u_c) / self.a)
        beta = self.s * self.u_p / (1 + torch.exp(self.r * (u - self.u_p)))
        fu = -u * gu[:, 0] + self.q * (1 - lam) * omega + self.nu * lap_u - self.eps * u ** 2
        fl = (1 - lam) * omega - beta * lam + self.nu * lap_l
        return w, torch.stack([fu, fl], -1)


EQUATIONS = {"burgers1d": Burgers1D, "burgers": Burgers2D, "burgers2d": Burgers2D, "rde": RDE}


def equation_for(name: str, mu: float) -> Equation:
    """The right-hand side for an equation name (a file's ``equation`` attribute) at ``mu``."""
    if name not in EQUATIONS:
        raise ValueError(f"no right-hand side for equation {name!r}; known: {sorted(EQUATIONS)}")
    return EQUATIONS[name](mu)

