"""Point estimates: MAP (or maximum likelihood without a prior) as a Dirac posterior."""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch

from ..data import dataset_size
from ..likelihoods import Likelihood
from ..posterior import DiracPosterior
from ..priors import NormalPrior
from ..subspace import Subspace
from .objective import optimise, resume_state, save_state


def fit_map(sub: Subspace, loader: Iterable, lik: Likelihood, prior: NormalPrior | None = None,
            epochs: int = 10, lr: float = 1e-3, weight_decay: float = 0.0, bf16: bool = False,
            progress: bool = True, n_data: int | None = None,
            checkpoint: str | os.PathLike | None = None,
            on_epoch: Callable[[dict[str, float], torch.Tensor], bool | None] | None = None,
            merge_and_reset: bool = False,
            generator: torch.Generator | None = None, compile: bool = False) -> DiracPosterior:
    r"""Find ``argmin_theta L(theta)`` (see :mod:`.objective`) with AdamW; learned likelihood
    parameters (``Gaussian(learn_sigma=True)``) are trained alongside.

    Args:
        sub: the subspace; optimisation starts at ``sub.theta`` and ``sub.theta`` is left at the
            result (so ``fit_laplace`` can follow).
        loader: iterable of ``(x, y)`` batches (or dicts with ``labels``).
        lik, prior: likelihood and prior (``None``: maximum likelihood).
        epochs, lr, weight_decay: AdamW settings (weight decay on theta only).
        bf16: run the forward pass under bfloat16 autocast.
        progress: show a tqdm progress bar.
        n_data: data set size N; by default ``len(loader.dataset)`` or counted.
        checkpoint: a file to save training state to after every epoch (atomically); if it exists
            the run resumes from it.
        on_epoch: called after every epoch as ``on_epoch(record, theta)``, with the epoch's
            history record (``epoch`` counted from 1, mean ``loss`` and ``nll``) and the current
            estimate ``theta`` (``(d,)``, detached; clone it to keep it). ``sub.theta`` holds the
            same estimate then, so ``sub(x)`` evaluates it (a validation loss, early stopping,
            keeping the best epoch). Returning ``True`` stops training after this epoch.
        merge_and_reset: after every epoch (and after ``on_epoch``), fold the resettable adapters'
            deltas into the frozen weights and restart them (:meth:`Subspace.merge_and_reset`,
            the convolutional CoLoRA recipe); the optimiser's state for ``theta`` restarts with
            them. The function is unchanged and ``theta`` restarts, so the prior then acts on the
            update since the last merge. Not with ``checkpoint`` (the merged base weights are
            not in it).
        generator: draws the restarted factors (with ``merge_and_reset``).
        compile: compute each batch's loss and its gradient with ``torch.compile`` (fewer, fused
            kernels: worth it on a GPU whose steps are bound by kernel launches; compilation takes
            seconds to a minute, once per input shape).

    Returns:
        a :class:`DiracPosterior` at the estimate, its ``history`` one record per epoch.
    """
    if merge_and_reset and checkpoint is not None:
        raise ValueError("fit_map(merge_and_reset=True) changes the frozen base weights every epoch, "
                         "which the checkpoint does not hold; use one of the two (save the whole "
                         "model yourself to resume a merge-and-reset run)")
    if merge_and_reset and not sub.resettable_layers():
        raise ValueError("fit_map(merge_and_reset=True): no adapter in this subspace can be reset "
                         "(ConvCoLoRA, TuckerCoLoRA and LoRA can)")
    n_data = n_data or dataset_size(loader)
    lik = lik.to(sub.device)
    theta = torch.nn.Parameter(sub.theta.clone())
    optimizer = torch.optim.AdamW([{"params": [theta], "weight_decay": weight_decay},
                                   {"params": list(lik.parameters()), "weight_decay": 0.0}], lr=lr)
    state = resume_state(checkpoint)
    start, history = 0, []
    if state is not None:
        if state["theta"].shape != theta.shape:
            raise ValueError(f"checkpoint {checkpoint} holds theta of shape {tuple(state['theta'].shape)}, "
                             f"this subspace has {tuple(theta.shape)}; delete it or use another path")
        with torch.no_grad():
            theta.copy_(state["theta"])
        lik.load_state_dict(state["likelihood"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["epoch"], state["history"]

    def end_of_epoch(epoch: int, hist: list[dict[str, float]]) -> bool:
        stop = False
        if on_epoch is not None:
            sub.theta = theta.detach()
            stop = bool(on_epoch(dict(hist[-1]), theta.detach()))
        if merge_and_reset:
            sub.theta = theta.detach()  # again: the hook may have evaluated other parameters
            sub.merge_and_reset(generator)
            with torch.no_grad():
                theta.copy_(sub.theta)
            optimizer.state.pop(theta, None)
        if checkpoint is not None:
            save_state(checkpoint, {"theta": theta.detach().cpu(), "likelihood": lik.state_dict(),
                                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                    "history": hist})
        return stop

    history = optimise(sub, theta, loader, lik, prior, n_data, epochs, optimizer, "fit_map",
                       progress, bf16, on_epoch=end_of_epoch, start_epoch=start, history=history,
                       compile=compile)
    sub.theta = theta.detach()
    return DiracPosterior(theta.detach(), likelihood=lik, history=history)
