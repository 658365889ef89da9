r"""The linearised (GLM) model around ``theta*``: ``f_lin(x; theta) = f(x; theta*) + J (theta - theta*)``.

``J = df(x; theta) / dtheta`` at ``theta*`` is never formed for predictions: each sample's output
is one Jacobian-vector product (``torch.func.jvp``), vectorised over samples with ``vmap``.
Under a Gaussian posterior ``N(theta*, Sigma)`` the linearised output is Gaussian with covariance
``J Sigma J^T``; :func:`output_covariance` forms it, for small outputs only.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.func import jvp, vmap

from .data import to_device
from .posterior import Posterior
from .subspace import Subspace


def linearized_outputs(sub: Subspace, theta_star: torch.Tensor, thetas: torch.Tensor, x: Any,
                       chunk_size: int | str | None = None) -> torch.Tensor:
    """``f(x; theta*) + J (theta_s - theta*)`` for ``thetas`` of shape ``(S, d)``: ``(S, B, ...)``.
    ``chunk_size`` as in :meth:`Subspace.forward` (``"auto"`` measures the fastest)."""
    f = lambda t: sub(x, theta=t)  # noqa: E731
    tangents = thetas - theta_star

    def run(chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        return vmap(lambda v: jvp(f, (theta_star,), (v,)), chunk_size=chunk)(tangents)
    out, jv = run(sub.chunk_for(chunk_size, "linearized", x, len(thetas), run))
    return out + jv


@torch.no_grad()
def output_covariance(sub: Subspace, post: Posterior, x: Any, chunk_size: int = 64) -> torch.Tensor:
    r"""``J Sigma J^T`` of the linearised model at ``post.mean`` (epistemic output covariance):
    shape ``(n, n)`` with ``n`` the number of output elements of the batch ``x`` (flattened in
    ``sub(x)``'s order). Builds ``J`` (``n x d``) from ``d`` JVPs, so use it for small outputs only;
    per-element variances of large outputs come from ``bc.predict(..., linearized=True)``.
    """
    if post.dim != sub.dim:
        raise ValueError(f"the posterior is over {post.dim} parameters, the subspace has {sub.dim}")
    x = to_device(x, sub.device)
    theta_star = post.mean.to(sub.device, sub.dtype)
    eye = torch.eye(sub.dim, dtype=sub.dtype, device=sub.device)
    f = lambda t: sub(x, theta=t)  # noqa: E731
    jt = torch.cat([vmap(lambda v: jvp(f, (theta_star,), (v,))[1])(eye[s:s + chunk_size]).flatten(1)
                    for s in range(0, sub.dim, chunk_size)])  # J^T, (d, n)
    cov = post.covariance.to(jt)
    return jt.mT @ cov @ jt
