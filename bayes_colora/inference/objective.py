r"""The training objective every engine shares, and the loop that optimises it.

For a data set of N examples and a minibatch B, the per-example negative log joint is

.. math::  L(\theta) = -\frac{1}{N}\Big[\frac{N}{|B|}\sum_{i \in B} \log p(y_i \mid f(x_i;\theta))
           + \log p(\theta)\Big],

an unbiased estimate of ``-log p(theta, D) / N``; its minimiser is the MAP estimate.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..data import check_finite, split_batch, to_device
from ..likelihoods import Likelihood
from ..priors import NormalPrior
from ..subspace import Subspace


def batches(loader: Iterable, device: torch.device) -> Iterator[tuple[int, Any, torch.Tensor]]:
    """``(index, x, y)`` for each batch, on ``device``, checked for non-finite values."""
    for i, batch in enumerate(loader):
        x, y = split_batch(batch, i)
        check_finite(x, "input", i)
        check_finite(y, "target", i)
        yield i, to_device(x, device), to_device(y, device)


def negative_log_joint(sub: Subspace, theta: torch.Tensor, lik: Likelihood, prior: NormalPrior | None,
                       x: Any, y: torch.Tensor, n_data: int, bf16: bool = False,
                       check: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L(theta), mean NLL of the batch)``; ``theta`` of shape ``(d,)`` or ``(S, d)`` (then both
    have shape ``(S,)``). ``check`` validates the target shape against the output."""
    with _autocast(sub.device, bf16):
        out = sub(x, theta=theta)
    out = out.float()
    if check:
        lik.check_target(out if theta.dim() == 1 else out[0], y)
    log_lik = lik.log_prob(out, y)
    nll = -log_lik.mean(-1)
    loss = nll
    if prior is not None:
        loss = loss - prior.log_prob(theta) / n_data
    return loss, nll


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def optimise(sub: Subspace, theta: torch.nn.Parameter, loader: Iterable, lik: Likelihood,
             prior: NormalPrior | None, n_data: int, epochs: int, optimizer: torch.optim.Optimizer,
             desc: str, progress: bool = True, bf16: bool = False,
             on_step: Callable[[int, int], None] | None = None,
             on_epoch: Callable[[int, list[dict[str, float]]], None] | None = None,
             start_epoch: int = 0, history: list[dict[str, float]] | None = None,
             ) -> list[dict[str, float]]:
    """Minimise :math:`L` over ``theta`` (and the likelihood's parameters) for ``epochs`` epochs.

    Calls ``on_step(epoch, step)`` after every optimiser step and ``on_epoch(epoch, history)``
    after every epoch. Raises ``ValueError`` naming the batch when data or the loss is not finite,
    and when the loader is empty. Returns one record per epoch: mean ``loss`` and ``nll``.
    """
    history = list(history or [])
    bar = tqdm(total=epochs - start_epoch, desc=desc, disable=not progress, unit="epoch")
    step = 0
    for epoch in range(start_epoch, epochs):
        total_loss = total_nll = 0.0
        n_batches = 0
        for i, x, y in batches(loader, sub.device):
            loss, nll = negative_log_joint(sub, theta, lik, prior, x, y, n_data, bf16,
                                           check=(n_batches == 0 and epoch == start_epoch))
            if not torch.isfinite(loss):
                raise ValueError(f"epoch {epoch}, batch {i}: the loss is not finite ({loss.item()}); "
                                 f"lower the learning rate or check the data and the likelihood's scale")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            total_nll += nll.item()
            n_batches += 1
            step += 1
            if on_step is not None:
                on_step(epoch, step)
        if n_batches == 0:
            raise ValueError("the loader is empty: it yields no batch; check the dataset and batch size")
        history.append({"epoch": epoch + 1, "loss": total_loss / n_batches, "nll": total_nll / n_batches})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4g}")
        if on_epoch is not None:
            on_epoch(epoch, history)
    bar.close()
    return history


def resume_state(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if there is one (written by :func:`save_state`)."""
    if path is None or not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically."""
    from ..subspace import _atomic_write

    _atomic_write(path, lambda tmp: torch.save(state, tmp))
