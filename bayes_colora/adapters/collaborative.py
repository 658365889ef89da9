r"""Collaborative LoRA: tasks share one low-rank adapter, each keeps a small personal matrix.

For a linear layer ``y = W x + b`` (``W`` of shape ``(out, in)``) and an example of task ``t``:

.. math::  y = W x + b + \frac{\alpha}{r} B R_t A x, \qquad A \in \mathbb{R}^{r \times in},\;
           B \in \mathbb{R}^{out \times r}\ \text{(shared)},\; R_t = I_r + D_t\ \text{(personal)},

with ``D_t`` a full ``r x r`` matrix (``personal="full"``) or a diagonal, stored as its ``r``
entries (``personal="diagonal"``). ``B = 0`` and ``D_t = 0`` at first (the adapted layer equals the
base layer), ``A`` is Kaiming-uniform. Storing ``D_t = R_t - I`` puts a zero-centred prior's mean
at the shared update ``B A``: the prior then shrinks every task towards the common adapter, and its
scale says how similar the tasks are.

Parameters per layer, in ``theta`` order: ``lora_A`` (``r in``), ``lora_B`` (``out r``), then
``personal_0 ... personal_{k-1}`` (``r^2`` or ``r`` each): theta is (shared, personal_1 ...
personal_k) layer by layer; :func:`theta_blocks` gives the indices of each block.

The task of each example travels with the batch: ``sub(x, task=ids)`` or a ``"task"`` entry of a
dict ``x`` (see :func:`bayes_colora.subspace.current_task`); a batch may mix tasks.
:func:`personal_subspace` builds a second subspace over one task's personal parameters only, with
everything shared frozen at its current value: the way to fit a new task.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..subspace import Subspace, current_task
from .base import AdapterLayer, AdapterSpec
from .layers import LINEAR_TYPES, in_out_features, is_hf_conv1d

PERSONAL_KINDS = ("full", "diagonal")


class CollaborativeLoRALinear(AdapterLayer):
    """Collaborative LoRA around ``nn.Linear`` or transformers' ``Conv1D``; see the module docstring."""

    def __init__(self, base: nn.Module, rank: int, n_tasks: int, personal: str, alpha: float):
        super().__init__(base)
        fan_in, fan_out = in_out_features(self.base_layer)
        ref = self.base_layer.weight
        kw = {"dtype": ref.dtype, "device": ref.device}
        self.rank, self.n_tasks, self.personal_kind = rank, n_tasks, personal
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, rank, **kw))
        shape = (rank, rank) if personal == "full" else (rank,)
        for t in range(n_tasks):  # own parameters (not a ParameterList): counted as this layer's
            self.register_parameter(f"personal_{t}", nn.Parameter(torch.zeros(shape, **kw)))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(fan_in)
            self.lora_A.uniform_(-bound, bound)

    def mixing(self) -> torch.Tensor:
        """``R_t = I + D_t`` for every task: ``(k, r, r)`` (full) or ``(k, r)`` (diagonal)."""
        d = torch.stack([getattr(self, f"personal_{t}") for t in range(self.n_tasks)])
        if self.personal_kind == "full":
            return d + torch.eye(self.rank, dtype=d.dtype, device=d.device)
        return d + 1.0

    def delta_weight(self, task: int) -> torch.Tensor:
        """``(alpha / r) B R_t A`` of task ``task`` in the base layer's weight layout."""
        r = self.mixing()[task]
        r = r if self.personal_kind == "full" else torch.diag(r)
        delta = self.scale * (self.lora_B @ r @ self.lora_A)
        return delta.T if is_hf_conv1d(self.base_layer) else delta

    def _task_ids(self, x: torch.Tensor) -> torch.Tensor:
        task = current_task()
        if task is None:
            if self.n_tasks == 1:
                return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            raise ValueError(f"CollaborativeLoRA with {self.n_tasks} tasks needs the task id of each "
                             f"example: call sub(x, task=ids) or put a 'task' entry in the batch dict")
        if task.shape[0] != x.shape[0]:
            raise ValueError(f"task ids have shape {tuple(task.shape)} but the layer input has shape "
                             f"{tuple(x.shape)}: give one task id per example (first axis)")
        if bool((task < 0).any()) or bool((task >= self.n_tasks).any()):
            raise ValueError(f"task ids must lie in 0 ... {self.n_tasks - 1} (n_tasks={self.n_tasks}), "
                             f"got values from {int(task.min())} to {int(task.max())}")
        return task

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        task = self._task_ids(x)
        u = (x @ self.lora_A.T).reshape(x.shape[0], -1, self.rank)          # (B, n, r)
        r = self.mixing()[task]                                              # (B, r, r) or (B, r)
        v = torch.einsum("bnr,bsr->bns", u, r) if self.personal_kind == "full" else u * r[:, None]
        delta = self.scale * (v @ self.lora_B.T)
        return self.base(x) + delta.reshape(*x.shape[:-1], delta.shape[-1])

    def _merge_into_base(self, sign: float) -> None:
        if self.n_tasks != 1:
            raise RuntimeError(f"a CollaborativeLoRA layer with {self.n_tasks} tasks has one delta per "
                               f"task and cannot be merged into one base weight; merge a single-task "
                               f"model (n_tasks=1) or keep the adapters unmerged")
        self.base_layer.weight.add_(sign * self.delta_weight(0))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, n_tasks={self.n_tasks}, personal={self.personal_kind}, " + super().extra_repr()


class CollaborativeLoRA(AdapterSpec):
    """Shared LoRA factors ``A``, ``B`` and a personal ``r x r`` (or diagonal) ``R_t`` per task.

    Args:
        rank: ``r``.
        n_tasks: ``k``, the number of tasks (ids ``0 ... k-1``).
        targets, types: which linear layers; see :class:`AdapterSpec`.
        personal: ``"full"`` (``r^2`` numbers per task and layer) or ``"diagonal"`` (``r``).
        alpha: scale numerator; ``None`` means ``alpha = rank`` (scale 1).
    """

    supported = LINEAR_TYPES

    def __init__(self, rank: int = 4, n_tasks: int = 2, targets: str | Sequence[str] | None = None,
                 personal: str = "full", alpha: float | None = None, types: Sequence[type] | None = None):
        super().__init__(targets, types)
        if int(rank) != rank or rank < 1:
            raise ValueError(f"CollaborativeLoRA rank must be a positive integer, got {rank!r}")
        if int(n_tasks) != n_tasks or n_tasks < 1:
            raise ValueError(f"CollaborativeLoRA n_tasks must be a positive integer, got {n_tasks!r}")
        if personal not in PERSONAL_KINDS:
            raise ValueError(f"personal must be one of {PERSONAL_KINDS}, got {personal!r}")
        self.rank, self.n_tasks, self.personal = int(rank), int(n_tasks), personal
        self.alpha = float(alpha) if alpha is not None else float(rank)

    def _supports_by_name(self, layer: nn.Module) -> bool:
        return is_hf_conv1d(layer)

    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        return CollaborativeLoRALinear(layer, self.rank, self.n_tasks, self.personal, self.alpha)

    @staticmethod
    def personal_subspace(sub: Subspace, task: int | Sequence[int]) -> Subspace:
        """See :func:`personal_subspace`: a subspace over the personal entries of ``task`` only."""
        return personal_subspace(sub, task)

    @staticmethod
    def theta_blocks(sub: Subspace) -> dict[str, torch.Tensor]:
        """See :func:`theta_blocks`: indices of the shared block and of each task's block."""
        return theta_blocks(sub)

    def __repr__(self) -> str:
        return (f"CollaborativeLoRA(rank={self.rank}, n_tasks={self.n_tasks}, personal={self.personal!r}, "
                f"alpha={self.alpha}, targets={self.targets})")


def _personal_task(name: str) -> int | None:
    """The task of a parameter name ``...personal_<t>``, or ``None`` for any other parameter."""
    last = name.rpartition(".")[2]
    head, _, t = last.rpartition("_")
    return int(t) if head == "personal" and t.isdigit() else None


def _is_collaborative_param(sub: Subspace, name: str) -> bool:
    owner = name.rpartition(".")[0]
    return isinstance(sub.model.get_submodule(owner), CollaborativeLoRALinear)


def theta_blocks(sub: Subspace) -> dict[str, torch.Tensor]:
    """Indices into ``theta`` of each block: ``"shared"`` (every non-personal entry, other adapter
    kinds included) and ``"task<t>"`` for each task's personal entries; each a 1-D long tensor."""
    blocks: dict[str, list[torch.Tensor]] = {}
    start = 0
    for name, numel in zip(sub.param_names, sub.param_numels):
        t = _personal_task(name) if _is_collaborative_param(sub, name) else None
        key = "shared" if t is None else f"task{t}"
        blocks.setdefault(key, []).append(torch.arange(start, start + numel))
        start += numel
    if not any(k.startswith("task") for k in blocks):
        raise ValueError("this subspace has no CollaborativeLoRA parameter; build it with bc.CollaborativeLoRA(...)")
    return {k: torch.cat(v) for k, v in blocks.items()}


def personal_subspace(sub: Subspace, task: int | Sequence[int]) -> Subspace:
    """A second subspace on the same model whose theta is only the personal entries (``D_t`` of
    every CollaborativeLoRA layer) of task ``task`` (or of each task in a list); the shared factors
    and the other tasks stay at their current values. Fit a new task on it with any engine
    (batches still carry the task ids); with a list, the engines see the tasks' ``D_t`` jointly
    (one prior scale for all of them, e.g. tuned by ``fit_laplace(tune_prior="marglik")``)."""
    layers = [m for m in sub.model.modules() if isinstance(m, CollaborativeLoRALinear)]
    if not layers:
        raise ValueError("this subspace has no CollaborativeLoRA layer; build it with bc.CollaborativeLoRA(...)")
    n_tasks = layers[0].n_tasks
    tasks = {int(task)} if isinstance(task, int) else {int(t) for t in task}
    if not tasks or any(not 0 <= t < n_tasks for t in tasks):
        raise ValueError(f"tasks must lie in 0 ... {n_tasks - 1} (n_tasks={n_tasks}), got {sorted(tasks)}")
    keep = {n for n in sub.param_names if _personal_task(n) in tasks and _is_collaborative_param(sub, n)}
    params = dict(sub.model.named_parameters())
    saved = {n: params[n].requires_grad for n in sub.param_names}
    try:  # a Subspace's theta is the model's trainable parameters when it is built
        for n in sub.param_names:
            params[n].requires_grad_(n in keep)
        return Subspace(sub.model, sub.specs, sub.output)
    finally:
        for n, flag in saved.items():
            params[n].requires_grad_(flag)
