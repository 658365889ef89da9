r"""Contribution-based CoLoRA for real-noise denoising (Wu et al. 2024), with Bayesian adapters.

1. PROD pre-training of a compact NAFNet (heteroscedastic output: mean and log variance) on
   clean images (``DATA/clean``) plus procedural images, degraded by a random subset of blur,
   noise, rain, JPEG and motion blur in random order.
2. For each number of training pairs n (PolyU real noisy / clean, random crops): full
   fine-tuning, uniform-rank LoRA, and ContributionLoRA at the uniform LoRA's parameter budget,
   with ranks from FAIG layer contributions (``bc.contribution_scores``, integrated gradients
   from the pre-trained to the fully fine-tuned network); then Laplace (low-rank GGN, marginal-
   likelihood prior) and SWAG posteriors over the ContributionLoRA parameters.
3. PSNR / SSIM on held-out pairs, trainable parameters, and how well the per-pixel predictive
   std ranks the actual errors (AUSE / AURG, RMSE sparsification).

The test set is a fixed set of held-out pairs (the last ``test_pairs`` of a seeded permutation);
training pairs are the first n of the rest, so the sets for growing n are nested.

``--quick`` runs on synthetic data (procedural images with signal-dependent noise) on the CPU
in under 3 minutes. The full run (``--data``) needs ``polyu/`` and ``clean/`` under the data
folder (``bayes_colora.restoration.pack`` writes a 12 MB copy).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

import bayes_colora as bc
from bayes_colora import restoration as R
from bayes_colora.adapters.contribution import lora_shape
from bayes_colora.contribution import finetune, scored_layers
from bayes_colora.predictive import Predictive
from bayes_colora.subspace import _atomic_write

QUICK = dict(model="tiny", pairs=(8, 16), test_pairs=8, image=64, crop=32, crops_per_epoch=64,
             batch=8, epochs=10, swag_epochs=3, pretrain_steps=400, pretrain_seconds=None,
             pretrain_crop=32, pretrain_batch=8, procedural=48, ig_steps=4, ig_batches=2,
             laplace_rank=8, samples=8, workers=0, lr_lora=2e-3, lr_full=5e-4)
FULL = dict(model="small", pairs=(16, 32, 64), test_pairs=16, image=None, crop=64, crops_per_epoch=512,
            batch=16, epochs=20, swag_epochs=8, pretrain_steps=100000, pretrain_seconds=90.0,
            pretrain_crop=64, pretrain_batch=32, procedural=256, ig_steps=16, ig_batches=4,
            laplace_rank=20, samples=16, workers=8, lr_lora=2e-3, lr_full=3e-4)


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


def loader_of(pairs: list, cfg: dict, seed: int, per: int | None = None, shuffle: bool = True):
    """Random crops of ``pairs``: ``per`` per pair, by default ``crops_per_epoch / len(pairs)``
    (so every n trains for the same number of steps)."""
    per = per or max(1, cfg["crops_per_epoch"] // len(pairs))
    ds = R.PairCrops([(a, b) for _, a, b in pairs], cfg["crop"], per, seed)
    return torch.utils.data.DataLoader(ds, batch_size=cfg["batch"], shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(seed))


def evaluate(predict_fn, test: list, device: str) -> tuple[dict[str, float], Predictive, torch.Tensor]:
    """Metrics over the test pairs, evaluated one image at a time."""
    preds = [predict_fn(a[None].to(device)).to("cpu") for _, a, _ in test]
    pred = Predictive(*(torch.cat([getattr(p, f) for p in preds]) for f in
                        ("mean", "aleatoric", "epistemic", "total")))
    clean = torch.stack([b for _, _, b in test])
    return R.evaluate_restoration(pred, clean), pred, clean


def plain_predictor(model, lik):
    @torch.no_grad()
    def fn(x):
        return Predictive(**lik.moments(model(x)[None].float()))
    return fn


def run(args: argparse.Namespace) -> dict:
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("epochs", "pretrain_seconds"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.pairs:
        cfg["pairs"] = tuple(args.pairs)
    device, progress = args.device, not args.no_progress
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    real = args.data is not None
    t0 = time.perf_counter()

    # ---------------------------------------------------------------- data
    if real:
        data = Path(args.data)
        pairs = R.polyu_pairs(data / "polyu")
        clean = R.clean_images(data / "clean", min_size=cfg["pretrain_crop"]) if (data / "clean").is_dir() else []
        if cfg["image"]:  # quick on real data: central crops keep the CPU time small
            pairs = [(n, R.center_crop(a, cfg["image"]), R.center_crop(b, cfg["image"])) for n, a, b in pairs]
    else:
        pairs = synthetic_pairs(max(cfg["pairs"]) + cfg["test_pairs"], cfg["image"], args.seed + 1)
        clean = []
    pool, test = split(pairs, cfg["test_pairs"], args.seed)
    if max(cfg["pairs"]) > len(pool):
        raise ValueError(f"--pairs {max(cfg['pairs'])} exceeds the {len(pool)} training pairs available")
    side = 128 if real and not args.quick else cfg["pretrain_crop"] * 2
    procedural = list(R.procedural_images(cfg["procedural"], side, g))

    # ---------------------------------------------------------------- PROD pre-training
    model = R.nafnet(cfg["model"]).to(device)
    n_total = sum(p.numel() for p in model.parameters())
    if args.pretrained and os.path.exists(args.pretrained):
        model.load_state_dict(torch.load(args.pretrained, map_location=device))
        losses = []
    else:
        losses = R.pretrain(model, clean + procedural, steps=cfg["pretrain_steps"],
                            seconds=cfg["pretrain_seconds"], batch_size=cfg["pretrain_batch"],
                            crop=cfg["pretrain_crop"], workers=cfg["workers"], seed=args.seed,
                            progress=progress)
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        _atomic_write(Path(args.out) / "pretrained.pt", lambda tmp: torch.save(state, tmp))
    t_pre = time.perf_counter() - t0
    print(f"pre-trained {n_total} parameters for {len(losses)} steps in {t_pre:.0f} s", flush=True)

    lik = bc.Gaussian(heteroscedastic=True, dim=1)
    prior = bc.NormalPrior(scale=1.0)
    rows, allocation, examples = [], {}, {}
    # references, the same for every n: the noisy input and the pre-trained network
    noisy, target = torch.stack([a for _, a, _ in test]), torch.stack([b for _, _, b in test])
    reference = [{"method": "noisy input", "params": 0, "psnr": R.psnr(noisy, target),
                  "ssim": R.ssim(noisy, target)},
                 {"method": "pre-trained (PROD)", "params": 0,
                  **evaluate(plain_predictor(model, lik), test, device)[0]}]
    for n in cfg["pairs"]:
        tn = time.perf_counter()
        train = pool[:n]
        loader = loader_of(train, cfg, args.seed + n)
        rows += [{"pairs": n, **r} for r in reference]
        # ---- full fine-tuning
        epochs = cfg["epochs"]
        full = finetune(model, loader, R.gaussian_nll_loss, steps=epochs * len(loader),
                        lr=cfg["lr_full"], progress=progress)
        m, _, _ = evaluate(plain_predictor(full, lik), test, device)
        rows.append({"pairs": n, "method": "full fine-tuning", "params": n_total, **m})
        # ---- uniform-rank LoRA at about 7% of the network
        conv_cost = sum(sum(lora_shape(l)) for l in
                        scored_layers(model, types=(torch.nn.Conv2d,)).values())
        rank = max(1, round(args.budget * n_total / conv_cost))
        uni = bc.Subspace.from_model(copy.deepcopy(model), bc.LoRA(rank=rank, types=(torch.nn.Conv2d,)))
        bc.fit_map(uni, loader, lik, prior=prior, epochs=epochs, lr=cfg["lr_lora"], progress=progress)
        m, _, _ = evaluate(lambda x: bc.predict(uni, bc.DiracPosterior(uni.theta, likelihood=lik), x), test, device)
        rows.append({"pairs": n, "method": f"LoRA, uniform rank {rank}", "params": uni.dim, **m})
        # ---- ContributionLoRA at the same budget
        scores = bc.contribution_scores(model, loader, R.gaussian_nll_loss, finetuned=full,
                                        steps=cfg["ig_steps"], types=(torch.nn.Conv2d,),
                                        max_batches=cfg["ig_batches"], progress=progress)
        spec = bc.ContributionLoRA(budget=uni.dim, scores=scores, types=(torch.nn.Conv2d,))
        sub = bc.Subspace.from_model(copy.deepcopy(model), spec)
        allocation[n] = spec.allocation()
        map_post = bc.fit_map(sub, loader, lik, prior=prior, epochs=epochs, lr=cfg["lr_lora"],
                              progress=progress)
        m, pred_map, clean_t = evaluate(lambda x: bc.predict(sub, map_post, x), test, device)
        rows.append({"pairs": n, "method": "ContributionLoRA (MAP)", "params": sub.dim, **m})
        # ---- Bayesian ContributionLoRA: Laplace, then SWAG
        lap_loader = loader_of(train, cfg, args.seed + 1000 + n, per=1, shuffle=False)
        lap = bc.fit_laplace(sub, lap_loader, lik, prior=prior, hessian=args.laplace,
                             rank=cfg["laplace_rank"], diag_probes=cfg["laplace_rank"],
                             tune_prior="marglik", chunk_size=16, progress=progress,
                             generator=torch.Generator(device=device).manual_seed(n))
        print(f"Laplace ({args.laplace}) prior precision {lap.history[-1].get('prior_precision')}", flush=True)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        m, pred_lap, _ = evaluate(lambda x: bc.predict(sub, lap, x, n_samples=cfg["samples"], linearized=True,
                                                        generator=gen, chunk_size=4), test, device)
        rows.append({"pairs": n, "method": "ContributionLoRA + Laplace", "params": sub.dim, **m})
        swag = bc.fit_swag(sub, loader, lik, prior=prior, epochs=cfg["swag_epochs"], lr=cfg["lr_lora"] / 4,
                           optimizer="adam", rank=10, collect=max(1, len(loader) // 2), progress=progress)
        m, pred_swag, _ = evaluate(lambda x: bc.predict(sub, swag, x, n_samples=cfg["samples"],
                                                         generator=gen, chunk_size=4), test, device)
        rows.append({"pairs": n, "method": "ContributionLoRA + SWAG", "params": sub.dim, **m})
        examples[n] = (noisy[0], pred_map, pred_lap, pred_swag, clean_t)
        print(f"n = {n}: done in {time.perf_counter() - tn:.0f} s", flush=True)
    return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "data": "synthetic" if not real else str(args.data), "device": device,
            "network_params": n_total, "pretrain_steps": len(losses),
            "pretrain_final_loss": losses[-1] if losses else None, "rows": rows,
            "allocation": {str(k): v for k, v in allocation.items()},
            "seconds": time.perf_counter() - t0}, examples


def write_outputs(result: dict, examples: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bayes_colora.depth.metrics import DEFAULT_FRACTIONS, sparsification_curve

    written = []
    path = out / "results.json"
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    written.append(path)
    cols = ["pairs", "method", "params", "psnr", "ssim", "nll", "ause", "aurg", "aurg_epistemic"]
    fine = ("ssim", "ause", "aurg", "aurg_epistemic")  # printed with 4 decimals
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        cells = [f"{r[c]:.4f}" if isinstance(r.get(c), float) and c in fine
                 else f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    last = max(examples)
    alloc = result["allocation"][str(last)]
    lines += ["", f"Rank allocation of ContributionLoRA at {last} pairs (FAIG score, rank / max rank):", "",
              "| layer | score | rank | max rank | params |", "|---|---|---|---|---|"]
    lines += [f"| {a['layer']} | {a['score']:.3g} | {a['rank']} | {a['max_rank']} | {a['params']} |" for a in alloc]
    path = out / "results.md"
    _atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    written.append(path)

    # PSNR against the number of pairs
    fig, ax = plt.subplots(figsize=(5, 3.5))
    methods = [m for m in dict.fromkeys(r["method"] for r in result["rows"]) if m != "noisy input"]
    for meth in methods:
        pts = [(r["pairs"], r["psnr"]) for r in result["rows"] if r["method"] == meth]
        ax.plot(*zip(*pts), marker="o", label=meth)
    ax.set_xlabel("training pairs"), ax.set_ylabel("test PSNR (dB)"), ax.legend(fontsize=7)
    path = out / "psnr_vs_pairs.png"
    bc.plots.save_figure(fig, path); written.append(path)

    # rank allocation
    fig, ax1 = plt.subplots(figsize=(max(6, 0.18 * len(alloc)), 3.5))
    idx = range(len(alloc))
    ax1.bar(idx, [a["rank"] for a in alloc], color="tab:blue", label="rank")
    ax2 = ax1.twinx()
    ax2.plot(idx, [a["score"] for a in alloc], "r.", label="FAIG score")
    ax1.set_xticks(list(idx)), ax1.set_xticklabels([a["layer"] for a in alloc], rotation=90, fontsize=5)
    ax1.set_ylabel("rank"), ax2.set_ylabel("FAIG score", color="r")
    path = out / "rank_allocation.png"
    bc.plots.save_figure(fig, path); written.append(path)

    # restored image, error and uncertainty (Laplace), plus sparsification curves
    noisy, pred_map, pred_lap, pred_swag, clean = examples[last]
    err, unc = R.pixel_error_and_uncertainty(pred_lap.mean[:1], pred_lap.total[:1], clean[:1])
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.2))
    for ax, img, title in zip(axes, [noisy, pred_lap.mean[0], clean[0]], ["noisy", "restored (Laplace)", "clean"]):
        ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy()), ax.set_title(title), ax.axis("off")
    axes[3].imshow(err[0].numpy(), cmap="magma"), axes[3].set_title("|error|"), axes[3].axis("off")
    axes[4].imshow(unc[0].numpy(), cmap="magma"), axes[4].set_title("predictive std"), axes[4].axis("off")
    path = out / "uncertainty_example.png"
    bc.plots.save_figure(fig, path); written.append(path)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    f = torch.tensor(DEFAULT_FRACTIONS)
    for name, pred in (("MAP (aleatoric)", pred_map), ("Laplace", pred_lap), ("SWAG", pred_swag)):
        e, u = R.pixel_error_and_uncertainty(pred.mean, pred.total, clean)
        ax.plot(f, sparsification_curve(e, u, reduce="rms").mean(0), label=name)
    e, _ = R.pixel_error_and_uncertainty(pred_map.mean, pred_map.total, clean)
    ax.plot(f, sparsification_curve(e, e, reduce="rms").mean(0), "k--", label="oracle")
    ax.set_xlabel("fraction of pixels removed"), ax.set_ylabel("RMSE of the rest"), ax.legend(fontsize=7)
    path = out / "sparsification.png"
    bc.plots.save_figure(fig, path); written.append(path)
    return written


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder with polyu/ and clean/ (default: synthetic "
                   "with --quick, ../shared/data/restoration otherwise)")
    p.add_argument("--out", default="runs/contribution", help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny CPU run on synthetic data (< 3 min)")
    p.add_argument("--pairs", type=int, nargs="*", help="training pair counts (default 16 32 64)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs")
    p.add_argument("--pretrain-seconds", dest="pretrain_seconds", type=float, default=None)
    p.add_argument("--pretrained", default=None, help="load pre-trained weights from this file if it exists")
    p.add_argument("--budget", type=float, default=0.07, help="LoRA budget as a fraction of the network")
    p.add_argument("--laplace", default="diag", choices=["diag", "lowrank"],
                   help="Laplace curvature: diagonal GGN from Rademacher probes, or low-rank GGN")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.data is None and not args.quick:
        args.data = "../shared/data/restoration"
    if args.data is not None and not Path(args.data, "polyu").is_dir():
        sys.exit(f"error: {Path(args.data, 'polyu')} does not exist; pass --data with polyu/ and "
                 f"clean/ inside (see bayes_colora.restoration.pack), or use --quick")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result, examples = run(args)
    for path in write_outputs(result, examples, out):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
