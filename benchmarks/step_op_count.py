"""Aten ops per training step: ConvCoLoRA in ``bc.fit_map`` vs the bare module step (issue 7).

The two ConvCoLoRA runs of ``benchmarks/conv_step_time.py`` (folded kernels, every spatial conv
of MobileNetV2 + a dense head): ``fit_map`` (theta one flat vector, ``sub(x, theta=theta)``, the
prior term, AdamW on theta) and the module step (the adapter parameters trained as module
parameters, ``sub(x)``, AdamW over them). On a GPU whose step is bound by kernel launches and
Python, every aten op the host dispatches costs launch time; the op count per step, unlike the
CPU time, is the same on CPU and GPU, so it is measured here with ``torch.profiler`` on the CPU
at a tiny size.

Per-step counts are differences: the ops of an epoch of ``2 n`` batches minus those of an epoch
of ``n`` batches, divided by ``n``, so the per-call set-up (optimiser, theta copy, the first
batch's checks, the end-of-epoch read-back) cancels. An op counts when it is a *leaf* of the
profiler's call tree (an ``aten::`` op that calls no other ``aten::`` op: the ones that run
kernels, views included; an ``aten::_foreach_*`` op counts once, as on CUDA, not its per-tensor
loop on the CPU). They are split into *kernel* ops, *no-kernel* ops (:data:`NO_KERNEL`: views,
allocations, no-op conversions: host work only) and *host reads* (``aten::_local_scalar_dense``,
a tensor's value read to Python: no kernel for a CPU tensor such as AdamW's step counters, a wait
for the device for a GPU tensor). Both runs' AdamW (``fit_map``'s included)
use ``foreach=True``, which is what AdamW defaults to on CUDA (on the CPU it defaults to the
per-parameter loop, whose ops a GPU run does not have). ``fit_map`` checks the data as it does
for batches that the loader yields on the GPU (``conv_step_time.py --device cuda`` does): on
the device, read back with the losses (``objective._on_host`` is patched to say so).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_op_count.py [--input-size 32] [--batch-size 4]
Prints the leaf ops per step of both runs and, grouped by name, those whose counts differ.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bayes_colora as bc  # noqa: E402
from bayes_colora.inference import objective  # noqa: E402
from conv_step_time import colora  # noqa: E402

#: leaf ops that run no kernel on a GPU: views, allocations, no-op conversions
NO_KERNEL = frozenset({"aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::alias", "aten::t",
                       "aten::transpose", "aten::permute", "aten::expand", "aten::unsqueeze",
                       "aten::squeeze", "aten::split", "aten::split_with_sizes", "aten::narrow",
                       "aten::slice", "aten::select", "aten::reshape", "aten::flatten", "aten::detach",
                       "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::lift_fresh",
                       "aten::resolve_conj", "aten::resolve_neg", "aten::result_type",
                       "aten::_reshape_alias", "aten::numpy_T", "aten::to"})
#: a tensor's value read back to Python
HOST_READ = "aten::_local_scalar_dense"


def kind(op: str) -> str:
    """``"host read"``, ``"no kernel"`` or ``"kernel"`` (module docstring)."""
    return "host read" if op == HOST_READ else "no kernel" if op in NO_KERNEL else "kernel"


class _ForeachAdamW(torch.optim.AdamW):
    """AdamW with ``foreach=True``, its default on CUDA."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "foreach": True})


def leaf_ops(run: Callable[[], None]) -> Counter:
    """Leaf ``aten::`` ops of one call of ``run``, counted by name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    counts: Counter = Counter()
    for e in prof.events():
        if e.name.startswith("aten::") and not _inside_foreach(e) and (
                e.name.startswith("aten::_foreach_")
                or not any(c.name.startswith("aten::") for c in e.cpu_children)):
            counts[e.name] += 1
    return counts


def _inside_foreach(event) -> bool:
    """Whether ``event`` runs inside an ``aten::_foreach_*`` op (on CPU a foreach op loops over
    per-tensor ops; on CUDA it is one fused launch per chunk of tensors, counted once here)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::_foreach_"):
            return True
        parent = parent.cpu_parent
    return False


def per_step(make: Callable[[list], Callable[[], None]], batches: list, n: int) -> dict[str, float]:
    """Leaf ops per step: (ops of ``2 n`` batches - ops of ``n`` batches) / ``n``, after a warm-up."""
    short, long = make(batches[:n]), make(batches[:2 * n])
    short(), long()
    a, b = leaf_ops(short), leaf_ops(long)
    return {k: (b[k] - a[k]) / n for k in set(a) | set(b) if b[k] != a[k]}


def fit_map_run(sub: bc.Subspace) -> Callable[[list], Callable[[], None]]:
    lik, prior = bc.Categorical(), bc.NormalPrior(1.0)

    def make(batches: list) -> Callable[[], None]:
        return lambda: bc.fit_map(sub, batches, lik, prior=prior, epochs=1, lr=1e-3, progress=False,
                                  n_data=len(batches) * len(batches[0][1]))
    return make


def module_run(sub: bc.Subspace) -> Callable[[list], Callable[[], None]]:
    opt = torch.optim.AdamW([p for p in sub.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)

    def make(batches: list) -> Callable[[], None]:
        def epoch() -> None:
            pending = []
            for x, y in batches:
                loss = F.cross_entropy(sub(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                pending.append(loss.detach())
            torch.stack(pending).tolist()
        return epoch
    return make


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n", type=int, default=2, help="steps in the short epoch (the long one has 2n)")
    p.add_argument("--fold", type=int, default=1, help="1: folded kernels (default), 0: two convolutions")
    args = p.parse_args()
    args.device = "cpu"
    torch.optim.AdamW = _ForeachAdamW  # for fit_map's optimiser too (it looks AdamW up per call)
    objective._on_host = lambda t: False  # the data counts as on the GPU (module docstring)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(args.batch_size, 1, 28, 28, generator=g),
                torch.randint(0, 2, (args.batch_size,), generator=g)) for _ in range(2 * args.n)]
    fit = per_step(fit_map_run(colora(args, bool(args.fold))), batches, args.n)
    mod = per_step(module_run(colora(args, bool(args.fold))), batches, args.n)

    kinds = ("kernel", "no kernel", "host read")
    print(f"{args.backbone}, {args.input_size}x{args.input_size}, batch {args.batch_size}, "
          f"{'folded' if args.fold else 'two convolutions'}: leaf aten ops per step\n")
    print("| step | kernel ops | no-kernel ops | host reads | all |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, c in (("fit_map", fit), ("module step", mod)):
        totals = [sum(v for k, v in c.items() if kind(k) == which) for which in kinds]
        print(f"| {name} | " + " | ".join(f"{t:.0f}" for t in totals) + f" | {sum(c.values()):.0f} |")
    print("\n| op | kind | fit_map | module step | difference |")
    print("| --- | --- | ---: | ---: | ---: |")
    diff = {k: fit.get(k, 0) - mod.get(k, 0) for k in set(fit) | set(mod)}
    for k in sorted(diff, key=lambda k: (kinds.index(kind(k)), -abs(diff[k]), k)):
        if diff[k]:
            print(f"| {k} | {kind(k)} | {fit.get(k, 0):g} | {mod.get(k, 0):g} | {diff[k]:+g} |")

if __name__ == "__main__":
    main()
