"""Batches: split into inputs and targets, move to a device, check that they are finite.

A batch is ``(x, y)`` (``x`` a tensor, a dict of tensors or a tuple) or a dict with a
``"labels"`` entry (the transformers convention), whose other entries form ``x``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

import torch


def split_batch(batch: Any, index: int) -> tuple[Any, torch.Tensor]:
    """``(x, y)`` of one batch; ``index`` names the batch in errors."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(f"batch {index} is a dict without a 'labels' entry; give (x, y) pairs "
                             f"or dicts with 'labels' (keys: {list(batch)})")
        x = {k: v for k, v in batch.items() if k != "labels"}
        return x, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"batch {index} is a {type(batch).__name__}"
                     f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; "
                     f"expected an (x, y) pair or a dict with 'labels'")


def to_device(x: Any, device: torch.device | str | None) -> Any:
    """Move a tensor, or every tensor in a dict / tuple / list, to ``device``."""
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def tensors_of(x: Any) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in ``x``."""
    if isinstance(x, torch.Tensor):
        yield "", x
    elif isinstance(x, Mapping):
        for k, v in x.items():
            for name, t in tensors_of(v):
                yield f"[{k!r}]{name}", t
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            for name, t in tensors_of(v):
                yield f"[{i}]{name}", t


def check_finite(x: Any, what: str, index: int) -> None:
    """Raise ``ValueError`` naming the batch if a floating tensor in ``x`` has NaN or inf."""
    for name, t in tensors_of(x):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"batch {index}: {what}{name} has {bad} non-finite value(s) (NaN or inf); "
                             f"clean or mask the data before fitting")


def batch_size(x: Any) -> int:
    """Number of examples in ``x`` (the first axis of its first tensor)."""
    for _, t in tensors_of(x):
        return t.shape[0]
    raise ValueError("input holds no tensor")


def dataset_size(loader: Iterable) -> int:
    """Number of examples a loader yields: ``len(loader.dataset)`` when it has one, else counted."""
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        n = len(dataset)
    elif iter(loader) is loader:
        raise ValueError("the loader is a one-shot iterator: counting its examples would use it up; "
                         "pass a re-iterable loader (a DataLoader or a list of batches) or n_data=")
    else:
        n = sum(batch_size(split_batch(b, i)[0]) for i, b in enumerate(loader))
    if n == 0:
        raise ValueError("the loader is empty: it yields no batch; check the dataset and batch size")
    return n
