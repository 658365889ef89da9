"""Time per training step: full fine-tuning vs ConvCoLoRA, folded vs two convolutions (issue 7).

The steps are those of ``studies/conv_classification.py``: full fine-tuning is its plain AdamW
loop over every parameter; ConvCoLoRA (every spatial kernel of MobileNetV2 + the head, as in the
study) trains with ``bc.fit_map`` for one epoch over ``--steps`` batches, once with the folded
forward (one convolution with ``W + dW``) and once with ``fold = False`` (``base(x) + conv(x, dW)``).
``module step`` runs the same folded network without ``fit_map``: the adapter parameters are
trained as module parameters (``sub(x)``, AdamW over them), which isolates ``fit_map``'s own cost
(``functional_call`` with theta, finiteness checks). Every number is the median over
``--repeats`` rounds of an epoch's time divided by ``--steps``: wall time (synchronised on CUDA)
and the process's CPU time (on a shared CPU machine the steadier of the two).

Run: .venv/bin/python benchmarks/conv_step_time.py [--input-size 64] [--batch-size 32] [--device cpu]
Prints a markdown table (ms per step and ratio to full fine-tuning, measured in one run).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bayes_colora as bc  # noqa: E402
from bayes_colora.classification import classifier, conv_targets  # noqa: E402
from bayes_colora.inference.objective import CHECK_EVERY  # noqa: E402


def colora(args: argparse.Namespace, fold: bool) -> bc.Subspace:
    torch.manual_seed(0)
    model = classifier(args.backbone, 2, None, args.input_size).to(args.device)
    sub = bc.Subspace.from_model(model, [bc.ConvCoLoRA(targets=conv_targets(model, "spatial")),
                                         bc.DenseDelta(targets="^" + model.head_name.replace(".", r"\.") + "$")])
    for layer in sub.adapter_layers().values():
        if hasattr(layer, "fold"):
            layer.fold = fold
    return sub


def adamw_epoch(forward: Callable[[torch.Tensor], torch.Tensor], params: list, lr: float,
                batches: list, weight_decay: float = 0.01) -> Callable[[], None]:
    """One epoch of plain AdamW steps on cross-entropy over ``batches``, reading the losses back
    from the device as ``fit_map`` does: every ``CHECK_EVERY`` batches and at the end."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def epoch() -> None:
        pending = []
        for i, (x, y) in enumerate(batches, 1):
            loss = F.cross_entropy(forward(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pending.append(loss.detach())
            if i % CHECK_EVERY == 0 or i == len(batches):
                torch.stack(pending).tolist()
                pending.clear()
    return epoch


def full_epoch(args: argparse.Namespace, batches: list) -> Callable[[], None]:
    torch.manual_seed(0)
    model = classifier(args.backbone, 2, None, args.input_size).to(args.device).eval()
    forward = torch.compile(model) if args.compile else model
    return adamw_epoch(forward, list(model.parameters()), 1e-4, batches, weight_decay=1e-5)


def fit_map_epoch(sub: bc.Subspace, batches: list, compile: bool) -> Callable[[], None]:
    lik, prior = bc.Categorical(), bc.NormalPrior(1.0)
    return lambda: bc.fit_map(sub, batches, lik, prior=prior, epochs=1, lr=1e-3, progress=False,
                              n_data=len(batches) * len(batches[0][1]), compile=compile)


def module_epoch(sub: bc.Subspace, batches: list, compile: bool) -> Callable[[], None]:
    return adamw_epoch(torch.compile(sub) if compile else sub,
                       [p for p in sub.parameters() if p.requires_grad], 1e-3, batches)


def timed(runs: dict[str, Callable[[], None]], steps: int, repeats: int,
          device: torch.device) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per step of each run over ``repeats`` rounds, the runs
    taking turns within each round (so a load change on a shared machine hits all of them),
    after one warm-up epoch each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for run in runs.values():
        run()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            sync()
            times[name].append(((time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps))
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
            for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="batches per timed epoch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every run's forward (fit_map(compile=True)); the warm-up epoch compiles")
    args = p.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(args.batch_size, 1, 28, 28, generator=g).to(dev),
                torch.randint(0, 2, (args.batch_size,), generator=g).to(dev)) for _ in range(args.steps)]
    folded, two_conv = colora(args, True), colora(args, False)
    runs = {"full fine-tuning (AdamW, all parameters)": full_epoch(args, batches),
            "ConvCoLoRA, folded (fit_map)": fit_map_epoch(folded, batches, args.compile),
            "ConvCoLoRA, two convolutions (fit_map)": fit_map_epoch(two_conv, batches, args.compile),
            "ConvCoLoRA, folded (module step, no fit_map)": module_epoch(folded, batches, args.compile)}
    times = timed(runs, args.steps, args.repeats, dev)
    full_wall, full_cpu = next(iter(times.values()))
    print(f"{args.backbone}, {args.input_size}x{args.input_size}, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats} rounds of {args.steps} steps"
          f"{', torch.compile' if args.compile else ''}\n")
    print("| step | wall ms per step | ratio to full | process CPU ms per step | ratio to full |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (wall, cpu) in times.items():
        print(f"| {name} | {1e3 * wall:.1f} | {wall / full_wall:.2f} | {1e3 * cpu:.1f} | {cpu / full_cpu:.2f} |")

if __name__ == "__main__":
    main()
