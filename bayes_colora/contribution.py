r"""Layer contributions by FAIG: filter attribution by integrated gradients (Xie et al.,
"Finding discriminative filters for specific degradations in blind super-resolution", NeurIPS
2021), summed per layer as in contribution-based CoLoRA (Wu et al. 2024).

Let ``theta_pre`` be the pre-trained weights, ``theta_ft`` those of a briefly, fully fine-tuned
copy, ``Delta = theta_ft - theta_pre`` and ``theta(a) = theta_pre + a Delta`` the straight path
(the reverse of ``theta_ft + a (theta_pre - theta_ft)``; only the sign of the integral differs,
and scores take absolute values). The integrated gradient of the task loss ``L`` for weight ``i``,

.. math::  IG_i = \Delta_i \int_0^1 \frac{\partial L(\theta(a))}{\partial \theta_i}\,da
           \approx \Delta_i \frac1K \sum_{k=0}^{K-1} \frac{\partial L(\theta(a_k))}{\partial \theta_i},
           \quad a_k = \frac{k + 1/2}{K},

(midpoint rule, exact when ``L`` is quadratic along the path) satisfies *completeness*:
``sum_i IG_i = L(theta_ft) - L(theta_pre)`` over all weights. ``L`` is the mean of the loss over
the batches of ``loader``. The FAIG of a filter (an output channel ``o`` of a layer's weight) is
``|sum_{i in o} IG_i|``; the contribution of a layer is the sum of its filters' FAIG.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .adapters.layers import out_channel_axis
from .adapters.lora import LoRA
from .data import split_batch, to_device
from .subspace import call_model

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def scored_layers(model: nn.Module, targets: str | list[str] | None = None,
                  types: tuple[type, ...] | None = None) -> dict[str, nn.Module]:
    """The linear and conv layers (by qualified name) whose weights get a contribution score."""
    return dict(LoRA(targets=targets, types=types).select(model.named_modules()))


def _batches(loader: Iterable, device: torch.device, max_batches: int | None) -> list[tuple[Any, torch.Tensor]]:
    out = []
    for i, batch in enumerate(itertools.islice(loader, max_batches)):
        x, y = split_batch(batch, i)
        out.append((to_device(x, device), to_device(y, device)))
    if not out:
        raise ValueError("the loader is empty: it yields no batch; check the dataset and batch size")
    return out


def finetune(model: nn.Module, loader: Iterable, loss: LossFn, steps: int = 100, lr: float = 1e-4,
             progress: bool = True) -> nn.Module:
    """A fully fine-tuned copy of ``model``: ``steps`` AdamW steps on every parameter, cycling
    through ``loader``; ``model`` itself is not changed. The copy is returned in eval mode."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(True)
    device = next(tuned.parameters()).device
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    tuned.train()
    bar = tqdm(total=steps, desc="full fine-tune", disable=not progress, unit="step")
    step = 0
    while step < steps:
        n_before = step
        for i, batch in enumerate(loader):
            x, y = split_batch(batch, i)
            value = loss(call_model(tuned, to_device(x, device)), to_device(y, device))
            if not torch.isfinite(value):
                raise ValueError(f"fine-tune step {step}: the loss is not finite; lower lr ({lr})")
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value.item():.4g}")
            if step == steps:
                break
        if step == n_before:
            raise ValueError("the loader is empty: it yields no batch; check the dataset and batch size")
    bar.close()
    return tuned.eval()


def integrated_gradients(model: nn.Module, finetuned: nn.Module, loader: Iterable, loss: LossFn,
                         steps: int = 16, names: Iterable[str] | None = None,
                         max_batches: int | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Signed integrated gradients ``IG_i`` (module docstring) of the parameters ``names``
    (default: all) along the path from ``model`` to ``finetuned`` (same architecture); every
    parameter moves along the path, buffers stay at ``model``'s. Returns one tensor per name,
    shaped like the parameter."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    pre = {n: p.detach() for n, p in model.named_parameters()}
    ft = {n: p.detach() for n, p in finetuned.named_parameters()}
    if pre.keys() != ft.keys() or any(pre[n].shape != ft[n].shape for n in pre):
        bad = sorted(set(pre) ^ set(ft)) or [n for n in pre if pre[n].shape != ft[n].shape]
        raise ValueError(f"the fine-tuned model does not match the pre-trained one (parameters "
                         f"{bad[:5]}); pass a fine-tuned copy of the same network")
    names = list(pre) if names is None else list(names)
    missing = [n for n in names if n not in pre]
    if missing:
        raise KeyError(f"no parameter named {missing[:5]} in the model")
    device = next(model.parameters()).device
    data = _batches(loader, device, max_batches)
    delta = {n: ft[n].to(device) - pre[n] for n in pre}
    grads = {n: torch.zeros_like(pre[n]) for n in names}
    was_training = model.training
    model.eval()
    for k in tqdm(range(steps), desc="FAIG", disable=not progress, unit="step"):
        a = (k + 0.5) / steps
        params = {n: (pre[n] + a * delta[n]).requires_grad_(n in grads) for n in pre}
        for x, y in data:
            value = loss(call_model_functional(model, params, x), y) / len(data)
            for n, g in zip(names, torch.autograd.grad(value, [params[n] for n in names],
                                                       allow_unused=True)):
                if g is not None:
                    grads[n] += g / steps
    model.train(was_training)
    return {n: delta[n] * grads[n] for n in names}


def call_model_functional(model: nn.Module, params: dict[str, torch.Tensor], x: Any) -> Any:
    """``model(x)`` with its parameters replaced by ``params`` (``torch.func.functional_call``)."""
    if isinstance(x, dict):
        return functional_call(model, params, (), x, strict=False)
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    return functional_call(model, params, args, strict=False)


def contribution_scores(model: nn.Module, loader: Iterable, loss: LossFn,
                        finetuned: nn.Module | None = None, steps: int = 16,
                        targets: str | list[str] | None = None, types: tuple[type, ...] | None = None,
                        finetune_steps: int = 100, finetune_lr: float = 1e-4,
                        max_batches: int | None = None, progress: bool = True) -> dict[str, float]:
    """Contribution of each layer to adapting ``model`` to the task of ``loader``: the FAIG of
    its filters, summed (module docstring).

    Args:
        model: the pre-trained network (not changed).
        loader: task batches ``(x, y)``; the loss is averaged over (at most ``max_batches`` of) them.
        loss: ``loss(model(x), y)`` -> scalar, e.g. ``nn.functional.l1_loss`` on the outputs.
        finetuned: a fully fine-tuned copy of ``model``; ``None`` runs :func:`finetune` for
            ``finetune_steps`` steps at ``finetune_lr`` first.
        steps: K, integration points along the path.
        targets, types: which layers (linear and conv), as for adapter specs; default all.

    Returns:
        ``{layer name: score >= 0}`` for every selected layer, in module order.
    """
    layers = scored_layers(model, targets, types)
    if finetuned is None:
        finetuned = finetune(model, loader, loss, finetune_steps, finetune_lr, progress)
    names = {f"{n}.weight": n for n in layers}
    ig = integrated_gradients(model, finetuned, loader, loss, steps, list(names), max_batches, progress)
    scores = {}
    for pname, lname in names.items():
        axis = out_channel_axis(layers[lname])
        per_filter = ig[pname].transpose(0, axis).reshape(ig[pname].shape[axis], -1).sum(1)
        scores[lname] = per_filter.abs().sum().item()
    return scores
