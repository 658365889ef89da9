r"""PROD pre-training: fit a restoration network to map PROD-degraded crops of clean images back
to the clean crops, by maximum likelihood under a heteroscedastic Gaussian
(``bc.Gaussian(heteroscedastic=True, dim=1)``): per pixel and channel

.. math::  -\log p(y \mid \mu, s) = \tfrac12\big[(y - \mu)^2 e^{-s} + s + \log 2\pi\big],

averaged over elements, with AdamW and a cosine learning-rate decay. Degradations are drawn
afresh for every crop (:class:`~.degradations.PROD`), in DataLoader workers when ``workers > 0``.
"""
from __future__ import annotations

import math
import time
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..likelihoods import Gaussian
from .data import random_crop
from .degradations import PROD


class ProdStream(IterableDataset):
    """An endless stream of ``(degraded, clean)`` crops ``(3, crop, crop)`` of ``images``; each
    DataLoader worker ``w`` draws from its own generator seeded ``seed + w``."""

    def __init__(self, images: Sequence[torch.Tensor], crop: int, prod: PROD | None = None, seed: int = 0):
        small = [tuple(im.shape[-2:]) for im in images if min(im.shape[-2:]) < crop]
        if not images or small:
            raise ValueError(f"ProdStream needs images of at least {crop} x {crop} pixels; got "
                             f"{len(images)} images, too small: {small[:3]}")
        self.images, self.crop, self.prod, self.seed = list(images), crop, prod or PROD(), seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        g = torch.Generator().manual_seed(self.seed + (info.id if info is not None else 0))
        while True:
            clean = self.images[int(torch.randint(len(self.images), (), generator=g))]
            (clean,) = random_crop([clean], self.crop, g)
            clean = clean.contiguous()
            yield self.prod(clean, g), clean


def _one_thread(worker_id: int) -> None:
    """Each DataLoader worker degrades its crops on one CPU thread (no oversubscription)."""
    torch.set_num_threads(1)


def gaussian_nll_loss(out: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Mean heteroscedastic Gaussian NLL per element of ``clean`` ``(B, C, H, W)`` given the
    network output ``out`` ``(B, 2C, H, W)`` (mean, log variance)."""
    lik = Gaussian(heteroscedastic=True, dim=1).to(out.device)
    return -lik.log_prob(out, clean).mean() / clean[0].numel()


def pretrain(model: nn.Module, images: Sequence[torch.Tensor], steps: int = 1000,
             seconds: float | None = None, batch_size: int = 16, crop: int = 64, lr: float = 1e-3,
             prod: PROD | None = None, workers: int = 0, seed: int = 0, progress: bool = True
             ) -> list[float]:
    """Train ``model`` in place on PROD-degraded crops of ``images`` for ``steps`` AdamW steps,
    or until ``seconds`` have passed (the cosine schedule then runs on the elapsed fraction of
    the time). Returns the loss (:func:`gaussian_nll_loss`) of every step; the model is left in
    eval mode on its device."""
    device = next(model.parameters()).device
    stream = ProdStream(images, crop, prod, seed)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers,
                        persistent_workers=workers > 0, worker_init_fn=_one_thread)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="PROD pre-training", disable=not progress, unit="step")
    for step, (degraded, clean) in enumerate(loader):
        frac = step / steps
        if seconds is not None:
            frac = max(frac, (time.perf_counter() - start) / seconds)
        if frac >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
        degraded, clean = degraded.to(device, non_blocking=True), clean.to(device, non_blocking=True)
        loss = gaussian_nll_loss(model(degraded), clean)
        if not torch.isfinite(loss):
            raise ValueError(f"PROD pre-training step {step}: the loss is not finite; lower lr ({lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses
