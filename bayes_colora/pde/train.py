r"""Offline phase: train the network and the hypernetwork together on snapshots.

Loss: the mean relative L2 error per snapshot,

.. math::  L = \frac{1}{|B|} \sum_{s \in B} \frac{\| u_s - \hat u(\cdot; t_s, \mu_s) \|_2}{\| u_s \|_2},

norms over the points (a random subset of ``n_points`` per step when given) and fields, ``B`` a
random batch of snapshots; Adam with a cosine-decayed learning rate. Works for any model with
``forward(x (N, D), tmu (S, 2)) -> (S, N, Q)``, ``offline_parameters()`` and
``set_normalisation(tmu)``
(:class:`~.model.ReducedModel`, :class:`~.model.ConcatBaseline`).
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Snapshots


def relative_errors(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """``||pred_s - true_s|| / ||true_s||`` per snapshot: ``(S, ...)`` -> ``(S,)``."""
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(true.shape)}")
    diff = (pred - true).reshape(pred.shape[0], -1).norm(dim=1)
    return diff / true.reshape(true.shape[0], -1).norm(dim=1).clamp_min(1e-30)


def train_offline(model: nn.Module, data: Snapshots, steps: int = 2000, lr: float = 5e-3,
                  batch: int = 32, n_points: int | None = None, final_lr: float = 0.0,
                  seed: int = 0, progress: bool = True, log_every: int = 50,
                  max_seconds: float | None = None) -> list[dict[str, Any]]:
    """Minimise the mean relative L2 error (module docstring) over ``model.offline_parameters()``.

    Args:
        model: a :class:`~.model.ReducedModel` or :class:`~.model.ConcatBaseline`, on the device
            of ``data``.
        data: training snapshots (``x`` ``(N, D)``, ``u`` ``(S, N, Q)``, ``tmu`` ``(S, 2)``).
        steps: Adam steps; the learning rate decays from ``lr`` to ``final_lr`` on a cosine
            ``final + (lr - final) (1 + cos(pi p)) / 2`` over the progress ``p`` in ``[0, 1]``.
        batch: snapshots per step.
        n_points: points per step (a random subset shared by the batch); ``None``: all.
        seed: for the batches and point subsets.
        progress: tqdm bar.
        log_every: keep one history record every this many steps.
        max_seconds: a wall-time budget: the progress is then ``max(step / steps,
            elapsed / max_seconds)`` and training stops when it reaches 1, so the cosine decay
            completes within the budget on any machine.

    Returns:
        history records ``{"step", "loss", "lr", "seconds"}``. Frozen parameters are unfrozen
        for training and frozen again afterwards.
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"need steps >= 1 and batch >= 1, got {steps}, {batch}")
    model.set_normalisation(data.tmu)
    params = model.offline_parameters()
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, fused=data.u.device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_snap, n_all = data.u.shape[0], data.x.shape[0]
    history, start, running = [], time.perf_counter(), torch.zeros((), device=data.u.device)
    n_run = done = 0
    try:
        bar = tqdm(total=steps, desc="offline training", disable=not progress, unit="step")
        for step in range(steps):
            frac = step / steps
            if max_seconds is not None:
                frac = max(frac, (time.perf_counter() - start) / max_seconds)
            if frac >= 1:
                break
            rate = final_lr + (lr - final_lr) * 0.5 * (1 + math.cos(math.pi * frac))
            for group in opt.param_groups:
                group["lr"] = rate
            idx = torch.randint(n_snap, (min(batch, n_snap),), generator=gen).to(data.u.device)
            x, u = data.x, data.u[idx]
            if n_points is not None and n_points < n_all:
                pts = torch.randperm(n_all, generator=gen)[:n_points].to(data.x.device)
                x, u = x[pts], u[:, pts]
            loss = relative_errors(model(x, data.tmu[idx]), u).mean()
            if not torch.isfinite(loss):
                raise ValueError(f"step {step}: the loss is not finite; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            running, n_run, done = running + loss.detach(), n_run + 1, step + 1
            if n_run == log_every or done == steps:
                history.append({"step": done, "loss": float(running) / n_run, "lr": rate,
                                "seconds": time.perf_counter() - start})
                bar.set_postfix(loss=f"{history[-1]['loss']:.3g}")
                running, n_run = torch.zeros((), device=data.u.device), 0
        if n_run:                                  # stopped by the time budget between records
            history.append({"step": done, "loss": float(running) / n_run, "lr": rate,
                            "seconds": time.perf_counter() - start})
        bar.close()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return history


@torch.no_grad()
def predict_snapshots(model: nn.Module, x: torch.Tensor, tmu: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``model(x, tmu)`` in chunks of snapshots: ``(S, N, Q)``."""
    return torch.cat([model(x, tmu[i:i + chunk]) for i in range(0, tmu.shape[0], chunk)])
