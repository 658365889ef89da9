"""Point estimates: MAP (or maximum likelihood without a prior) as a Dirac posterior."""
from __future__ import annotations

import os
from typing import Iterable

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
            checkpoint: str | os.PathLike | None = None) -> DiracPosterior:
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

    Returns:
        a :class:`DiracPosterior` at the estimate, its ``history`` one record per epoch.
    """
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

    def on_epoch(epoch: int, hist: list[dict[str, float]]) -> None:
        if checkpoint is not None:
            save_state(checkpoint, {"theta": theta.detach().cpu(), "likelihood": lik.state_dict(),
                                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                    "history": hist})

    history = optimise(sub, theta, loader, lik, prior, n_data, epochs, optimizer, "fit_map",
                       progress, bf16, on_epoch=on_epoch, start_epoch=start, history=history)
    sub.theta = theta.detach()
    return DiracPosterior(theta.detach(), likelihood=lik, history=history)
