"""``chunk_size="auto"``: the fastest number of posterior samples to evaluate at once, measured.

One vectorised call over all ``S`` samples saves per-call overhead and runs the frozen layers
below the first adapter once, but its activations are ``S`` times larger than one sample's; on a
CPU, elementwise work on tensors that no longer fit in cache can make it slower than a loop
(``docs/performance.md``: a 4-layer ViT took 0.75x the loop's time at once and 1.16x in chunks of
8). Which wins depends on the model, the input and the machine, so it is measured, as cuDNN's
``benchmark`` mode measures convolution algorithms: the first call with a given number of samples
and input shapes times each candidate (all at once, and chunks of 16, 8 and 4 where smaller than
``S``) twice, keeps the fastest, and remembers it for later calls with the same shapes.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Hashable, Mapping

import torch

#: chunk sizes tried besides ``None`` (all samples at once), where smaller than ``S``
CANDIDATES = (16, 8, 4)
#: timed runs per candidate; the fastest counts (the first run also pays allocations)
RUNS = 2


def shape_key(x: Any) -> Hashable:
    """A hashable description of the shapes, dtypes and devices of the tensors in ``x`` (a
    tensor, a mapping or a sequence of them; other values by type)."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device.type)
    if isinstance(x, Mapping):
        return tuple((k, shape_key(v)) for k, v in sorted(x.items()))
    if isinstance(x, (tuple, list)):
        return tuple(shape_key(v) for v in x)
    return type(x).__name__


def fastest_chunk(run: Callable[[int | None], Any], n_samples: int, device: torch.device,
                  clock: Callable[[], float] = time.perf_counter) -> int | None:
    """The chunk size (``None``: all ``n_samples`` at once) for which ``run(chunk_size)`` took the
    least time, each candidate run :data:`RUNS` times, synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best, best_time = None, float("inf")
    for chunk in (None, *(c for c in CANDIDATES if c < n_samples)):
        for _ in range(RUNS):
            sync()
            start = clock()
            run(chunk)
            sync()
            elapsed = clock() - start
            if elapsed < best_time:
                best, best_time = chunk, elapsed
    return best


def resolve_chunk(chunk_size: int | str | None, cache: dict, key: Hashable,
                  run: Callable[[int | None], Any], n_samples: int, device: torch.device) -> int | None:
    """``chunk_size`` itself, or for ``"auto"`` the :func:`fastest_chunk` for ``key``, measured on
    the first call and kept in ``cache``."""
    if chunk_size != "auto":
        if chunk_size is not None and (isinstance(chunk_size, str) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, None or 'auto', got {chunk_size!r}")
        return chunk_size
    if key not in cache:
        cache[key] = fastest_chunk(run, n_samples, device)
    return cache[key]
