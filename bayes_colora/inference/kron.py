r"""Kronecker-factored (KFAC) generalised Gauss-Newton curvature in theta-space.

The GGN of the data term is ``G = sum_i J_i^T Lambda_i J_i`` (see :mod:`.ggn`). KFAC keeps only its
diagonal blocks, one per parameter, and approximates the block of a parameter ``P`` of shape
``(m, n)`` that enters the network as a linear map ``s_l = P a_l``, applied at locations ``l``
(examples, tokens, pixels) to inputs ``a_l`` (``n``), by a Kronecker product
(``P`` flattened row-major, as in theta):

.. math::  G_P \approx H \otimes Q, \qquad H = \sum_l \mathbb{E}_z[g_l g_l^T] \;(m \times m),
           \qquad Q = \frac{1}{L} \sum_l a_l a_l^T \;(n \times n),

where ``g_l = (d f / d s_l)^T L z`` is the gradient of ``f^T L z`` at ``s_l``, ``L L^T = Lambda``
(:func:`.ggn.output_precision_sqrt`) and ``z`` a Rademacher vector in output space, so
``E_z[g_l g_l^T] = (d f / d s_l)^T Lambda (d f / d s_l)``: exactly the GGN's output block at
location ``l``. ``L`` is the number of locations in the whole data set. This is the *expand*
convention of Eschenhagen et al. (2023): every location counts as an example, output gradients are
summed and inputs averaged, which agrees with laplace-torch's ``KronLaplace`` (curvlinops'
``KFACLinearOperator``: gradient factor a sum, input factor divided by ``N x locations per
example``; laplace-torch sums the factors of equal-sized batches, giving the same product). For one
location (one example, one token) the Kronecker product is exact. The Monte-Carlo average over
``probes`` Rademacher vectors is unbiased; with one output per example it is exact (``z^2 = 1``).

Which parameters have factors is for the adapter layer to say, not for this engine: a module of
the subspace that defines ``kfac_parameters()``, ``kfac_input_factors(x, params)`` and
``kfac_grad_factors(grad_out, params)`` (:class:`KroneckerFactored`; ``LoRALinear`` and
``LoRAConv`` on ``nn.Conv2d`` do) gets forward hooks that record its input and a tensor hook on its
output that records the output gradient. Every other theta entry (BitFit, DiffFit, CoLoRA conv
factors, Tucker, transposed or grouped conv LoRA, plain parameters) gets a diagonal block: the
unbiased estimate ``(1 / probes) sum_j (J^T L z_j)^2`` from the same backward passes (the estimate
of ``ggn_diag(..., probes=probes)``; exact for one example per batch with one output).

Cost per batch: one forward and ``probes`` backward passes (``torch.autograd``, graph kept between
probes), plus the factor products, ``O(L (m^2 + n^2))`` per parameter. Memory: ``m^2 + n^2`` per
parameter, never ``d^2``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..likelihoods import Categorical, Gaussian, Likelihood
from ..subspace import Subspace
from .ggn import output_precision_sqrt
from .objective import batches


@runtime_checkable
class KroneckerFactored(Protocol):
    """What an adapter layer defines to get Kronecker-factored curvature for its parameters.

    ``params`` maps the layer's own parameter names to their values at the linearisation point
    (the layer's attributes may hold other values while theta is passed functionally).
    """

    def kfac_parameters(self) -> tuple[str, ...]:
        """Names of the layer's own parameters (2-D, ``(m, n)``) that have Kronecker factors."""

    def kfac_input_factors(self, x: torch.Tensor, params: Mapping[str, torch.Tensor],
                           ) -> dict[str, tuple[torch.Tensor, int]]:
        """``{name: (sum_l a_l a_l^T (n x n), number of locations)}`` for the layer input ``x``."""

    def kfac_grad_factors(self, grad_out: torch.Tensor, params: Mapping[str, torch.Tensor],
                          ) -> dict[str, torch.Tensor]:
        """``{name: sum_l g_l g_l^T (m x m)}`` for the gradient ``grad_out`` of the layer output."""


@dataclass
class KronBlock:
    """The factors of one parameter: ``G_P ~ grad_factor kron input_factor``."""

    #: qualified parameter name (as in ``sub.param_names``)
    name: str
    #: index of the parameter's first entry in theta
    offset: int
    #: ``H``, ``(m, m)``: summed output-gradient outer products (Monte-Carlo mean over probes)
    grad_factor: torch.Tensor
    #: ``Q``, ``(n, n)``: mean input outer product over all locations
    input_factor: torch.Tensor

    @property
    def size(self) -> int:
        """``m n``, the number of theta entries of the block."""
        return self.grad_factor.shape[0] * self.input_factor.shape[0]


@dataclass
class KronGGN:
    """A block-diagonal GGN: Kronecker blocks and a diagonal for the remaining entries."""

    blocks: list[KronBlock]
    #: positions in theta of the entries without Kronecker factors, ``(k,)``
    diag_index: torch.Tensor
    #: their GGN diagonal (Monte-Carlo estimate), ``(k,)``
    diag: torch.Tensor
    #: ``log p(D | theta)`` (float64)
    log_lik: torch.Tensor
    #: d
    dim: int

    def dense(self) -> torch.Tensor:
        """The ``d x d`` block-diagonal matrix (for small ``d``: tests, comparisons)."""
        out = torch.zeros(self.dim, self.dim, dtype=self.diag.dtype, device=self.diag.device)
        for b in self.blocks:
            s = slice(b.offset, b.offset + b.size)
            out[s, s] = torch.kron(b.grad_factor, b.input_factor)
        out[self.diag_index, self.diag_index] = self.diag
        return out


def kron_layers(sub: Subspace) -> list[tuple[nn.Module, dict[str, str]]]:
    """The modules of ``sub`` with Kronecker factors, each with ``{own name: qualified name}`` for
    every parameter it factors (those in theta and any frozen ones)."""
    trainable = set(sub.param_names)
    found = []
    for prefix, module in sub.model.named_modules():
        if not isinstance(module, KroneckerFactored):
            continue
        names = {p: f"{prefix}.{p}" if prefix else p for p in module.kfac_parameters()}
        if any(q in trainable for q in names.values()):
            found.append((module, names))
    return found


def ggn_kron(sub: Subspace, loader: Iterable, lik: Likelihood, theta: torch.Tensor,
             probes: int | None = None, progress: bool = False,
             generator: torch.Generator | None = None) -> KronGGN:
    r"""The KFAC GGN of the data in ``loader`` at ``theta`` (module docstring).

    Args:
        sub, loader, lik, theta: as for :func:`.ggn.ggn_full`.
        probes: Rademacher probes per batch (``None``: 1). The Kronecker gradient factors and the
            diagonal entries are Monte-Carlo means over them; variance falls as ``1 / probes``.
        progress: a tqdm bar over batches.
        generator: for the probes (on its own device).

    Returns:
        a :class:`KronGGN` whose blocks follow theta's order.
    """
    probes = 1 if probes is None else probes
    if int(probes) != probes or probes < 1:
        raise ValueError(f"diag_probes (the probes per batch for hessian='kron') must be a positive "
                         f"integer or None, got {probes!r}")
    probes = int(probes)
    _check_sqrt(lik)
    offsets, start = {}, 0
    for name, numel in zip(sub.param_names, sub.param_numels):
        offsets[name] = start
        start += numel
    layers = kron_layers(sub)
    shapes = dict(zip(sub.param_names, sub.param_shapes))
    factored = [q for _, names in layers for q in names.values() if q in offsets]
    for q in factored:
        if len(shapes[q]) != 2:
            raise ValueError(f"{q}: Kronecker factors need a 2-D parameter, it has shape {tuple(shapes[q])}")
    opts = {"dtype": theta.dtype, "device": theta.device}
    grad_sums = {q: torch.zeros(shapes[q][0], shapes[q][0], **opts) for q in factored}
    input_sums = {q: torch.zeros(shapes[q][1], shapes[q][1], **opts) for q in factored}
    locations = dict.fromkeys(factored, 0)
    in_kron = torch.zeros(theta.shape[0], dtype=torch.bool, device=theta.device)
    for q in factored:
        in_kron[offsets[q]:offsets[q] + shapes[q].numel()] = True
    diag_index = (~in_kron).nonzero().squeeze(1)
    diag = torch.zeros(diag_index.shape[0], **opts)
    log_lik = torch.zeros((), dtype=torch.float64, device=theta.device)
    pieces = sub.unflatten(theta.detach())

    def forward_hook(module: nn.Module, names: dict[str, str]) -> Callable[..., None]:
        """Records ``module``'s input factors, and hooks its output for the gradient factors."""
        params = {p: pieces[q] if q in pieces else getattr(module, p).detach() for p, q in names.items()}
        kept = {p: q for p, q in names.items() if q in offsets}  # the factors of theta entries

        def record_grad(grad_out: torch.Tensor) -> None:
            for p, s in module.kfac_grad_factors(grad_out.detach(), params).items():
                if p in kept:
                    grad_sums[kept[p]] += s.to(theta.dtype) / probes

        def hook(_: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            for p, (s, count) in module.kfac_input_factors(inputs[0].detach(), params).items():
                if p in kept:
                    input_sums[kept[p]] += s.to(theta.dtype)
                    locations[kept[p]] += count
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(record_grad)
        return hook

    n_batches = 0
    for i, x, y in tqdm(batches(loader, sub.device), desc="KFAC", disable=not progress, unit="batch"):
        t = theta.detach().clone().requires_grad_(True)
        handles = [m.register_forward_hook(forward_hook(m, ns)) for m, ns in layers]
        try:
            with torch.enable_grad():
                out = sub(x, theta=t)
        finally:
            for h in handles:
                h.remove()
        detached = out.detach()
        if i == 0:
            lik.check_target(detached, y)
        log_lik += lik.log_prob(detached, y).sum().detach().double()
        for j in range(probes):
            z = torch.randint(0, 2, detached.shape, generator=generator,
                              device=generator.device if generator is not None else detached.device)
            cot = output_precision_sqrt(lik, detached, y, (2 * z - 1).to(detached))
            (g,) = torch.autograd.grad(out, t, grad_outputs=cot, retain_graph=j < probes - 1)
            diag += g[diag_index] ** 2 / probes
        n_batches += 1
    if n_batches == 0:
        raise ValueError("the loader is empty: it yields no batch; check the dataset and batch size")
    blocks = [KronBlock(q, offsets[q], grad_sums[q], input_sums[q] / max(locations[q], 1))
              for q in sorted(grad_sums, key=offsets.get)]
    return KronGGN(blocks, diag_index, diag, log_lik, theta.shape[0])


def _check_sqrt(lik: Likelihood) -> None:
    if not (hasattr(lik, "output_precision_sqrt") or isinstance(lik, (Gaussian, Categorical))):
        raise TypeError(f"hessian='kron' draws output gradients with a square root of the output "
                        f"Hessian, known for bc.Gaussian and bc.Categorical, not "
                        f"{type(lik).__name__}: define output_precision_sqrt(out, y, z) on the "
                        f"likelihood, or use hessian='full', 'diag' or 'lowrank'")
