r"""Continuous CoLoRA reduced models of parametrised PDEs, with posterior uncertainty.

Offline: a coordinate network ``u(x; alpha)`` whose linear layers are ``W + alpha A B``
(``bc.ContinuousLoRA``, one alpha per layer) and a hypernetwork ``h(t, mu) -> alpha`` are trained
together on every training trajectory (mean relative L2 error per snapshot, Adam, cosine decay).
Online, at the held-out parameters:

* data-driven: ``alpha(t) = h(t, mu)``;
* equation-driven (Neural Galerkin): ``M(alpha) alpha' = F(alpha)`` from ``alpha(t_0) = h(t_0, mu)``
  with RK4 (2-D Burgers and the built-in 1-D Burgers; for the RDE the right-hand side's constants
  are not stored in the data, so it is skipped there, see docs/continuous.md);
* baseline: the same network without continuous adaptation, ``u(x, t, mu)``, of equal size;
* uncertainty: at every ``--uq-every``-th time, ``--sensors`` noisy point values; prior
  ``alpha ~ N(h(t, mu), s^2 I)``; ``bc.fit_map`` + ``bc.fit_laplace`` (full GGN, ``s`` by the
  marginal likelihood) on the online coordinates, linearised ``bc.predict`` on the grid; at one
  snapshot also ``bc.fit_vi`` (full covariance) and ``bc.fit_nuts``;
* uncertainty over the adapter factors ``A``, ``B``: full-GGN Laplace (float64, marginal-likelihood
  prior) on training snapshots, linearised predictive bands at the test parameters, no sensors.

Error: the mean over test snapshots of ``||u_pred - u|| / ||u||`` (all fields and points).

Phases and resuming. The study runs the phases ``offline, baseline, data_driven, galerkin,
uq_sensors, uq_engines, uq_factors, figures`` in this order. After each one it rewrites
``results.json`` and ``results.md`` in ``--out`` (atomically), and right after training it saves
``model.pt`` / ``baseline.pt`` (state dicts); the uncertainty fields that the figures need go to
``uq_fields.pt``. A rerun with the same ``--out`` loads the trained states and skips every phase
already in ``results.json["phases"]``; deleting a phase's entry makes the next run redo that
phase, and redoing a phase drops the entries that used its output (retraining the reduced
model redoes everything after it, any redone phase redoes the figures). ``--skip-uq`` leaves the
three uncertainty phases for a later call. ``--call-seconds S`` spends at most ``S`` s of the
offline budget in this call: unfinished, the training state goes to ``offline_state.pt`` and the
call ends there; a rerun with the same ``--out`` continues the training from it (same schedule),
and the later phases run once the whole budget is spent.

Usage::

    python studies/continuous_pde.py --quick --out runs/continuous_quick          # built-in 1-D Burgers, CPU
    python studies/continuous_pde.py --data runs/data/pde/burgers --device cuda --skip-uq --out runs/continuous_burgers
    python studies/continuous_pde.py --data runs/data/pde/burgers --device cuda --skip-uq --seconds 1500 \
        --call-seconds 500 --out runs/continuous_burgers_long                   # three such calls
    python studies/continuous_pde.py --data runs/data/pde/burgers --device cuda --out runs/continuous_burgers   # the UQ
    python studies/continuous_pde.py --data runs/data/pde/rde --device cuda --out runs/continuous_rde
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bayes_colora as bc  # noqa: E402
from bayes_colora import pde  # noqa: E402
from bayes_colora.plots import save_figure  # noqa: E402
from bayes_colora.subspace import _atomic_write  # noqa: E402


@dataclass
class Config:
    """One data set's settings; ``period`` of the input embedding, ``test_mus`` held out."""

    name: str
    test_mus: tuple[float, ...]
    period: float
    width: int = 25
    depth: int = 7
    rank: int = 3
    hyper_width: int = 15
    hyper_depth: int = 3            # hidden layers of the hypernetwork (the reference code has 2, see docs)
    embed_activation: bool = False  # swish after the periodic embedding (the reference has it; RDE only, see docs)
    steps: int = 10_000_000         # at most this many offline steps (the time budget ends training first)
    seconds: float = 100.0          # offline budget of the reduced model
    baseline_seconds: float = 60.0
    batch: int = 32                 # snapshots per step (GPU choice; on a CPU 8 x 256 points is better per second)
    n_points: int | None = None     # points per snapshot and step (random subset); None: all
    lr: float = 1e-2                # measured better than the reference's 5e-3 (docs/continuous.md)
    final_lr: float = 0.0           # the cosine decay ends here
    max_grid: int | None = None     # subsample each spatial axis to at most this many points
    galerkin: bool = True
    galerkin_dt: float = 5e-3
    galerkin_scheme: str = "rk4"
    galerkin_stride: int = 1        # collocation points: every k-th grid point per axis
    uq_every: int = 5
    sensors: int = 64
    noise: float = 1e-3             # sensor noise, relative to the RMS of the field
    map_steps: int = 300
    factor_snapshots: int = 64      # training snapshots and points of the factor-Laplace GGN
    factor_points: int = 1024
    vi_steps: int = 1500
    nuts_samples: int = 150
    published: dict | None = None


CONFIGS = {
    "burgers": Config("burgers", (0.00397, 0.00793), period=2.0, max_grid=65, seconds=320.0,
                      baseline_seconds=30.0, galerkin_dt=5e-3, galerkin_stride=2,
                      published={"rel_err": 4.96e-4, "params": 5451, "online": 7}),
    "rde": Config("rde", (2.3, 2.7), period=2 * math.pi, embed_activation=True, seconds=400.0,
                  baseline_seconds=30.0, galerkin=False, uq_every=10, published=None),
    "burgers1d": Config("burgers1d", (0.05, 0.09), period=2 * math.pi, width=16, depth=4,
                        hyper_width=12, steps=3000, seconds=40.0, baseline_seconds=20.0, lr=5e-3,
                        galerkin_dt=1e-2, uq_every=8, sensors=24, vi_steps=800),
}
QUICK_NUS = (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1)
#: the settings that fix the shapes of the saved states; a resumed run must agree on them
ARCHITECTURE = ("name", "width", "depth", "rank", "hyper_width", "hyper_depth", "embed_activation", "period")
PHASES = ("offline", "baseline", "data_driven", "galerkin", "uq_sensors", "uq_engines", "uq_factors", "figures")
UQ_PHASES = ("uq_sensors", "uq_engines", "uq_factors")
#: phases whose results use another phase's output; redoing the key redoes these (and the figures)
DEPENDENTS = {"offline": ("data_driven", "galerkin", *UQ_PHASES), "uq_sensors": ("uq_engines",)}


def load_data(args: argparse.Namespace) -> tuple[Config, list[pde.Trajectory]]:
    """The configuration and the trajectories: a data folder, or built-in 1-D Burgers."""
    if args.data is None:
        cfg = CONFIGS["burgers1d"]
        return cfg, pde.burgers_trajectories(QUICK_NUS, n_x=128, t_end=2.0, n_t=41,
                                             progress=not args.no_progress)
    try:
        trajs = pde.load_folder(args.data)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from err
    # the majority of the files' equation attributes (two Burgers test files say 'vlasov'), else the folder name
    names = Counter(tr.equation for tr in trajs if tr.equation in CONFIGS)
    name = names.most_common(1)[0][0] if names else os.path.basename(os.path.normpath(args.data))
    if name not in CONFIGS:
        raise SystemExit(f"no configuration for equation {name!r}; known: {sorted(CONFIGS)}")
    cfg = CONFIGS[name]
    n_grid = max(a.numel() for a in trajs[0].axes)
    stride = args.space_stride or (math.ceil((n_grid - 1) / (cfg.max_grid - 1)) if cfg.max_grid else 1)
    if stride > 1:
        trajs = [tr.subsample(space=stride) for tr in trajs]
    if args.quick:  # a CPU-sized version of the real set: coarser grid and time
        trajs = [tr.subsample(space=4 if len(tr.axes) == 1 else 2, time=2) for tr in trajs]
        cfg = Config(**{**cfg.__dict__, "width": 16, "depth": 4, "steps": 1500, "seconds": 40.0,
                        "baseline_seconds": 20.0, "galerkin_stride": 2 * cfg.galerkin_stride,
                        "uq_every": 6, "sensors": 24})
    return cfg, trajs


def rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def tmu_of(tr: pde.Trajectory) -> torch.Tensor:
    """``(T, 2)``: the (t, mu) pairs of a trajectory."""
    return torch.stack([tr.t, torch.full_like(tr.t, tr.mu)], -1)


def uq_times(cfg: Config, tr: pde.Trajectory) -> list[int]:
    return list(range(0, tr.t.numel(), cfg.uq_every))


def run_uq_sensors(cfg: Config, model: pde.ReducedModel, test: list[pde.Trajectory], alphas: list[torch.Tensor],
                   sigma_model: float, device: torch.device, progress: bool) -> tuple[dict, list[dict]]:
    """Laplace at every ``uq_every``-th time of each test trajectory: the records and the
    per-time predictive mean / sd fields (for the figures)."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(0)
    out: dict = {"per_mu": []}
    x = test[0].points.to(device)
    maps = []
    for tr, al in zip(test, alphas):
        u = tr.flat.to(device)
        sigma_n = cfg.noise * rms(u)
        sigma = math.sqrt(sigma_n ** 2 + sigma_model ** 2)
        idx = torch.randperm(x.shape[0], generator=gen)[:cfg.sensors].to(device)
        times = uq_times(cfg, tr)
        rec = {"mu": tr.mu, "t": [], "err_prior": [], "err_post": [], "rel_std": [], "coverage95": [],
               "coverage95_epistemic": [], "prior_scale": [], "sigma": sigma}
        fields = {"mean": [], "std": []}
        for k in tqdm(times, desc=f"laplace mu={tr.mu:g}", disable=not progress):
            y_obs = u[k, idx] + sigma_n * torch.randn(cfg.sensors, u.shape[-1], generator=gen).to(device)
            post, pred = pde.sensor_posterior(model.sub, al[k], x[idx], y_obs, x, sigma, "laplace",
                                              n_samples=200, map_steps=cfg.map_steps,
                                              generator=torch.Generator().manual_seed(k))
            with torch.no_grad():
                prior_only = model.field(x, al[k])
                plug_in = model.field(x, al[k] + post.mean.to(al[k]))
            std = pred.total.sqrt()
            rec["t"].append(float(tr.t[k]))
            rec["err_prior"].append(float(pde.relative_errors(prior_only[None], u[k][None])))
            rec["err_post"].append(float(pde.relative_errors(plug_in[None], u[k][None])))
            rec["rel_std"].append(float(std.pow(2).mean().sqrt()) / rms(u[k]))
            rec["coverage95"].append(float(((pred.mean - u[k]).abs() <= 1.96 * std).float().mean()))
            rec["coverage95_epistemic"].append(float(((pred.mean - u[k]).abs()
                                                      <= 1.96 * pred.epistemic.sqrt()).float().mean()))
            rec["prior_scale"].append(float(post.history[0]["prior_precision"]) ** -0.5)
            fields["mean"].append(pred.mean.cpu())
            fields["std"].append(std.cpu())
        out["per_mu"].append(rec)
        maps.append({k: torch.stack(v) for k, v in fields.items()} | {"times": times})
    return out, maps


def run_uq_engines(cfg: Config, model: pde.ReducedModel, test: list[pde.Trajectory], alphas: list[torch.Tensor],
                   sensors: dict, device: torch.device) -> tuple[dict, dict]:
    """Laplace, VI and NUTS at one snapshot (the middle UQ time of the first test parameter),
    with the prior scale Laplace tuned there (the median over ``sensors``' times): the records
    and the snapshot's data and predictives (for the figures)."""
    tr, al = test[0], alphas[0]
    x = tr.points.to(device)
    u = tr.flat.to(device)
    times = uq_times(cfg, tr)
    k = times[len(times) // 2]
    rec0 = sensors["per_mu"][0]
    sigma, s = rec0["sigma"], float(torch.tensor(rec0["prior_scale"]).median())
    sigma_n = cfg.noise * rms(u)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(x.shape[0], generator=g)[:cfg.sensors].to(device)
    y_obs = u[k, idx] + sigma_n * torch.randn(cfg.sensors, u.shape[-1], generator=g).to(device)
    settings = {"laplace": {"map_steps": cfg.map_steps},
                "vi": {"steps": cfg.vi_steps, "lr": 1e-2, "init_scale": 1e-3},
                "nuts": {"num_samples": cfg.nuts_samples, "warmup": cfg.nuts_samples}}
    out: dict = {"methods": {}}
    preds = {}
    for method, kw in settings.items():
        t0 = time.perf_counter()
        try:
            post, pred = pde.sensor_posterior(model.sub, al[k], x[idx], y_obs, x, sigma, method, prior_scale=s,
                                              n_samples=200, generator=torch.Generator().manual_seed(2), **kw)
        except (RuntimeError, ValueError) as err:   # an engine failure is a result to report, not a crash
            out["methods"][method] = {"failed": f"{type(err).__name__}: {err}"}
            print(f"{method} failed: {err}")
            continue
        with torch.no_grad():
            plug_in = model.field(x, al[k] + post.mean.to(al[k]))
        std = pred.total.sqrt()
        out["methods"][method] = {
            "seconds": time.perf_counter() - t0,
            "rel_err": float(pde.relative_errors(plug_in[None], u[k][None])),
            "rel_err_predictive_mean": float(pde.relative_errors(pred.mean[None], u[k][None])),
            "rel_std": float(std.pow(2).mean().sqrt()) / rms(u[k]),
            "rel_epistemic_std": float(pred.epistemic.mean().sqrt()) / rms(u[k]),
            "coverage95": float(((pred.mean - u[k]).abs() <= 1.96 * std).float().mean()),
            "coverage95_epistemic": float(((pred.mean - u[k]).abs()
                                           <= 1.96 * pred.epistemic.sqrt()).float().mean()),
            "posterior_sd": post.variance.sqrt().tolist(),
        }
        if method == "nuts":
            out["methods"][method]["r_hat_max"] = float(post.r_hat.max())
        preds[method] = {m: getattr(pred, m).cpu() for m in ("mean", "aleatoric", "epistemic", "total")}
    out["snapshot"] = {"mu": tr.mu, "t": float(tr.t[k]), "index": k, "prior_scale": s}
    return out, {"k": k, "idx": idx.cpu(), "y_obs": y_obs.cpu(), "preds": preds}


def run_factor_uq(cfg: Config, model: pde.ReducedModel, data: pde.Snapshots, test: list[pde.Trajectory],
                  x: torch.Tensor, sigma_model: float, progress: bool) -> dict:
    """Laplace over the adapter factors A, B (training snapshots), bands at the test parameters."""
    fsub, post = pde.factor_laplace(model, data, sigma_model, max_snapshots=cfg.factor_snapshots,
                                    n_points=cfg.factor_points, progress=progress)
    out = {"dim": fsub.dim, "prior_precision": post.history[0]["prior_precision"], "per_mu": []}
    for tr in test:
        inputs = (x.double(), tmu_of(tr).to(x.device, torch.float64))
        pred = bc.predict(fsub, post, inputs, n_samples=64, linearized=True, chunk_size=8,
                          generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            centre = fsub(inputs).cpu()            # the offline (MAP) prediction
        u = tr.flat.double()
        epi, tot = pred.epistemic.cpu(), pred.total.cpu()
        scale = u.pow(2).mean((1, 2)).sqrt()
        out["per_mu"].append({
            "mu": tr.mu, "t": tr.t.tolist(),
            "rel_epistemic_sd": (epi.mean((1, 2)).sqrt() / scale).tolist(),
            "coverage95": float(((centre - u).abs() <= 1.96 * tot.sqrt()).float().mean()),
            "coverage95_epistemic": float(((centre - u).abs() <= 1.96 * epi.sqrt()).float().mean()),
        })
    return out


def figures(cfg: Config, out: str, test: list[pde.Trajectory], preds: list[torch.Tensor],
            gal: list[torch.Tensor | None], base: list[torch.Tensor], hist: dict, phases: dict,
            uq_fields: dict) -> list[str]:
    """Truth / prediction / error (/ posterior sd) over time, error curves, training curves and,
    when the uncertainty phases have run, the posterior panels and a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = uq_fields.get("maps") if "uq_sensors" in phases else None
    paths = []
    for i, (tr, pr) in enumerate(zip(test, preds)):
        u = tr.flat
        err = (pr - u).abs()
        mp = maps[i] if maps else None
        n_col = 4 if mp else 3
        if len(tr.axes) == 1:
            q_n = u.shape[-1]
            fig, axes = plt.subplots(q_n, n_col, figsize=(4 * n_col, 3.2 * q_n), squeeze=False)
            ext = [float(tr.axes[0][0]), float(tr.axes[0][-1]), float(tr.t[-1]), float(tr.t[0])]
            for q in range(q_n):
                panels = [(u[..., q], "truth"), (pr[..., q], "prediction"), (err[..., q], "|error|")]
                if mp:
                    panels.append((mp["std"][..., q], "posterior sd (sensors)"))
                for j, (img, title) in enumerate(panels):
                    e = ext if j < 3 else [ext[0], ext[1], float(tr.t[mp["times"][-1]]), float(tr.t[0])]
                    im = axes[q, j].imshow(img.numpy(), aspect="auto", extent=e, cmap="viridis")
                    axes[q, j].set(title=f"{title}, field {q}", xlabel="x", ylabel="t")
                    fig.colorbar(im, ax=axes[q, j])
        else:
            n1, n2 = (a.numel() for a in tr.axes)
            times = mp["times"] if mp else uq_times(cfg, tr)
            picks = [times[0], times[len(times) // 2], times[-1]]
            fig, axes = plt.subplots(3, n_col, figsize=(4 * n_col, 11), squeeze=False)
            box = [float(tr.axes[0][0]), float(tr.axes[0][-1]), float(tr.axes[1][0]), float(tr.axes[1][-1])]
            for r, k in enumerate(picks):
                panels = [(u[k], "truth"), (pr[k], "prediction"), (err[k], "|error|")]
                if mp:
                    panels.append((mp["std"][times.index(k)], "posterior sd"))
                for j, (img, title) in enumerate(panels):
                    im = axes[r, j].imshow(img[:, 0].reshape(n1, n2).T.numpy(), origin="lower", extent=box,
                                           cmap="viridis")
                    axes[r, j].set(title=f"{title}, t={float(tr.t[k]):.2f}")
                    fig.colorbar(im, ax=axes[r, j])
        fig.suptitle(f"{cfg.name}, test mu = {tr.mu:g}")
        fig.tight_layout()
        path = os.path.join(out, f"fields_mu{tr.mu:g}.png")
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)

    uq_s, uq_f = phases.get("uq_sensors"), phases.get("uq_factors")
    fig, axes = plt.subplots(1, 2 if uq_s or uq_f else 1, figsize=(12 if uq_s or uq_f else 6, 4), squeeze=False)
    axes = axes[0]
    for i, (tr, pr, ga, ba) in enumerate(zip(test, preds, gal, base)):
        c = f"C{i}"
        axes[0].semilogy(tr.t, pde.relative_errors(pr, tr.flat), c, label=f"data-driven mu={tr.mu:g}")
        axes[0].semilogy(tr.t, pde.relative_errors(ba, tr.flat), c, ls=":", label=f"baseline mu={tr.mu:g}")
        if ga is not None:
            axes[0].semilogy(tr.t, pde.relative_errors(ga, tr.flat), c, ls="--", label=f"Galerkin mu={tr.mu:g}")
        if uq_s:
            rec = uq_s["per_mu"][i]
            axes[1].semilogy(rec["t"], rec["err_post"], c, marker="o", label=f"posterior mean error mu={tr.mu:g}")
            axes[1].semilogy(rec["t"], rec["rel_std"], c, ls="--", label=f"posterior sd (rel.) mu={tr.mu:g}")
            axes[1].semilogy(rec["t"], rec["err_prior"], c, ls=":", label=f"prior (data-driven) error mu={tr.mu:g}")
        if uq_f:
            fac = uq_f["per_mu"][i]
            axes[1].semilogy(fac["t"], fac["rel_epistemic_sd"], c, ls="-.", alpha=0.7,
                             label=f"factor-Laplace epistemic sd (rel.), no sensors, mu={tr.mu:g}")
    axes[0].set(xlabel="t", ylabel="relative L2 error", title="online phase")
    if len(axes) > 1:
        axes[1].set(xlabel="t", title="uncertainty: alpha posterior with sensors; factor posterior")
    for ax in axes:
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    path = os.path.join(out, "error_over_time.png")
    save_figure(fig, path)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, h in hist.items():
        ax.semilogy([r["step"] for r in h], [r["loss"] for r in h], label=name)
    ax.set(xlabel="step", ylabel="mean relative L2 (train batch)", title="offline training")
    ax.legend()
    path = os.path.join(out, "training.png")
    save_figure(fig, path)
    plt.close(fig)
    paths.append(path)

    snap = uq_fields.get("snapshot") if "uq_engines" in phases else None
    if snap is None:
        return paths
    k, idx, y_obs = snap["k"], snap["idx"], snap["y_obs"]
    tr = test[0]
    x = tr.points
    if len(tr.axes) == 1:
        sel = torch.arange(x.shape[0])
    else:  # the slice x1 = middle of the 2-D grid
        n1, n2 = (a.numel() for a in tr.axes)
        sel = torch.arange(n1) * n2 + n2 // 2
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.5))
    truth = tr.flat[k][sel, :1]
    for method, p in snap["preds"].items():
        moments = [p["aleatoric"][sel, :1], p["epistemic"][sel, :1], p["total"][sel, :1]]
        bc.plots.predictive_band(x[sel, 0], bc.Predictive(p["mean"][sel, :1], *moments), ax=ax, label=method)
        bc.plots.predictive_band(x[sel, 0], bc.Predictive(p["mean"][sel, :1] - truth, *moments), ax=ax2,
                                 label=method)
    ax.plot(x[sel, 0], truth[:, 0], "k", lw=0.8, label="truth")
    ax2.axhline(0.0, color="k", lw=0.8)
    if len(tr.axes) == 1:
        ax.scatter(x[idx, 0], y_obs[:, 0], marker="x", color="k", label="sensors")
    ax.set(title=f"{cfg.name} mu={tr.mu:g}, t={float(tr.t[k]):.2f}: predictive (field 0)")
    ax2.set(title="predictive mean - truth, with the same bands", ylabel="error")
    ax.legend(fontsize="x-small")
    ax2.legend(fontsize="x-small")
    path = os.path.join(out, "bands.png")
    save_figure(fig, path)
    plt.close(fig)
    paths.append(path)
    return paths


def markdown(res: dict) -> str:
    """The tables of ``results.md`` from ``results.json``; phases not run yet are left out."""
    ph, pub = res["phases"], res.get("published") or {}
    lines = [f"# continuous CoLoRA: {res['dataset']}", "", "Phases done: " + ", ".join(ph), ""]
    if "data_driven" in ph and "baseline" in ph:
        dd, off, base = ph["data_driven"], ph["offline"], ph["baseline"]
        lines += ["| model | mean rel. L2 error (test) | parameters | online coordinates | offline steps | "
                  "offline s | online s / trajectory |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| continuous CoLoRA, data-driven | {dd['rel_err']:.3e} | {res['params']['total']:,} | "
                  f"{res['n_online']} | {off['steps']:,} | {off['seconds']:.1f} | {dd['online_seconds']:.4f} |"]
        gal = ph.get("galerkin", {})
        if gal.get("rel_err") is not None:
            lines.append(f"| continuous CoLoRA, Neural Galerkin ({gal['scheme']}) | {gal['rel_err']:.3e} | "
                         f"{res['params']['total']:,} | {res['n_online']} | - | - | "
                         f"{gal['seconds_per_trajectory']:.2f} |")
        elif gal.get("failure"):
            lines.append(f"| continuous CoLoRA, Neural Galerkin | failed: {gal['failure']} | - | - | - | - | - |")
        lines.append(f"| baseline u(x, t, mu), no adaptation | {base['rel_err']:.3e} | {res['params']['baseline']:,} "
                     f"| - | {base['steps']:,} | {base['seconds']:.1f} | - |")
        if pub:
            lines.append(f"| published (Berman & Peherstorfer 2024) | {pub['rel_err']:.2e} | {pub['params']:,} | "
                         f"{pub['online']} | - | - | - |")
        lines += ["", "Per test parameter: " + ", ".join(f"mu={m}: {e:.3e}" for m, e in dd["rel_err_per_mu"].items())]
    if "uq_sensors" in ph:
        lines += ["", "## Uncertainty (sensors, Laplace on the online coordinates)", "",
                  "| mu | prior (data-driven) error | error of u(x; posterior mean) | rel. predictive sd | "
                  "95% coverage (total) | 95% coverage (epistemic) |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for rec in ph["uq_sensors"]["per_mu"]:
            mean = lambda k: sum(rec[k]) / len(rec[k])  # noqa: E731
            lines.append(f"| {rec['mu']:g} | {mean('err_prior'):.3e} | {mean('err_post'):.3e} | "
                         f"{mean('rel_std'):.3e} | {mean('coverage95'):.3f} | {mean('coverage95_epistemic'):.3f} |")
    if "uq_engines" in ph:
        snap = ph["uq_engines"]["snapshot"]
        lines += ["", f"One snapshot (mu={snap['mu']:g}, t={snap['t']:.2f}), three engines:", "",
                  "| engine | error of u(x; posterior mean) | rel. predictive sd | rel. epistemic sd | "
                  "95% coverage (total) | 95% coverage (epistemic) | seconds |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for m, r in ph["uq_engines"]["methods"].items():
            if "failed" in r:
                lines.append(f"| {m} | failed: {r['failed']} | - | - | - | - | - |")
                continue
            lines.append(f"| {m} | {r['rel_err']:.3e} | {r['rel_std']:.3e} | {r['rel_epistemic_std']:.3e} | "
                         f"{r['coverage95']:.3f} | {r['coverage95_epistemic']:.3f} | {r['seconds']:.1f} |")
    if "uq_factors" in ph:
        fac = ph["uq_factors"]
        lines += ["", f"## Uncertainty over the adapter factors A, B (d = {fac['dim']}, Laplace on training "
                  f"snapshots, prior precision {fac['prior_precision']:.3g}, {fac['seconds']:.1f} s), no sensors", "",
                  "| mu | rel. epistemic sd (mean over t) | 95% coverage (total) | 95% coverage (epistemic) |",
                  "| ---: | ---: | ---: | ---: |"]
        for rec in fac["per_mu"]:
            lines.append(f"| {rec['mu']:g} | {sum(rec['rel_epistemic_sd']) / len(rec['rel_epistemic_sd']):.3e} | "
                         f"{rec['coverage95']:.3f} | {rec['coverage95_epistemic']:.3f} |")
    return "\n".join(lines) + "\n"


class Store:
    """``results.json`` / ``results.md`` and the saved states of one ``--out`` folder; every
    write is atomic (a temporary file, then ``os.replace``)."""

    def __init__(self, out: str):
        self.out = out
        os.makedirs(out, exist_ok=True)
        path = self.path("results.json")
        self.res: dict = json.loads(open(path).read()) if os.path.exists(path) else {}
        self.res.setdefault("phases", {})
        self.done: list[str] = []                     # phases computed in this call

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    @property
    def phases(self) -> dict:
        """Phase name -> its record, in the order the phases were done."""
        return self.res["phases"]

    def has(self, phase: str) -> bool:
        return phase in self.phases

    def record(self, phase: str, value: dict) -> None:
        """Store a freshly computed phase, drop the entries that used the old one, and write."""
        for dep in (*DEPENDENTS.get(phase, ()), "figures"):
            if dep != phase:
                self.phases.pop(dep, None)
        self.phases[phase] = value
        self.done.append(phase)
        self.write()

    def write(self) -> None:
        text = json.dumps(self.res, indent=1)
        _atomic_write(self.path("results.json"), lambda tmp: _write_text(tmp, text))
        table = markdown(self.res)
        _atomic_write(self.path("results.md"), lambda tmp: _write_text(tmp, table))

    def save_tensors(self, name: str, obj: Any) -> None:
        _atomic_write(self.path(name), lambda tmp: torch.save(obj, tmp))

    def load_tensors(self, name: str, device: torch.device | str = "cpu") -> Any:
        path = self.path(name)
        return torch.load(path, map_location=device) if os.path.exists(path) else None

    def remove(self, name: str) -> None:
        if os.path.exists(self.path(name)):
            os.remove(self.path(name))


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def trained(store: Store, phase: str, state_file: str, module: torch.nn.Module, device: torch.device,
            train: Callable[[], dict | None]) -> bool:
    """Load ``module``'s state from ``state_file`` when ``phase`` is recorded and the file
    exists; otherwise ``train()`` (which returns the phase record), save the state, record.
    Returns whether the phase is done: ``False`` when ``train()`` returned ``None`` (its
    training budget not spent yet; nothing saved or recorded here)."""
    state = store.load_tensors(state_file, device) if store.has(phase) else None
    if state is not None:
        module.load_state_dict(state)
        print(f"{phase}: loaded {store.path(state_file)}")
        return True
    record = train()
    if record is None:
        return False
    store.save_tensors(state_file, module.state_dict())
    store.record(phase, record)
    return True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="folder of HDF5 trajectories (pde/burgers or pde/rde); "
                    "default: built-in 1-D Burgers")
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (built-in data unless --data)")
    ap.add_argument("--out", default="runs/continuous_pde", help="output folder; a rerun with the same folder "
                    "resumes: it loads the trained states and skips the phases already in results.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=None, help="offline budget of the reduced model")
    ap.add_argument("--baseline-seconds", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None, help="at most this many offline steps")
    ap.add_argument("--batch", type=int, default=None, help="snapshots per offline step")
    ap.add_argument("--points", type=int, default=None, help="random points per snapshot and step (default: all)")
    ap.add_argument("--lr", type=float, default=None, help="initial Adam learning rate")
    ap.add_argument("--final-lr", type=float, default=None, help="learning rate at the end of the cosine decay")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training loss (forward + backward)")
    ap.add_argument("--call-seconds", type=float, default=None,
                    help="spend at most this many seconds of the offline budget in this call; an unfinished "
                    "training is saved to offline_state.pt and a rerun with the same --out continues it")
    ap.add_argument("--space-stride", type=int, default=0,
                    help="grid subsampling (default: down to the data set's max_grid points per axis)")
    ap.add_argument("--no-galerkin", action="store_true")
    ap.add_argument("--skip-uq", action="store_true", help="leave out the uncertainty phases (a later run with "
                    "the same --out does them from the saved state)")
    ap.add_argument("--galerkin-dt", type=float, default=None, help="Neural Galerkin step")
    ap.add_argument("--galerkin-scheme", default=None, choices=sorted(pde.galerkin.TABLEAUS),
                    help="explicit Runge-Kutta scheme (default rk4)")
    ap.add_argument("--map-steps", type=int, default=None, help="Adam steps of each sensor MAP fit")
    ap.add_argument("--uq-every", type=int, default=None, help="Laplace at every k-th test time")
    ap.add_argument("--vi-steps", type=int, default=None)
    ap.add_argument("--factor-snapshots", type=int, default=None, help="snapshots in the factor-Laplace GGN")
    ap.add_argument("--factor-points", type=int, default=None, help="points per snapshot in that GGN")
    ap.add_argument("--nuts-samples", type=int, default=None, help="NUTS samples (and warm-up steps)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    progress = not args.no_progress
    device = torch.device(args.device)
    # full float32 matmuls (torch's default, made explicit): TF32 would move the Burgers field by
    # ~5e-4 relative (emulated, see docs/continuous.md), half the accuracy this study aims at
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    start = time.perf_counter()
    cfg, trajs = load_data(args)
    overrides = {"seconds": args.seconds, "steps": args.steps, "baseline_seconds": args.baseline_seconds,
                 "batch": args.batch, "n_points": args.points, "lr": args.lr, "final_lr": args.final_lr,
                 "galerkin_dt": args.galerkin_dt, "galerkin_scheme": args.galerkin_scheme,
                 "map_steps": args.map_steps, "factor_snapshots": args.factor_snapshots,
                 "factor_points": args.factor_points, "uq_every": args.uq_every, "vi_steps": args.vi_steps,
                 "nuts_samples": args.nuts_samples}
    cfg = Config(**{**cfg.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    train, test = pde.split_by_mu(trajs, cfg.test_mus)
    data = pde.Snapshots.from_trajectories(train).to(device)
    tdata = pde.Snapshots.from_trajectories(test).to(device)
    d_in, q = data.x.shape[1], data.u.shape[-1]
    print(f"{cfg.name}: {len(train)} training / {len(test)} test trajectories, {data.u.shape[0]} training "
          f"snapshots of {data.x.shape[0]} points x {q} fields")

    store = Store(args.out)
    config = {k: v for k, v in cfg.__dict__.items() if k != "published"}
    dataset = cfg.name if args.data else "burgers1d (built-in solver)"
    old = store.res.get("config")
    if old is not None:
        clash = {k: (old.get(k), config[k]) for k in ARCHITECTURE if old.get(k) != config[k]}
        clash |= {"dataset": (store.res.get("dataset"), dataset)} if store.res.get("dataset") != dataset else {}
        if clash:
            raise SystemExit(f"{args.out} holds a run with other settings {clash} (saved, now); "
                             f"choose another --out or delete that folder to start afresh")
    model = pde.ReducedModel.build(d_in, q, cfg.width, cfg.depth, cfg.rank, "layer", cfg.period,
                                   cfg.hyper_width, cfg.hyper_depth, embed_activation=cfg.embed_activation).to(device)
    n_net, n_hyper = pde.n_parameters(model.sub.model), pde.n_parameters(model.hyper)
    width = pde.baseline_width(n_net + n_hyper, d_in, q, cfg.depth)
    torch.manual_seed(0)
    base = pde.ConcatBaseline(d_in, q, width, cfg.depth, cfg.period, cfg.embed_activation).to(device)
    store.res.update({
        "dataset": dataset, "device": str(device), "quick": args.quick, "config": config,
        "grid_points": int(data.x.shape[0]), "n_train_snapshots": int(data.u.shape[0]),
        "test_mus": [tr.mu for tr in test], "n_online": model.n_online,
        "params": {"network": n_net, "hypernetwork": n_hyper, "total": n_net + n_hyper,
                   "network_without_alphas": n_net - model.n_online,
                   "baseline": pde.n_parameters(base), "baseline_width": width},
        "published": cfg.published,
    })
    train_kw = {"steps": cfg.steps, "lr": cfg.lr, "final_lr": cfg.final_lr, "batch": cfg.batch,
                "n_points": cfg.n_points, "progress": progress, "compile": args.compile}

    def train_reduced() -> dict | None:
        """Train (or continue from ``offline_state.pt``) for at most ``--call-seconds``; the
        phase record once the budget is spent, else ``None`` with the state saved."""
        saved = store.load_tensors("offline_state.pt", device)
        state = saved if saved and not saved["finished"] else {}
        budget = f"{cfg.seconds:g} s / {cfg.steps:,} steps"
        if state:
            print(f"offline: resumed at step {state['step']:,}, {state['seconds']:.1f} s of {budget} spent")
        hist = pde.train_offline(model, data, max_seconds=cfg.seconds, state=state,
                                 stop_after_seconds=args.call_seconds, **train_kw)
        if not state["finished"]:
            store.save_tensors("offline_state.pt", state)
            print(f"offline: stopped at step {state['step']:,}, {state['seconds']:.1f} s of {budget} spent; "
                  f"state saved to {store.path('offline_state.pt')}, rerun with the same --out to continue")
            return None
        with torch.no_grad():
            train_pred = pde.predict_snapshots(model, data.x, data.tmu)
        return {"steps": state["step"], "seconds": state["seconds"],
                "steps_per_second": state["step"] / state["seconds"], "calls": state["calls"],
                "sigma_model": rms(train_pred - data.u),
                "train_rel_err": float(pde.relative_errors(train_pred, data.u).mean()),
                "settings": {k: v for k, v in train_kw.items() if k != "progress"} | {"max_seconds": cfg.seconds},
                "history": hist}

    if not trained(store, "offline", "model.pt", model, device, train_reduced):
        store.res["seconds_last_call"] = time.perf_counter() - start
        store.res["phases_last_call"] = store.done
        store.write()
        print(f"{args.out}: phases done in this call: none; {store.res['seconds_last_call']:.0f} s")
        return store.res
    store.remove("offline_state.pt")
    off = store.phases["offline"]
    print(f"offline: {off['steps']:,} steps in {off['seconds']:.0f} s, training error {off['train_rel_err']:.3e}")

    def tmus(tr: pde.Trajectory) -> torch.Tensor:
        return tmu_of(tr).to(device)

    def train_baseline() -> dict:
        t0 = time.perf_counter()
        hist = pde.train_offline(base, data, max_seconds=cfg.baseline_seconds, **train_kw)
        seconds = time.perf_counter() - t0
        pr = [pde.predict_snapshots(base, tdata.x, tmus(tr)).cpu() for tr in test]
        errs = [pde.relative_errors(p, tr.flat) for p, tr in zip(pr, test)]
        return {"steps": hist[-1]["step"], "seconds": seconds, "rel_err": float(torch.cat(errs).mean()),
                "rel_err_per_mu": {f"{tr.mu:g}": float(e.mean()) for tr, e in zip(test, errs)}, "history": hist}

    trained(store, "baseline", "baseline.pt", base, device, train_baseline)
    base_preds = [pde.predict_snapshots(base, tdata.x, tmus(tr)).cpu() for tr in test]
    print(f"baseline: test error {store.phases['baseline']['rel_err']:.3e}")

    # online, data-driven (cheap: the predictions are recomputed for the later phases)
    preds, alphas, t_online = [], [], 0.0
    for tr in test:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            al = model.alpha(tmus(tr))
            pr = model.field(tdata.x, al)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_online += (time.perf_counter() - t0) / len(test)
        preds.append(pr.cpu())
        alphas.append(al.detach())
    if not store.has("data_driven"):
        errs = [pde.relative_errors(p, tr.flat) for p, tr in zip(preds, test)]
        store.record("data_driven", {"rel_err": float(torch.cat(errs).mean()), "online_seconds": t_online,
                                     "rel_err_per_mu": {f"{tr.mu:g}": float(e.mean()) for tr, e in zip(test, errs)}})
    print(f"data-driven: test error {store.phases['data_driven']['rel_err']:.3e}")

    # online, equation-driven
    gal: list[torch.Tensor | None] = [None] * len(test)
    if cfg.galerkin and not args.no_galerkin and not store.has("galerkin"):
        t0 = time.perf_counter()
        try:
            a_ts = []
            for tr, al in zip(test, alphas):
                eq = pde.equation_for(cfg.name, tr.mu)
                xs = tr.subsample(space=cfg.galerkin_stride).points.to(device)
                a_ts.append(pde.neural_galerkin(lambda x, a: model.field(x, a), eq, al[0], xs,
                                                tr.t.to(device), dt=cfg.galerkin_dt, scheme=cfg.galerkin_scheme,
                                                progress=progress))
            with torch.no_grad():
                gal = [model.field(tdata.x, a).cpu() for a in a_ts]
            errs = [pde.relative_errors(g, tr.flat) for g, tr in zip(gal, test)]
            store.record("galerkin", {"rel_err": float(torch.cat(errs).mean()), "scheme": cfg.galerkin_scheme,
                                      "dt": cfg.galerkin_dt, "failure": None,
                                      "seconds_per_trajectory": (time.perf_counter() - t0) / len(test),
                                      "rel_err_per_mu": {f"{tr.mu:g}": float(e.mean()) for tr, e in zip(test, errs)},
                                      "alpha": [a.cpu().tolist() for a in a_ts]})
        except ValueError as err:      # a blow-up is a result to report, not a crash
            store.record("galerkin", {"rel_err": None, "failure": str(err)})
    if store.phases.get("galerkin", {}).get("alpha"):
        with torch.no_grad():
            gal = [model.field(tdata.x, torch.tensor(a, device=device)).cpu()
                   for a in store.phases["galerkin"]["alpha"]]
        print(f"Neural Galerkin: test error {store.phases['galerkin']['rel_err']:.3e}")
    elif store.has("galerkin"):
        print(f"Neural Galerkin failed: {store.phases['galerkin']['failure']}")

    # uncertainty
    uq_fields = store.load_tensors("uq_fields.pt") or {}
    if not args.skip_uq:
        sigma_model = off["sigma_model"]
        if not store.has("uq_sensors"):
            t0 = time.perf_counter()
            rec, uq_fields["maps"] = run_uq_sensors(cfg, model, test, alphas, sigma_model, device, progress)
            store.save_tensors("uq_fields.pt", uq_fields)
            store.record("uq_sensors", rec | {"seconds": time.perf_counter() - t0})
        if not store.has("uq_engines"):
            t0 = time.perf_counter()
            rec, uq_fields["snapshot"] = run_uq_engines(cfg, model, test, alphas, store.phases["uq_sensors"], device)
            store.save_tensors("uq_fields.pt", uq_fields)
            store.record("uq_engines", rec | {"seconds": time.perf_counter() - t0})
        if not store.has("uq_factors"):
            t0 = time.perf_counter()
            rec = run_factor_uq(cfg, model, data, test, tdata.x, sigma_model, progress)
            store.record("uq_factors", rec | {"seconds": time.perf_counter() - t0})

    if not store.has("figures"):
        paths = figures(cfg, args.out, test, preds, gal, base_preds,
                        {"continuous CoLoRA": off["history"], "baseline": store.phases["baseline"]["history"]},
                        store.phases, uq_fields)
        store.record("figures", {"files": [os.path.basename(p) for p in paths]})
    store.res["seconds_last_call"] = time.perf_counter() - start
    store.res["phases_last_call"] = store.done
    store.write()
    print(markdown(store.res))
    print(f"{args.out}: phases done in this call: {', '.join(store.done) or 'none'}; "
          f"{store.res['seconds_last_call']:.0f} s")
    return store.res


if __name__ == "__main__":
    main()
