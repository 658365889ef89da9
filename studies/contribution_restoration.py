r"""Contribution-based CoLoRA for real-noise denoising (Wu et al. 2024), with Bayesian adapters.

1. PROD pre-training of a compact NAFNet (heteroscedastic output: mean and log variance) on
   clean images (``DATA/clean``) plus procedural images, degraded by a random subset of blur,
   noise, rain, JPEG and motion blur in random order.
2. For each number of training pairs n (PolyU real noisy / clean, random crops): full
   fine-tuning, uniform-rank LoRA, and ContributionLoRA at the uniform LoRA's parameter budget,
   with ranks from FAIG layer contributions (``bc.contribution_scores``, integrated gradients
   from the pre-trained to the fully fine-tuned network); then Laplace (GGN diagonal from
   Rademacher probes) and SWAG posteriors over the ContributionLoRA parameters.
3. PSNR / SSIM on held-out pairs, trainable parameters, and how well the per-pixel predictive
   std ranks the actual errors (AUSE / AURG, RMSE sparsification). Every row also stores each
   metric per test image (``per_image``; the row's metric is their mean), and ``results.md``
   gives paired per-image differences (mean ± standard error) between methods at each n.

The test set is a fixed set of held-out pairs (the last ``test_pairs`` of a seeded permutation);
training pairs are the first n of the rest, so the sets for growing n are nested. Every method
trains on the left part of each training pair; the right ``val_width`` columns are a validation
strip, never trained on, from which fixed crops tune the Bayesian posteriors' width.

The independent-pixel likelihood counts every pixel of a crop as separate evidence, although
neighbouring errors are strongly correlated, so the posterior over the adapter can come out too
narrow and its epistemic variance negligible next to the aleatoric one. ``--tune validation``
(the default) therefore chooses the Laplace prior precision ``delta`` and temperature ``T``
jointly (``bc.fit_laplace(..., tune_prior="gridsearch", temperature_grid=...)``: covariance
``(G / T + delta)^{-1}``) and a SWAG covariance scale ``s`` (``Sigma -> s Sigma``), each by the
Gaussian NLL of the predictive on the validation crops. ``--tune marglik`` is the untempered
baseline: the marginal-likelihood ``delta`` at ``T = 1`` and SWAG as fitted.

Resuming: each finished cell (one method at one n) goes into ``OUT/results.json`` at once
(atomically), with the FAIG scores and the rank allocation of its n; the pre-trained network is
saved to ``OUT/pretrained.pt`` right after pre-training and the ContributionLoRA MAP to
``OUT/map_n{n}.pt``. A rerun with the same ``--out`` (and the same settings; ``--pairs`` may
differ) reuses them and computes only the missing cells. Every cell seeds its own random
numbers, so a resumed cell reproduces what an uninterrupted run computes (on the same device).
``results.md`` is rewritten after every cell, the figures at the end of every run.

``--combine DIR [DIR ...] --out OUT`` trains nothing: it joins study folders run with different
``--seed`` (and ``--pairs``), the same settings otherwise, into ``OUT/results.json`` and
``OUT/results.md``: per n and method the mean ± sample sd over seeds of PSNR, SSIM and AURG; per n
the paired differences over seeds (ContributionLoRA - uniform and - full in PSNR, SWAG - MAP and
Laplace - MAP in AURG) as mean ± SE, per seed and pooled per image; and the targets on the means.

``--quick`` runs on synthetic data (procedural images with signal-dependent noise) on the CPU
in under 3 minutes. The full run (``--data``) needs ``polyu/`` and ``clean/`` under the data
folder (``bayes_colora.restoration.pack`` writes a 12 MB copy).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

import bayes_colora as bc
from bayes_colora import metrics as M
from bayes_colora import restoration as R
from bayes_colora.adapters.contribution import lora_shape
from bayes_colora.contribution import finetune, scored_layers
from bayes_colora.metrics import DEFAULT_FRACTIONS, sparsification_curve
from bayes_colora.predictive import Predictive
from bayes_colora.subspace import _atomic_write

# Laplace (delta, T) and SWAG scale grids, searched on the validation crops (coarser for --quick).
# The GPU grid of 2026-11-24 (delta 1e-1..1e5, T 1..1e5, SWAG scale 1e-1..1e4) chose its edges:
# delta 1e5 with T 1 at n = 16 and 32, SWAG scale 0.1 at every n; so each grid now reaches two
# decades past the edge it chose (delta to 1e7, T down to 0.1, SWAG scale down to 1e-3).
GRIDS = dict(prior_grid=[10.0 ** e for e in range(-1, 8)],
             temperature_grid=[10.0 ** (e / 2) for e in range(-2, 11)],
             swag_scales=[10.0 ** (e / 2) for e in range(-6, 9)])
QUICK_GRIDS = dict(prior_grid=GRIDS["prior_grid"], temperature_grid=[10.0 ** e for e in range(0, 6)],
                   swag_scales=[10.0 ** e for e in range(-1, 5)])
QUICK = dict(model="tiny", pairs=(8, 16), test_pairs=8, image=64, crop=32, crops_per_epoch=64,
             batch=8, epochs=10, swag_epochs=3, pretrain_steps=400, pretrain_seconds=None,
             pretrain_crop=32, pretrain_batch=8, procedural=48, ig_steps=4, ig_batches=2,
             laplace_rank=8, samples=8, workers=0, lr_lora=2e-3, lr_full=5e-4,
             val_width=16, val_crops=16, example=64, **QUICK_GRIDS)
FULL = dict(model="small", pairs=(16, 32, 64), test_pairs=16, image=None, crop=64, crops_per_epoch=512,
            batch=16, epochs=20, swag_epochs=8, pretrain_steps=100000, pretrain_seconds=90.0,
            pretrain_crop=64, pretrain_batch=32, procedural=256, ig_steps=16, ig_batches=4,
            laplace_rank=20, samples=16, workers=8, lr_lora=2e-3, lr_full=3e-4,
            val_width=64, val_crops=64, example=192, **GRIDS)
# the cells of one n, in the order they run and appear in the table
CELLS = {"noisy": "noisy input", "pretrained": "pre-trained (PROD)", "full": "full fine-tuning",
         "uniform": "LoRA, uniform rank {rank}", "map": "ContributionLoRA (MAP)",
         "laplace": "ContributionLoRA + Laplace", "swag": "ContributionLoRA + SWAG"}
ORDER = list(CELLS)


def synthetic_pairs(n: int, size: int, seed: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Procedural clean images with signal-dependent (Poisson-Gaussian) noise of variance
    ``0.01 x + 0.0001`` per pixel: a stand-in for sensor noise, unlike PROD's constant-variance
    Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    clean = R.procedural_images(n, size, g)
    noisy = (clean + (0.01 * clean + 1e-4).sqrt() * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    return [(f"synthetic_{i}", noisy[i], clean[i]) for i in range(n)]


def split(pairs: list, test_pairs: int, seed: int) -> tuple[list, list]:
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    if test_pairs >= len(pairs):
        raise ValueError(f"{len(pairs)} pairs leave none to train on after {test_pairs} test pairs")
    pool = [pairs[i] for i in order[:len(pairs) - test_pairs]]
    test = [pairs[i] for i in order[len(pairs) - test_pairs:]]
    return pool, test


def evaluate(predict_fn: Callable, test: list, device: str
             ) -> tuple[dict[str, float], dict[str, list[float]], Predictive]:
    """``(metrics, per_image, pred)`` over the m test pairs, predicted one image at a time.

    ``per_image[k][i]`` is ``R.evaluate_restoration`` of test image ``i`` alone (m values per
    metric, in test order) and ``metrics[k] = (1/m) sum_i per_image[k][i]``. This is the
    aggregate ``R.evaluate_restoration`` forms on the whole batch: PSNR, SSIM, AUSE and the AURGs
    are per-image values averaged over images, and the NLL, a mean per element over all pixels,
    is the mean of the per-image NLLs because every test image has the same number of elements
    (they are stacked). The two agree up to float rounding. ``pred`` holds the m predictions
    concatenated, ``(m, C, H, W)`` per field."""
    preds = [predict_fn(a[None].to(device)).to("cpu") for _, a, _ in test]
    per = [R.evaluate_restoration(p, b[None]) for p, (_, _, b) in zip(preds, test)]
    per_image = {k: [v[k] for v in per] for k in per[0]}
    pred = Predictive(*(torch.cat([getattr(p, f) for p in preds]) for f in
                        ("mean", "aleatoric", "epistemic", "total")))
    return {k: sum(v) / len(v) for k, v in per_image.items()}, per_image, pred


def plain_predictor(model: torch.nn.Module, lik: bc.Gaussian) -> Callable:
    @torch.no_grad()
    def fn(x):
        return Predictive(**lik.moments(model(x)[None].float()))
    return fn


def validation_nll(sub: bc.Subspace, post, val: DataLoader, n_samples: int, seed: int) -> float:
    """Mean Gaussian NLL per element of ``N(pred.mean, pred.total)`` over ``val``; batch ``i``
    draws its samples from a generator seeded ``seed + i`` (common random numbers across
    posteriors, so a grid search compares like with like)."""
    total, count = 0.0, 0
    for i, (x, y) in enumerate(val):
        gen = torch.Generator(device=sub.device).manual_seed(seed + i)
        pred = bc.predict(sub, post, x.to(sub.device), n_samples, generator=gen, chunk_size=4)
        total += M.gaussian_nll(pred.mean, pred.total, y.to(pred.mean)) * y.numel()
        count += y.numel()
    return total / count


class Results:
    """``OUT/results.json``: the finished cells (``rows``, one per method and n), the FAIG scores
    and rank allocations per n, the pre-training record and one record per run, saved atomically
    after every change; ``results.md`` follows every save. ``config`` holds every setting a cell
    depends on; a rerun with other settings is refused rather than mixed in."""

    def __init__(self, out: Path, config: dict, device: str, pairs: list[int]):
        self.out, self.path, self.t0 = out, out / "results.json", time.perf_counter()
        config = json.loads(json.dumps(config))  # tuples -> lists, as stored
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            old = self.data["config"]
            diff = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config))
                    if old.get(k) != config.get(k)]
            if diff:
                raise SystemExit(f"error: {self.path} was made with other settings ({'; '.join(diff)}); "
                                 f"pass the same flags to resume it, or another --out to start anew")
        else:
            self.data = {"config": config, "network_params": None, "pretrain": None, "runs": [],
                         "rows": [], "scores": {}, "allocation": {}}
        self.data["runs"].append({"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  "device": device, "pairs": pairs, "cells": []})
        self.run = len(self.data["runs"])

    def get(self, n: int, key: str) -> dict | None:
        return next((r for r in self.data["rows"] if r["pairs"] == n and r["key"] == key), None)

    def put(self, row: dict, **sections: dict) -> None:
        """Add (or replace) the row of cell ``(row["pairs"], row["key"])`` and merge ``sections``
        (e.g. ``scores={"16": {...}}``) into the top level; then save."""
        row = {**row, "run": self.run}
        rows = [r for r in self.data["rows"] if (r["pairs"], r["key"]) != (row["pairs"], row["key"])]
        self.data["rows"] = sorted(rows + [row], key=lambda r: (r["pairs"], ORDER.index(r["key"])))
        for name, values in sections.items():
            self.data[name].update(values)
        self.data["runs"][-1]["cells"].append(f"{row['pairs']}/{row['key']}")
        self.save()

    def save(self) -> None:
        self.data["runs"][-1]["seconds"] = round(time.perf_counter() - self.t0, 1)
        _atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(self.data, indent=1)))
        write_table(self.data, self.out)


def state_fingerprint(state: dict[str, torch.Tensor]) -> float:
    """``sum |w|`` over all floating-point entries, in float64: tells two networks apart."""
    return sum(float(v.double().abs().sum()) for v in state.values() if v.is_floating_point())


class Study:
    """The cells of the study and what they share (data, pre-trained network, results)."""

    def __init__(self, args: argparse.Namespace, cfg: dict, pool: list, test: list,
                 results: Results, model: torch.nn.Module):
        self.args, self.cfg, self.pool, self.test, self.results = args, cfg, pool, test, results
        self.model, self.device, self.progress = model, args.device, not args.no_progress
        self.out = Path(args.out)
        self.lik = bc.Gaussian(heteroscedastic=True, dim=1)
        self.prior = bc.NormalPrior(scale=1.0)
        self.n_total = sum(p.numel() for p in model.parameters())
        conv_cost = sum(sum(lora_shape(l)) for l in scored_layers(model, types=(torch.nn.Conv2d,)).values())
        self.rank = max(1, round(args.budget * self.n_total / conv_cost))

    # ------------------------------------------------------------------ data
    def train_pairs(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first n pool pairs without their right ``val_width`` columns."""
        w = self.cfg["val_width"]
        return [(a[..., :a.shape[-1] - w], b[..., :b.shape[-1] - w]) for _, a, b in self.pool[:n]]

    def loader(self, n: int, per: int | None = None, shuffle: bool = True, offset: int = 0) -> DataLoader:
        """Random crops of the training part of n pairs: ``per`` per pair, by default
        ``crops_per_epoch / n`` (so every n trains for the same number of steps). A fresh loader
        with a fixed seed, so each cell sees the same crops whatever ran before it."""
        seed = self.args.seed + n + offset
        per = per or max(1, self.cfg["crops_per_epoch"] // n)
        ds = R.PairCrops(self.train_pairs(n), self.cfg["crop"], per, seed)
        return DataLoader(ds, batch_size=self.cfg["batch"], shuffle=shuffle,
                          generator=torch.Generator().manual_seed(seed))

    def val_loader(self, n: int) -> DataLoader:
        """``val_crops`` fixed ``crop x val_width`` windows of the validation strips of the n
        training pairs (pair ``i % n`` for window ``i``, at a seeded random height), in fixed
        batches."""
        w, h, g = self.cfg["val_width"], self.cfg["crop"], torch.Generator().manual_seed(self.args.seed + 7919 * n)
        xs, ys = [], []
        for i in range(self.cfg["val_crops"]):
            _, a, b = self.pool[i % n]
            top = int(torch.randint(a.shape[-2] - h + 1, (), generator=g))
            xs.append(a[..., top:top + h, a.shape[-1] - w:])
            ys.append(b[..., top:top + h, b.shape[-1] - w:])
        return DataLoader(TensorDataset(torch.stack(xs), torch.stack(ys)), batch_size=self.cfg["batch"],
                          shuffle=False)

    # ------------------------------------------------------------------ helpers
    def seed(self, n: int, key: str) -> int:
        """Seed the global RNG for cell ``(n, key)`` and return the seed."""
        s = self.args.seed * 1_000_003 + 101 * n + ORDER.index(key)
        torch.manual_seed(s)
        return s

    def contribution_subspace(self, n: int) -> tuple[bc.Subspace, bc.ContributionLoRA]:
        """ContributionLoRA on the pre-trained network at the uniform LoRA's budget, ranks from
        the stored FAIG scores of n."""
        uni = bc.Subspace.from_model(copy.deepcopy(self.model), bc.LoRA(rank=self.rank, types=(torch.nn.Conv2d,)))
        spec = bc.ContributionLoRA(budget=uni.dim, scores=self.results.data["scores"][str(n)],
                                   types=(torch.nn.Conv2d,))
        return bc.Subspace.from_model(copy.deepcopy(self.model), spec), spec

    def map_theta(self, n: int, dim: int) -> torch.Tensor:
        theta = torch.load(self.out / f"map_n{n}.pt", map_location=self.device)
        if theta.shape != (dim,):
            raise SystemExit(f"error: {self.out / f'map_n{n}.pt'} holds {tuple(theta.shape)} parameters, the "
                             f"ContributionLoRA has {dim}; delete it and its rows to recompute them")
        return theta

    def record(self, n: int, key: str, params: int, predict_fn: Callable, started: float,
               sections: dict | None = None, **extra) -> dict:
        """Evaluate on the test pairs, keep an example (MAP and Bayesian cells), store the row
        (with ``per_image``: each metric of each test image, whose means are the row's metrics)."""
        metrics, per_image, pred = evaluate(predict_fn, self.test, self.device)
        clean = torch.stack([b for _, _, b in self.test])
        err, unc = R.pixel_error_and_uncertainty(pred.mean, pred.total, clean)
        row = {"pairs": n, "key": key, "method": CELLS[key].format(rank=self.rank), "params": params,
               **metrics, **extra,
               "sparsification": [round(v, 7) for v in sparsification_curve(err, unc, reduce="rms").mean(0).tolist()],
               "oracle": [round(v, 7) for v in sparsification_curve(err, err, reduce="rms").mean(0).tolist()],
               "per_image": per_image}
        if key in ("map", "laplace", "swag"):
            self.save_example(n, key, pred)
        row["seconds"] = round(time.perf_counter() - started, 1)
        self.results.put(row, **(sections or {}))
        tuned = {k: v for k, v in extra.items() if k in ("prior_precision", "temperature", "swag_scale")}
        print(f"n = {n}: {row['method']}: {row['seconds']:.0f} s, PSNR {row['psnr']:.2f}, AURG "
              f"{row['aurg']:.4f} (aleatoric {row['aurg_aleatoric']:.4f}, epistemic "
              f"{row['aurg_epistemic']:.4f}) {tuned or ''}", flush=True)
        return row

    def save_example(self, n: int, key: str, pred: Predictive) -> None:
        """The central ``example`` square of test image 0, float16: noisy, clean, restored mean,
        and the per-pixel RMS total and epistemic std."""
        crop = lambda t: R.center_crop(t, self.cfg["example"]).half()  # noqa: E731
        _, noisy, clean = self.test[0]
        ex = {"noisy": crop(noisy), "clean": crop(clean), "mean": crop(pred.mean[0]),
              "std": crop(pred.total[0].mean(0).sqrt()), "epistemic": crop(pred.epistemic[0].mean(0).sqrt())}
        _atomic_write(self.out / f"example_n{n}_{key}.pt", lambda tmp: torch.save(ex, tmp))

    # ------------------------------------------------------------------ cells
    def noisy(self, n: int) -> None:
        """PSNR and SSIM of the noisy inputs: per test image, and their means."""
        per_image = {"psnr": [R.psnr(a[None], b[None]) for _, a, b in self.test],
                     "ssim": [R.ssim(a[None], b[None]) for _, a, b in self.test]}
        self.results.put({"pairs": n, "key": "noisy", "method": CELLS["noisy"], "params": 0,
                          **{k: sum(v) / len(v) for k, v in per_image.items()}, "per_image": per_image})

    def pretrained(self, n: int) -> None:
        self.record(n, "pretrained", 0, plain_predictor(self.model, self.lik), time.perf_counter())

    def full(self, n: int) -> None:
        """Full fine-tuning, then the FAIG scores along the path to it (saved with the row)."""
        t0, _ = time.perf_counter(), self.seed(n, "full")
        loader = self.loader(n)
        full = finetune(self.model, loader, R.gaussian_nll_loss, steps=self.cfg["epochs"] * len(loader),
                        lr=self.cfg["lr_full"], progress=self.progress)
        scores = bc.contribution_scores(self.model, self.loader(n, offset=500), R.gaussian_nll_loss,
                                        finetuned=full, steps=self.cfg["ig_steps"], types=(torch.nn.Conv2d,),
                                        max_batches=self.cfg["ig_batches"], progress=self.progress)
        self.record(n, "full", self.n_total, plain_predictor(full, self.lik), t0,
                    sections={"scores": {str(n): scores}})

    def uniform(self, n: int) -> None:
        t0, _ = time.perf_counter(), self.seed(n, "uniform")
        uni = bc.Subspace.from_model(copy.deepcopy(self.model), bc.LoRA(rank=self.rank, types=(torch.nn.Conv2d,)))
        post = bc.fit_map(uni, self.loader(n), self.lik, prior=self.prior, epochs=self.cfg["epochs"],
                          lr=self.cfg["lr_lora"], progress=self.progress)
        self.record(n, "uniform", uni.dim, lambda x: bc.predict(uni, post, x), t0)

    def map(self, n: int) -> None:
        """ContributionLoRA MAP; theta saved to ``map_n{n}.pt`` for the Bayesian cells."""
        t0, _ = time.perf_counter(), self.seed(n, "map")
        sub, spec = self.contribution_subspace(n)
        post = bc.fit_map(sub, self.loader(n), self.lik, prior=self.prior, epochs=self.cfg["epochs"],
                          lr=self.cfg["lr_lora"], progress=self.progress)
        theta = sub.theta.detach().cpu()
        _atomic_write(self.out / f"map_n{n}.pt", lambda tmp: torch.save(theta, tmp))
        self.record(n, "map", sub.dim, lambda x: bc.predict(sub, post, x), t0,
                    sections={"allocation": {str(n): spec.allocation()}})

    def laplace(self, n: int) -> None:
        """Laplace at the MAP (diagonal or low-rank GGN): ``(delta, T)`` by validation NLL, or
        the marginal-likelihood ``delta`` at ``T = 1`` (``--tune marglik``)."""
        t0, s = time.perf_counter(), self.seed(n, "laplace")
        sub, _ = self.contribution_subspace(n)
        sub.theta = self.map_theta(n, sub.dim)
        if self.args.tune == "marglik":
            tune = dict(tune_prior="marglik")
        else:
            tune = dict(tune_prior="gridsearch", val_loader=self.val_loader(n), n_samples=self.cfg["samples"],
                        prior_grid=self.cfg["prior_grid"], temperature_grid=self.cfg["temperature_grid"])
        post = bc.fit_laplace(sub, self.loader(n, per=1, shuffle=False, offset=1000), self.lik, prior=self.prior,
                              hessian=self.args.laplace, rank=self.cfg["laplace_rank"],
                              diag_probes=self.cfg["laplace_rank"], chunk_size=16, progress=self.progress,
                              generator=torch.Generator(device=self.device).manual_seed(s), **tune)
        rec = post.history[-1]
        gen = torch.Generator(device=self.device).manual_seed(s)
        # linearised, with antithetic samples: for even S the mean is f(x; theta*) exactly
        self.record(n, "laplace", sub.dim,
                    lambda x: bc.predict(sub, post, x, n_samples=self.cfg["samples"], linearized=True,
                                         generator=gen, chunk_size=4), t0,
                    prior_precision=rec.get("prior_precision"), temperature=rec["temperature"])

    def swag(self, n: int) -> None:
        """SWAG (Adam) from the MAP; its covariance scale by validation NLL (``--tune validation``)."""
        t0, s = time.perf_counter(), self.seed(n, "swag")
        sub, _ = self.contribution_subspace(n)
        sub.theta = self.map_theta(n, sub.dim)
        loader = self.loader(n)
        post = bc.fit_swag(sub, loader, self.lik, prior=self.prior, epochs=self.cfg["swag_epochs"],
                           lr=self.cfg["lr_lora"] / 4, optimizer="adam", rank=10,
                           collect=max(1, len(loader) // 2), progress=self.progress)
        extra = {"swag_scale": 1.0}
        if self.args.tune == "validation":
            val = self.val_loader(n)
            nll = {c: validation_nll(sub, post.scaled(c), val, self.cfg["samples"], s)
                   for c in self.cfg["swag_scales"]}
            extra = {"swag_scale": min(nll, key=nll.get), "swag_val_nll": [round(v, 5) for v in nll.values()]}
        post = post.scaled(extra["swag_scale"])
        gen = torch.Generator(device=self.device).manual_seed(s)
        self.record(n, "swag", sub.dim,
                    lambda x: bc.predict(sub, post, x, n_samples=self.cfg["samples"], generator=gen,
                                         chunk_size=4), t0, **extra)


def load_data(args: argparse.Namespace, cfg: dict) -> tuple[list, list]:
    """``(pairs, clean images)``: PolyU and ``DATA/clean`` (real), or synthetic pairs and none."""
    if args.data is None:
        return synthetic_pairs(max(cfg["pairs"]) + cfg["test_pairs"], cfg["image"], args.seed + 1), []
    data = Path(args.data)
    pairs = R.polyu_pairs(data / "polyu")
    clean = R.clean_images(data / "clean", min_size=cfg["pretrain_crop"]) if (data / "clean").is_dir() else []
    if cfg["image"]:  # quick on real data: central crops keep the CPU time small
        pairs = [(n, R.center_crop(a, cfg["image"]), R.center_crop(b, cfg["image"])) for n, a, b in pairs]
    return pairs, clean


def pretrained_network(args: argparse.Namespace, cfg: dict, results: Results, clean: list) -> torch.nn.Module:
    """The PROD-pre-trained NAFNet: loaded from ``--pretrained`` or ``OUT/pretrained.pt`` when
    one exists (checked against the fingerprint in results.json), else trained and saved to
    ``OUT/pretrained.pt`` at once."""
    out, device = Path(args.out), args.device
    model = R.nafnet(cfg["model"]).to(device)
    own = out / "pretrained.pt"
    source = Path(args.pretrained) if args.pretrained and Path(args.pretrained).exists() else own
    record = results.data["pretrain"]
    if source.exists():
        state = torch.load(source, map_location="cpu")
        fingerprint = state_fingerprint(state)
        if record and not math.isclose(fingerprint, record["fingerprint"], rel_tol=1e-9):
            raise SystemExit(f"error: {source} is not the network the cells in {results.path} were "
                             f"computed with; pass the same weights, or another --out")
        model.load_state_dict(state)
        if source != own:
            _atomic_write(own, lambda tmp: torch.save(state, tmp))
        print(f"loaded the pre-trained network from {source}", flush=True)
        if not record:
            results.data["pretrain"] = {"source": str(source), "fingerprint": fingerprint}
    else:
        if results.data["rows"]:
            raise SystemExit(f"error: {results.path} holds finished cells but {own} is missing; put the "
                             f"pre-trained weights back, or use another --out")
        g = torch.Generator().manual_seed(args.seed)
        side = 128 if args.data is not None and not args.quick else cfg["pretrain_crop"] * 2
        t0 = time.perf_counter()
        losses = R.pretrain(model, clean + list(R.procedural_images(cfg["procedural"], side, g)),
                            steps=cfg["pretrain_steps"], seconds=cfg["pretrain_seconds"],
                            batch_size=cfg["pretrain_batch"], crop=cfg["pretrain_crop"],
                            workers=cfg["workers"], seed=args.seed, progress=not args.no_progress)
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        _atomic_write(own, lambda tmp: torch.save(state, tmp))
        results.data["pretrain"] = {"source": "trained", "steps": len(losses), "final_loss": losses[-1],
                                    "seconds": round(time.perf_counter() - t0, 1),
                                    "fingerprint": state_fingerprint(state)}
        print(f"pre-trained for {len(losses)} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    results.data["network_params"] = sum(p.numel() for p in model.parameters())
    results.save()
    return model


def run(args: argparse.Namespace) -> dict:
    """Compute every cell of ``--pairs`` that ``OUT/results.json`` does not hold yet; returns
    the results."""
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("epochs", "pretrain_seconds"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.pairs:
        cfg["pairs"] = tuple(args.pairs)
    torch.manual_seed(args.seed)
    pairs, clean = load_data(args, cfg)
    pool, test = split(pairs, cfg["test_pairs"], args.seed)
    if max(cfg["pairs"]) > len(pool):
        raise ValueError(f"--pairs {max(cfg['pairs'])} exceeds the {len(pool)} training pairs available")
    config = {k: v for k, v in cfg.items() if k != "pairs"}
    config.update(data="synthetic" if args.data is None else "real", seed=args.seed, budget=args.budget,
                  laplace=args.laplace, tune=args.tune)
    results = Results(Path(args.out), config, args.device, list(cfg["pairs"]))
    model = pretrained_network(args, cfg, results, clean)
    study = Study(args, cfg, pool, test, results, model)
    for n in cfg["pairs"]:
        for key in ORDER:
            done = results.get(n, key)
            if done is not None:
                print(f"n = {n}: {done['method']}: done in run {done['run']}, skipped", flush=True)
                continue
            if key in ("laplace", "swag") and not (Path(args.out) / f"map_n{n}.pt").exists():
                print(f"n = {n}: map_n{n}.pt is missing: computing the MAP again", flush=True)
                study.map(n)
            getattr(study, key)(n)
    return results.data


# ---------------------------------------------------------------------------------- outputs
COLUMNS = ["pairs", "method", "params", "psnr", "ssim", "nll", "ause", "aurg", "aurg_aleatoric", "aurg_epistemic"]
# paired comparisons (a, b): the per-image differences a - b in PSNR and AURG (total)
PAIRED = [("map", "uniform"), ("laplace", "map"), ("swag", "map"), ("map", "full")]


def _mean_and_se(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-image differences ``a_i - b_i``
    (:func:`bayes_colora.metrics.paired_difference`: ``SE = sd / sqrt(m)``, the images independent)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired differences need two lists of equal length >= 2, got {len(a)} and {len(b)}")
    out = bc.metrics.paired_difference([x - y for x, y in zip(a, b)])
    return out["mean"], out["se_frame"]


def _difference(metric: str, mean: float, se: float | None = None) -> str:
    """A difference in ``metric`` (PSNR in dB to 3 decimals, AURG in 3 significant digits), as
    ``mean ± SE`` when ``se`` is given."""
    if metric == "psnr":
        return f"{mean:+.3f}" + ("" if se is None else f" ± {se:.3f}")
    return f"{mean:+.2e}" + ("" if se is None else f" ± {se:.1e}")


def paired_lines(rows: list[dict]) -> list[str]:
    """One markdown table per n of the paired per-image differences of :data:`PAIRED`, as
    ``mean ± SE`` (:func:`_mean_and_se`) in PSNR (dB) and AURG; ``-`` where either row has
    no ``per_image`` (rows from an older results.json). Comparisons with a row not yet computed
    are left out."""
    by_cell = {(r["pairs"], r["key"]): r for r in rows}
    lines = []
    for n in sorted({r["pairs"] for r in rows}):
        pairs = [(by_cell[n, a], by_cell[n, b]) for a, b in PAIRED if (n, a) in by_cell and (n, b) in by_cell]
        if not pairs:
            continue
        m = max((len(r["per_image"]["psnr"]) for pair in pairs for r in pair if "per_image" in r), default="m")
        lines += ["", f"Paired differences at {n} pairs: mean ± standard error over the {m} test images "
                  f"(SE = sample sd of the per-image differences / sqrt({m})):", "",
                  "| comparison | PSNR (dB) | AURG |", "|---|---|---|"]
        for a, b in pairs:
            cells = [_difference(k, *_mean_and_se(a["per_image"][k], b["per_image"][k]))
                     if "per_image" in a and "per_image" in b else "-" for k in ("psnr", "aurg")]
            lines.append(f"| {a['method']} - {b['method']} | {cells[0]} | {cells[1]} |")
    return lines


def write_table(result: dict, out: Path) -> Path:
    """``results.md``: the table of all rows, the paired per-image differences per n
    (:func:`paired_lines`), the tuned posterior widths, and the rank allocation at the largest n
    that has one."""
    fine = ("ssim", "ause", "aurg", "aurg_aleatoric", "aurg_epistemic")  # printed with 4 decimals
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in result["rows"]:
        cells = [f"{r[c]:.4f}" if isinstance(r.get(c), float) and c in fine
                 else f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += paired_lines(result["rows"])
    tuned = {(r["pairs"], r["key"]): r for r in result["rows"] if r["key"] in ("laplace", "swag")}
    if tuned:
        lines += ["", f"Posterior width (tune: {result['config']['tune']}):", "",
                  "| pairs | Laplace prior precision | Laplace temperature | SWAG covariance scale |",
                  "|---|---|---|---|"]
        for n in sorted({n for n, _ in tuned}):
            lap, swag = tuned.get((n, "laplace"), {}), tuned.get((n, "swag"), {})
            fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
            lines.append(f"| {n} | {fmt(lap.get('prior_precision'))} | {fmt(lap.get('temperature'))} | "
                         f"{fmt(swag.get('swag_scale'))} |")
    if result["allocation"]:
        last = max(result["allocation"], key=int)
        lines += ["", f"Rank allocation of ContributionLoRA at {last} pairs (FAIG score, rank / max rank):", "",
                  "| layer | score | rank | max rank | params |", "|---|---|---|---|---|"]
        lines += [f"| {a['layer']} | {a['score']:.3g} | {a['rank']} | {a['max_rank']} | {a['params']} |"
                  for a in result["allocation"][last]]
    path = out / "results.md"
    _atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return path


# ---------------------------------------------------------------------------------- --combine
# over seeds: each cell's mean ± sample sd of these metrics; paired differences (a, b, metric)
SEED_METRICS = ("psnr", "ssim", "aurg")
SEED_PAIRED = [("map", "uniform", "psnr"), ("map", "full", "psnr"), ("swag", "map", "aurg"),
               ("laplace", "map", "aurg")]
FULL_GAP_DB = 0.3  # target: ContributionLoRA within 0.3 dB of full fine-tuning (set at 64 pairs)


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (divisor K - 1; ``None`` for K = 1) of K values."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def load_runs(dirs: list[Path]) -> tuple[dict, dict[tuple[int, int, str], dict]]:
    """``(config, cells)`` of the study folders ``dirs``: their shared ``config`` less ``seed``, and
    every row keyed ``(seed, n, key)``. Refuses (``SystemExit``) folders whose configs differ in
    any key but ``seed`` (``--pairs`` is not stored in it), a cell present twice, and a seed's n
    whose cells lie in two folders (its rows must share one pre-trained network and one MAP)."""
    config, first, cells, source = None, None, {}, {}
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise SystemExit(f"error: --combine: {path} does not exist")
        data = json.loads(path.read_text())
        seed, own = data["config"]["seed"], {k: v for k, v in data["config"].items() if k != "seed"}
        if config is None:
            config, first = own, path
        for k in sorted(set(config) | set(own)):
            if config.get(k) != own.get(k):
                raise SystemExit(f"error: --combine: {first} and {path} differ in {k}: {config.get(k)!r} vs "
                                 f"{own.get(k)!r}; only --seed and --pairs may differ")
        for row in data["rows"]:
            n, key = row["pairs"], row["key"]
            if (seed, n, key) in cells:
                raise SystemExit(f"error: --combine: seed {seed}, {n} pairs, cell {key} is in both "
                                 f"{source[seed, n]} and {path}")
            if source.setdefault((seed, n), path) != path:
                raise SystemExit(f"error: --combine: the cells of seed {seed} at {n} pairs lie in both "
                                 f"{source[seed, n]} and {path}; they must come from one run")
            cells[seed, n, key] = row
    return config, cells


def seed_difference(cells: dict[tuple[int, int, str], dict], n: int, a: str, b: str, metric: str
                    ) -> dict | None:
    r"""Paired difference ``d_s = metric(a) - metric(b)`` at n pairs over the K seeds that ran both
    cells (a seed fixes the test split, the fine-tuning draws and, unless ``--pretrained`` shares one,
    the pre-trained network): ``mean = (1/K) sum_s d_s``,
    ``se = sd(d) / sqrt(K)`` (sample sd; ``None`` for K = 1) and ``per_seed``. ``pooled``: the
    per-image differences of all K seeds' m test images together (:func:`_mean_and_se` over
    K m images, taken as independent, so it holds no training randomness; on PolyU the seeds'
    test sets can share images), or ``None`` when a row has no ``per_image``. With equal m per
    seed the pooled mean is ``mean``."""
    seeds = sorted(s for s, m, k in cells if (m, k) == (n, a) and (s, n, b) in cells)
    if not seeds:
        return None
    ra, rb = [cells[s, n, a] for s in seeds], [cells[s, n, b] for s in seeds]
    diffs = [x[metric] - y[metric] for x, y in zip(ra, rb)]
    mean, sd = _mean_sd(diffs)
    pooled = None
    if all("per_image" in r for r in ra + rb):
        xs = [v for r in ra for v in r["per_image"][metric]]
        ys = [v for r in rb for v in r["per_image"][metric]]
        pooled = dict(zip(("mean", "se"), _mean_and_se(xs, ys)), images=len(xs))
    return {"pairs": n, "a": a, "b": b, "metric": metric, "comparison": f"{ra[0]['method']} - {rb[0]['method']}",
            "seeds": seeds, "per_seed": diffs, "mean": mean, "se": None if sd is None else sd / math.sqrt(len(diffs)),
            "pooled": pooled}


def _target(name: str, n: int, margin: float, se: float | None, seeds: list[int], met: bool) -> dict:
    """A target's verdict: ``margin`` (> 0 or >= 0 when met) in units of ``se`` as ``z``."""
    return {"target": name, "pairs": n, "margin": margin, "se": se, "z": margin / se if se else None,
            "seeds": seeds, "met": met}


def seed_targets(rows: list[dict], diffs: list[dict]) -> list[dict]:
    r"""The study's targets at every n, on the means over seeds; ``margin`` is how far the mean lies
    on the right side of the threshold and ``z = margin / SE`` (SE over seeds):

    * ContributionLoRA > uniform LoRA in PSNR: ``margin = mean_s(map - uniform)``, met if > 0;
    * within 0.3 dB of full fine-tuning (the target is set at 64 pairs):
      ``margin = mean_s(map - full) + 0.3``, met if >= 0;
    * Laplace / SWAG AURG > 0: ``margin = mean_s AURG``, SE = sd / sqrt(K), met if > 0;
    * Laplace / SWAG AURG above MAP's: ``margin = mean_s(AURG - AURG_MAP)``, met if > 0."""
    by_diff = {(d["pairs"], d["a"], d["b"]): d for d in diffs}
    by_row = {(r["pairs"], r["key"]): r for r in rows}
    out = []
    for n in sorted({r["pairs"] for r in rows}):
        if (d := by_diff.get((n, "map", "uniform"))) is not None:
            out.append(_target("ContributionLoRA (MAP) > uniform LoRA in PSNR", n, d["mean"], d["se"],
                               d["seeds"], d["mean"] > 0))
        if (d := by_diff.get((n, "map", "full"))) is not None:
            margin = d["mean"] + FULL_GAP_DB
            out.append(_target(f"ContributionLoRA (MAP) within {FULL_GAP_DB} dB of full fine-tuning in PSNR "
                               f"(target set at 64 pairs)", n, margin, d["se"], d["seeds"], margin >= 0))
        for key, name in (("laplace", "Laplace"), ("swag", "SWAG")):
            if (r := by_row.get((n, key))) is not None:
                se = None if r["aurg_sd"] is None else r["aurg_sd"] / math.sqrt(len(r["seeds"]))
                out.append(_target(f"{name} AURG > 0", n, r["aurg"], se, r["seeds"], r["aurg"] > 0))
            if (d := by_diff.get((n, key, "map"))) is not None:
                out.append(_target(f"{name} AURG above MAP's", n, d["mean"], d["se"], d["seeds"], d["mean"] > 0))
    return out


def combine(dirs: list[Path]) -> dict:
    """Join per-seed study folders (:func:`load_runs`) without training: per n and cell the mean
    and sample sd over the seeds that ran it of PSNR, SSIM and AURG (``rows``: ``psnr``,
    ``psnr_sd``, ``per_seed``, ``seeds``, ...), the paired differences of :data:`SEED_PAIRED`
    (:func:`seed_difference`) and the targets (:func:`seed_targets`)."""
    config, cells = load_runs(dirs)
    rows = []
    for n in sorted({n for _, n, _ in cells}):
        for key in ORDER:
            seeds = sorted(s for s, m, k in cells if (m, k) == (n, key))
            if not seeds:
                continue
            runs = [cells[s, n, key] for s in seeds]
            row = {"pairs": n, "key": key, "method": runs[0]["method"], "seeds": seeds,
                   "params": [r["params"] for r in runs], "per_seed": {}}
            for metric in (m for m in SEED_METRICS if all(m in r for r in runs)):
                row["per_seed"][metric] = [r[metric] for r in runs]
                row[metric], row[metric + "_sd"] = _mean_sd(row["per_seed"][metric])
            rows.append(row)
    diffs = [d for n in sorted({n for _, n, _ in cells}) for a, b, metric in SEED_PAIRED
             if (d := seed_difference(cells, n, a, b, metric)) is not None]
    return {"combined": [str(d) for d in dirs], "config": config, "seeds": sorted({s for s, _, _ in cells}),
            "rows": rows, "differences": diffs, "targets": seed_targets(rows, diffs)}


def combined_lines(result: dict) -> list[str]:
    """The markdown of a :func:`combine` result: means ± sd over seeds, paired differences per n
    (over seeds and pooled per image) and the targets."""
    fmt = {"psnr": "{:.2f} ± {:.2f}", "ssim": "{:.4f} ± {:.4f}", "aurg": "{:.5f} ± {:.5f}"}
    one = {"psnr": "{:.2f}", "ssim": "{:.4f}", "aurg": "{:.5f}"}
    seeds = lambda s: ", ".join(map(str, s))  # noqa: E731
    lines = [f"Combined from {len(result['combined'])} folders (seeds {seeds(result['seeds'])}). Per cell: "
             f"mean ± sample standard deviation (divisor K - 1) over the K seeds that ran it.", "",
             "| pairs | method | seeds | params | PSNR (dB) | SSIM | AURG |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = ["-" if m not in r else (fmt[m].format(r[m], r[m + "_sd"]) if r[m + "_sd"] is not None
                                         else one[m].format(r[m])) for m in SEED_METRICS]
        lines.append(f"| {r['pairs']} | {r['method']} | {seeds(r['seeds'])} | "
                     f"{seeds(sorted(set(r['params'])))} | " + " | ".join(cells) + " |")
    for n in sorted({d["pairs"] for d in result["differences"]}):
        lines += ["", f"Paired differences at {n} pairs (a seed fixes the test split, the fine-tuning draws "
                  f"and, unless --pretrained shares one, the pre-trained network). Over seeds: mean ± SE, SE = sample sd of the K per-seed differences / sqrt(K). "
                  f"Pooled: the per-image differences of all seeds' test images together, mean ± sd / "
                  f"sqrt(images), the images taken as independent (no training randomness):", "",
                  "| comparison | metric | seeds | over seeds | per seed | pooled per image (images) |",
                  "|---|---|---|---|---|---|"]
        for d in (d for d in result["differences"] if d["pairs"] == n):
            p = d["pooled"]
            pooled = "-" if p is None else f"{_difference(d['metric'], p['mean'], p['se'])} ({p['images']})"
            lines.append(f"| {d['comparison']} | {d['metric'].upper()} | {seeds(d['seeds'])} | "
                         f"{_difference(d['metric'], d['mean'], d['se'])} | "
                         f"{', '.join(_difference(d['metric'], v) for v in d['per_seed'])} | {pooled} |")
    if result["targets"]:
        lines += ["", "Targets, on the means over seeds (margin: how far the mean lies past the threshold; "
                  "SE over seeds):", ""]
        for t in result["targets"]:
            unit = " dB" if "PSNR" in t["target"] else ""
            size = "one seed, no SE" if t["z"] is None else f"{t['z']:+.1f} SE"
            lines.append(f"- {t['target']} at {t['pairs']} pairs: **{'met' if t['met'] else 'not met'}**, "
                         f"margin {t['margin']:+.3g}{unit} ({size}; seeds {seeds(t['seeds'])})")
    return lines


def write_combined(result: dict, out: Path) -> list[Path]:
    """``OUT/results.json`` and ``OUT/results.md`` of a :func:`combine` result, atomically."""
    paths = [out / "results.json", out / "results.md"]
    _atomic_write(paths[0], lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    _atomic_write(paths[1], lambda tmp: Path(tmp).write_text("\n".join(combined_lines(result)) + "\n"))
    return paths


def write_figures(result: dict, out: Path) -> list[Path]:
    """The figures, from ``results.json``'s content and the ``example_n*.pt`` files alone:
    PSNR against n, the rank allocation, the uncertainty example and the sparsification curves
    (the last three at the largest n that has what they show)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, rows = [], result["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in ORDER[1:]:
        pts = [(r["pairs"], r["psnr"]) for r in rows if r["key"] == key]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=next(r["method"] for r in rows if r["key"] == key))
    ax.set_xlabel("training pairs"), ax.set_ylabel("test PSNR (dB)"), ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "psnr_vs_pairs.png")
    bc.plots.save_figure(fig, written[-1])

    if result["allocation"]:
        alloc = result["allocation"][max(result["allocation"], key=int)]
        fig, ax1 = plt.subplots(figsize=(max(6, 0.18 * len(alloc)), 3.5))
        idx = range(len(alloc))
        ax1.bar(idx, [a["rank"] for a in alloc], color="tab:blue", label="rank")
        ax2 = ax1.twinx()
        ax2.plot(idx, [a["score"] for a in alloc], "r.", label="FAIG score")
        ax1.set_xticks(list(idx)), ax1.set_xticklabels([a["layer"] for a in alloc], rotation=90, fontsize=5)
        ax1.set_ylabel("rank"), ax2.set_ylabel("FAIG score", color="r")
        fig.tight_layout()
        written.append(out / "rank_allocation.png")
        bc.plots.save_figure(fig, written[-1])

    have = [n for n in sorted({r["pairs"] for r in rows})
            if all((out / f"example_n{n}_{k}.pt").exists() for k in ("map", "laplace", "swag"))]
    if have:
        n = have[-1]
        ex = {k: torch.load(out / f"example_n{n}_{k}.pt") for k in ("map", "laplace", "swag")}
        lap = {k: v.float() for k, v in ex["laplace"].items()}
        err = (lap["mean"].clamp(0, 1) - lap["clean"]).pow(2).mean(0).sqrt()
        panels = [(lap["noisy"], "noisy"), (lap["mean"], "restored (Laplace)"), (lap["clean"], "clean"),
                  (err, "|error| (Laplace)"), (ex["map"]["std"], "std, MAP (aleatoric)"),
                  (lap["std"], "std, Laplace (total)"), (lap["epistemic"], "epistemic std, Laplace"),
                  (ex["swag"]["epistemic"], "epistemic std, SWAG")]
        fig, axes = plt.subplots(2, 4, figsize=(13, 6.6))
        for ax, (img, title) in zip(axes.flat, panels):
            img = img.float()
            if img.dim() == 3:
                ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
            else:
                fig.colorbar(ax.imshow(img.numpy(), cmap="magma"), ax=ax, fraction=0.046)
            ax.set_title(title, fontsize=9), ax.axis("off")
        fig.suptitle(f"test image 0, {n} training pairs (central crop)")
        fig.tight_layout()
        written.append(out / "uncertainty_example.png")
        bc.plots.save_figure(fig, written[-1])

    curves = [r for r in rows if r["key"] in ("map", "laplace", "swag")]
    if curves:
        n = max(r["pairs"] for r in curves)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        f = list(DEFAULT_FRACTIONS)
        for r in (r for r in curves if r["pairs"] == n):
            ax.plot(f, r["sparsification"], label=r["method"])
        ax.plot(f, next(r for r in curves if r["pairs"] == n)["oracle"], "k--", label="oracle (MAP's errors)")
        ax.set_xlabel("fraction of pixels removed"), ax.set_ylabel("RMSE of the rest")
        ax.set_title(f"{n} training pairs", fontsize=9), ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "sparsification.png")
        bc.plots.save_figure(fig, written[-1])
    return written


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder with polyu/ and clean/ (default: synthetic "
                   "with --quick, ../shared/data/restoration otherwise)")
    p.add_argument("--out", default="runs/contribution",
                   help="output folder; a rerun with the same folder resumes (skips finished cells)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny CPU run on synthetic data (< 3 min)")
    p.add_argument("--pairs", type=int, nargs="*", help="training pair counts (default 16 32 64)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs")
    p.add_argument("--pretrain-seconds", dest="pretrain_seconds", type=float, default=None)
    p.add_argument("--pretrained", default=None, help="load pre-trained weights from this file if it "
                   "exists (default: OUT/pretrained.pt, written after pre-training)")
    p.add_argument("--budget", type=float, default=0.07, help="LoRA budget as a fraction of the network")
    p.add_argument("--laplace", default="diag", choices=["diag", "lowrank"],
                   help="Laplace curvature: diagonal GGN from Rademacher probes, or low-rank GGN")
    p.add_argument("--tune", default="validation", choices=["validation", "marglik"],
                   help="posterior width: Laplace (prior precision, temperature) and SWAG scale by "
                        "validation NLL, or the untempered marginal-likelihood Laplace and plain SWAG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--combine", nargs="+", default=None, metavar="DIR",
                   help="train nothing: join these per-seed study folders (same settings but --seed and "
                        "--pairs) into --out's results.json and results.md, over seeds")
    args = p.parse_args(argv)
    if args.combine:
        out = Path(args.out)
        old = out / "results.json"
        if any(Path(d).resolve() == out.resolve() for d in args.combine) or (
                old.is_file() and "combined" not in json.loads(old.read_text())):
            sys.exit(f"error: --combine would overwrite the study results {old}; pass another --out")
        out.mkdir(parents=True, exist_ok=True)
        result = combine([Path(d) for d in args.combine])
        for path in write_combined(result, out):
            print(f"wrote {path}")
        return result
    if args.data is None and not args.quick:
        args.data = "../shared/data/restoration"
    if args.data is not None and not Path(args.data, "polyu").is_dir():
        sys.exit(f"error: {Path(args.data, 'polyu')} does not exist; pass --data with polyu/ and "
                 f"clean/ inside (see bayes_colora.restoration.pack), or use --quick")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    for path in [write_table(result, out), *write_figures(result, out)]:
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
