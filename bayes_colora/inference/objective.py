r"""The training objective every engine shares, and the loop that optimises it.

For a data set of N examples and a minibatch B, the per-example negative log joint is

.. math::  L(\theta) = -\frac{1}{N}\Big[\frac{N}{|B|}\sum_{i \in B} \log p(y_i \mid f(x_i;\theta))
           + \log p(\theta)\Big],

an unbiased estimate of ``-log p(theta, D) / N``; its minimiser is the MAP estimate.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..data import check_finite, split_batch, tensors_of, to_device
from ..likelihoods import Likelihood
from ..priors import NormalPrior
from ..subspace import Subspace


def batches(loader: Iterable, device: torch.device,
            deferred: _EpochLosses | None = None) -> Iterator[tuple[int, Any, torch.Tensor]]:
    """``(index, x, y)`` for each batch, on ``device``, checked for non-finite values.

    With ``deferred``, the floating tensors that the loader yields already off the CPU (on an
    accelerator) are not checked here, where reading the result back would make the host wait
    for the device at every batch: their counts of non-finite values stay on the device with
    ``deferred`` (:meth:`_EpochLosses.add_data`), which raises the same ``ValueError`` at its
    next read-back. CPU tensors are checked here, before they are moved, either way.
    """
    for i, batch in enumerate(loader):
        x, y = split_batch(batch, i)
        if deferred is None:
            check_finite(x, "input", i)
            check_finite(y, "target", i)
            yield i, to_device(x, device), to_device(y, device)
            continue
        named = {"input": list(tensors_of(x)), "target": list(tensors_of(y))}
        for what, tensors in named.items():
            for name, t in tensors:
                if _on_host(t):
                    check_finite(t, what + name, i)
        x, y = to_device(x, device), to_device(y, device)
        for (what, tensors), moved in zip(named.items(), (x, y)):
            for (name, t), (_, t_moved) in zip(tensors, tensors_of(moved)):
                if not _on_host(t) and t.is_floating_point():
                    deferred.add_data(i, what + name, t_moved)
        yield i, x, y


def _on_host(t: torch.Tensor) -> bool:
    """Whether :func:`batches` checks ``t`` at once (a CPU tensor: no wait for a device)."""
    return t.device.type == "cpu"


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


#: compiled graphs a training loop may hold for its loss function: one per subspace structure and
#: input shape met in the process (torch's default of 8 would silently fall back to eager after
#: eight structures, e.g. eight methods of one study)
RECOMPILE_LIMIT = 64


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, called with room for :data:`RECOMPILE_LIMIT` compiled graphs."""
    import torch._dynamo.config as dynamo_config

    compiled = torch.compile(fn)
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    room = max(getattr(dynamo_config, name), RECOMPILE_LIMIT)

    def call(*args: Any) -> Any:
        with dynamo_config.patch(**{name: room}):
            return compiled(*args)
    return call


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


#: Losses are read back from the device (one host-device synchronisation) every this many
#: batches, and at the end of each epoch; see :func:`optimise`.
CHECK_EVERY = 32


class _EpochLosses:
    """The losses and NLLs of one epoch's batches, and the non-finite counts of the batches' data
    that came on the device (:func:`batches`). They stay on the device until :meth:`flush` reads
    back the pending ones in one transfer, checks them and adds the losses to the sums."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.data: list[tuple[int, str, torch.Tensor]] = []
        self.loss = self.nll = 0.0
        self.n = 0

    def add(self, i: int, loss: torch.Tensor, nll: torch.Tensor) -> None:
        self.pending.append((i, loss.detach(), nll.detach()))

    def add_data(self, i: int, what: str, t: torch.Tensor) -> None:
        """Count the NaN and infinite entries of batch ``i``'s floating tensor ``t`` (named
        ``what``, e.g. ``input``) on its device: ``t * 0`` is NaN exactly there (0 elsewhere)."""
        self.data.append((i, what, torch.isnan(t * 0).sum(dtype=torch.float64)))

    def flush(self) -> None:
        """Raise ``ValueError`` naming the first pending batch whose data (worded as
        :func:`bayes_colora.data.check_finite` words it) or loss is not finite, a batch's data
        before its loss; else add the pending losses, in batch order, to the sums."""
        if not self.pending and not self.data:
            return
        pending, self.pending = self.pending, []
        data, self.data = self.data, []
        values = torch.stack([t for _, loss, nll in pending for t in (loss, nll)]
                             + [count for _, _, count in data]).tolist()
        losses, counts = values[:2 * len(pending)], values[2 * len(pending):]
        bad_data: dict[int, tuple[str, int]] = {}  # batch -> its first tensor with non-finite values
        for (i, what, _), count in zip(data, counts):
            if count and i not in bad_data:
                bad_data[i] = (what, int(count))
        first_bad = min(bad_data, default=None)
        for (i, _, _), loss, nll in zip(pending, losses[0::2], losses[1::2]):
            if first_bad is not None and first_bad <= i:
                break
            if not math.isfinite(loss):
                raise ValueError(f"epoch {self.epoch}, batch {i}: the loss is not finite ({loss}); "
                                 f"lower the learning rate or check the data and the likelihood's scale")
            self.loss += loss
            self.nll += nll
            self.n += 1
        if first_bad is not None:
            what, count = bad_data[first_bad]
            raise ValueError(f"batch {first_bad}: {what} has {count} non-finite value(s) (NaN or inf); "
                             f"clean or mask the data before fitting")


def _prior_on(prior: NormalPrior, like: torch.Tensor) -> NormalPrior:
    """A copy of ``prior`` with its scale on ``like``'s device and dtype, so that ``log_prob``
    does not copy it there (a synchronising host-to-device copy on a GPU) at every step."""
    moved = copy.copy(prior)
    moved.scale = prior.scale.to(like)
    return moved


def optimise(sub: Subspace, theta: torch.nn.Parameter, loader: Iterable, lik: Likelihood,
             prior: NormalPrior | None, n_data: int, epochs: int, optimizer: torch.optim.Optimizer,
             desc: str, progress: bool = True, bf16: bool = False,
             on_step: Callable[[int, int], None] | None = None,
             on_epoch: Callable[[int, list[dict[str, float]]], bool | None] | None = None,
             start_epoch: int = 0, history: list[dict[str, float]] | None = None,
             compile: bool = False) -> list[dict[str, float]]:
    """Minimise :math:`L` over ``theta`` (and the likelihood's parameters) for ``epochs`` epochs.

    Calls ``on_step(epoch, step)`` after every optimiser step and ``on_epoch(epoch, history)``
    after every epoch; when ``on_epoch`` returns ``True`` training stops there. Raises
    ``ValueError`` naming the batch when data or the loss is not finite, and when the loader is
    empty. Returns one record per epoch: mean ``loss`` and ``nll``.

    The losses stay on the device and are read back every :data:`CHECK_EVERY` batches and at the
    end of each epoch, so a step does not wait for the device. The first batch of the run is
    checked before its step; a later non-finite loss is reported (epoch and first such batch)
    at the next read-back, before the epoch's ``on_epoch``. By then up to ``CHECK_EVERY - 1``
    steps (with their ``on_step`` calls), the bad batch's own first, may have been taken, so
    ``theta`` and the likelihood's parameters may hold NaN. Data that the loader yields on the
    CPU is checked before its batch runs; data it yields already on the accelerator is checked
    on the device and reported likewise at the next read-back (:func:`batches`), a batch's bad
    data before its loss. When something else fails later in the epoch (bad data, a hook), the
    pending losses and data checks are read first, so an earlier non-finite one is still the
    error reported.

    With ``compile``, every batch after the run's first (which also checks the target's shape)
    computes the loss with ``torch.compile`` of :func:`negative_log_joint` (forward and backward
    fused into fewer kernels; the first compiled batch, and a batch of a new shape, pay the
    compilation). The optimiser step stays eager.
    """
    history = list(history or [])
    if prior is not None:
        prior = _prior_on(prior, theta.detach())

    def batch_loss(theta: torch.Tensor, x: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return negative_log_joint(sub, theta, lik, prior, x, y, n_data, bf16)

    loss_of = _compiled(batch_loss) if compile else batch_loss
    bar = tqdm(total=epochs - start_epoch, desc=desc, disable=not progress, unit="epoch")
    step = 0
    for epoch in range(start_epoch, epochs):
        losses = _EpochLosses(epoch)
        try:
            for i, x, y in batches(loader, sub.device, deferred=losses):
                first = step == 0
                if first:
                    loss, nll = negative_log_joint(sub, theta, lik, prior, x, y, n_data, bf16, check=True)
                else:
                    loss, nll = loss_of(theta, x, y)
                losses.add(i, loss, nll)
                if first or len(losses.pending) >= CHECK_EVERY:
                    losses.flush()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if on_step is not None:
                    on_step(epoch, step)
        except Exception:
            losses.flush()  # a non-finite loss in an earlier batch is the first error, as it happened
            raise
        losses.flush()
        if losses.n == 0:
            raise ValueError("the loader is empty: it yields no batch; check the dataset and batch size")
        history.append({"epoch": epoch + 1, "loss": losses.loss / losses.n, "nll": losses.nll / losses.n})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4g}")
        if on_epoch is not None and on_epoch(epoch, history):
            break
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
