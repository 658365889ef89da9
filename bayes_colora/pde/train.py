r"""Offline phase: train the network and the hypernetwork together on snapshots.

Loss: the mean relative L2 error per snapshot,

.. math::  L = \frac{1}{|B|} \sum_{s \in B} \frac{\| u_s - \hat u(\cdot; t_s, \mu_s) \|_2}{\| u_s \|_2},

norms over the points (a random subset of ``n_points`` per step when given) and fields, ``B`` a
random batch of snapshots; Adam with a cosine-decayed learning rate. Works for any model with
``forward(x (N, D), tmu (S, 2)) -> (S, N, Q)``, ``offline_parameters()`` and
``set_normalisation(tmu)``
(:class:`~.model.ReducedModel`, :class:`~.model.ConcatBaseline`). A training budget can be spent
over several calls (``state``, ``stop_after_seconds``): a resumed call continues the same
schedule, batches and optimiser state.
"""
from __future__ import annotations

import copy
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
                  max_seconds: float | None = None, compile: bool = False,
                  state: dict[str, Any] | None = None,
                  stop_after_seconds: float | None = None) -> list[dict[str, Any]]:
    """Minimise the mean relative L2 error (module docstring) over ``model.offline_parameters()``.

    Batches: the snapshots are visited in epochs; each epoch is a fresh random permutation cut
    into ``floor(S / batch)`` batches of ``batch`` snapshots (sampling without replacement). The
    permutations, point subsets and losses stay on the data's device, and nothing is copied
    to the host between two history records (no per-step synchronisation on a GPU).

    Resuming: one training budget can be spent over several calls. Pass a dict as ``state``
    (``{}`` to start) and ``stop_after_seconds``; the call trains until the budget is spent or
    its own training time reaches ``stop_after_seconds``, and fills ``state`` in place with
    everything the next call needs (see below). A call given that ``state`` (also after
    ``torch.save`` / ``torch.load``) loads it into ``model`` and continues: same step count,
    same batches (the sampler's generator state and the current epoch's permutation), same
    Adam moments and the same learning rate ``lr(p)`` at the same progress ``p``, the elapsed
    time in ``p`` being the training seconds summed over the calls. With a ``steps`` budget
    only (``max_seconds=None``) a split run therefore does exactly the operations of an
    uninterrupted one; with a time budget ``p`` depends on the measured times, as it does
    uninterrupted.

    Args:
        model: a :class:`~.model.ReducedModel` or :class:`~.model.ConcatBaseline`, on the device
            of ``data``.
        data: training snapshots (``x`` ``(N, D)``, ``u`` ``(S, N, Q)``, ``tmu`` ``(S, 2)``).
        steps: Adam steps; the learning rate decays from ``lr`` to ``final_lr`` on a cosine
            ``final + (lr - final) (1 + cos(pi p)) / 2`` over the progress ``p`` in ``[0, 1]``.
        batch: snapshots per step (at most ``S``).
        n_points: points per step (a random subset shared by the batch); ``None``: all.
        final_lr: the learning rate at the end of the decay.
        seed: for the batches and point subsets.
        progress: tqdm bar.
        log_every: keep one history record every this many steps; the loss is checked for
            non-finite values at each record.
        max_seconds: a training-time budget (summed over resumed calls): the progress is then
            ``max(step / steps, seconds / max_seconds)`` and training stops when it reaches 1,
            so the cosine decay completes within the budget on any machine.
        compile: run the loss (forward and backward) through ``torch.compile``; the compile
            time counts against ``max_seconds`` (in every call).
        state: ``None``: no state is kept. A dict: empty to start, or the state a stopped call
            left, to continue; on return it holds ``settings`` (the arguments that fix the
            schedule and the batches; resuming with others raises ``ValueError``),
            ``model`` and ``optimizer`` (state dicts), ``generator`` (the sampler's state),
            ``perm`` (the current epoch's ``(S,)`` permutation), ``step``, ``seconds``
            (training seconds so far), ``running`` / ``n_run`` / ``lr`` (the loss sum and step
            count since the last record, the last rate), ``history``, ``calls`` (one
            ``{"from_step", "to_step", "seconds"}`` per call) and ``finished`` (the budget is
            spent; a finished state trains no further).
        stop_after_seconds: stop this call once its own training time reaches this (checked
            before each step), leaving ``finished`` false; ``None``: train to the end.

    Returns:
        history records ``{"step", "loss", "lr", "seconds"}`` (``loss``: the mean training-batch
        loss since the previous record; ``seconds``: training seconds summed over the calls),
        from the first call on. A stopped call keeps the steps since its last record in
        ``state`` for the next record. Frozen parameters are unfrozen for training and frozen
        again afterwards.
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"need steps >= 1 and batch >= 1, got {steps}, {batch}")
    device = data.u.device
    model.set_normalisation(data.tmu)
    params = model.offline_parameters()
    flags = [p.requires_grad for p in params]
    opt = torch.optim.Adam(params, lr=lr, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    n_snap, n_all = data.u.shape[0], data.x.shape[0]
    batch = min(batch, n_snap)
    per_epoch = n_snap // batch
    subset = n_points is not None and n_points < n_all
    settings = {"steps": steps, "lr": lr, "final_lr": final_lr, "batch": batch, "n_points": n_points,
                "seed": seed, "log_every": log_every, "max_seconds": max_seconds,
                "n_snapshots": n_snap, "n_grid": n_all}
    perm, step, prior, history, calls = None, 0, 0.0, [], []
    running, n_run, rate = torch.zeros((), device=device), 0, lr
    if state:                                      # resume
        if state["settings"] != settings:
            diff = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
            raise ValueError(f"the state was saved with other training settings {diff} (saved, now); "
                             f"resume with those, or start from an empty state")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].cpu())
        perm = None if state["perm"] is None else state["perm"].to(device)
        step, prior, history, calls = state["step"], state["seconds"], list(state["history"]), list(state["calls"])
        running, n_run, rate = state["running"].to(device), state["n_run"], state["lr"]
    first = step
    for p in params:
        p.requires_grad_(True)

    def batch_loss(x: torch.Tensor, u: torch.Tensor, tmu: torch.Tensor) -> torch.Tensor:
        return relative_errors(model(x, tmu), u).mean()

    loss_fn = torch.compile(batch_loss, dynamic=False) if compile else batch_loss
    start, finished = time.perf_counter(), False
    try:
        bar = tqdm(total=steps, initial=step, desc="offline training", disable=not progress, unit="step")
        while True:
            elapsed = time.perf_counter() - start
            frac = step / steps
            if max_seconds is not None:
                frac = max(frac, (prior + elapsed) / max_seconds)
            if frac >= 1:
                finished = True
                break
            if stop_after_seconds is not None and elapsed >= stop_after_seconds:
                break
            rate = final_lr + (lr - final_lr) * 0.5 * (1 + math.cos(math.pi * frac))
            for group in opt.param_groups:
                group["lr"] = rate
            if step % per_epoch == 0:
                perm = torch.randperm(n_snap, generator=gen, device=device)
            idx = perm[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
            x, u = data.x, data.u[idx]
            if subset:
                pts = torch.randperm(n_all, generator=gen, device=device)[:n_points]
                x, u = x[pts], u[:, pts]
            loss = loss_fn(x, u, data.tmu[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            running, n_run, step = running + loss.detach(), n_run + 1, step + 1
            if n_run == log_every or step == steps:
                history.append(_record(step, running, n_run, rate, prior + time.perf_counter() - start))
                bar.set_postfix(loss=f"{history[-1]['loss']:.3g}")
                running, n_run = torch.zeros((), device=device), 0
        seconds = prior + elapsed                  # the training time the stop was decided on
        if finished and n_run:                     # stopped by the time budget between records
            history.append(_record(step, running, n_run, rate, seconds))
            running, n_run = torch.zeros((), device=device), 0
        bar.close()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    if state is not None:
        state.clear()
        state.update({
            "settings": settings, "model": copy.deepcopy(model.state_dict()),
            "optimizer": copy.deepcopy(opt.state_dict()), "generator": gen.get_state(), "perm": perm,
            "step": step, "seconds": seconds, "running": running.detach(), "n_run": n_run, "lr": rate,
            "history": history, "finished": finished,
            "calls": calls + [{"from_step": first, "to_step": step, "seconds": seconds - prior}]})
    return history


def _record(step: int, running: torch.Tensor, n_run: int, rate: float, seconds: float) -> dict[str, Any]:
    """One history record; raises if the summed loss of the last ``n_run`` steps is not finite."""
    loss = float(running) / n_run
    if not math.isfinite(loss):
        raise ValueError(f"the training loss is not finite by step {step}; lower lr")
    return {"step": step, "loss": loss, "lr": rate, "seconds": seconds}


@torch.no_grad()
def predict_snapshots(model: nn.Module, x: torch.Tensor, tmu: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``model(x, tmu)`` in chunks of snapshots: ``(S, N, Q)``."""
    return torch.cat([model(x, tmu[i:i + chunk]) for i in range(0, tmu.shape[0], chunk)])
