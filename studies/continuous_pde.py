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

Usage::

    python studies/continuous_pde.py --quick --out runs/continuous_quick          # built-in 1-D Burgers, CPU
    python studies/continuous_pde.py --data ../shared/data/pde/burgers --device cuda --out runs/continuous_burgers
    python studies/continuous_pde.py --data ../shared/data/pde/rde --device cuda --out runs/continuous_rde
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
    hyper_depth: int = 3
    steps: int = 200_000
    seconds: float = 100.0          # offline budget of the reduced model
    baseline_seconds: float = 60.0
    batch: int = 32
    lr: float = 5e-3
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
    "burgers": Config("burgers", (0.00397, 0.00793), period=2.0, max_grid=65, seconds=95.0,
                      baseline_seconds=30.0, galerkin_dt=5e-3, galerkin_stride=2,
                      published={"rel_err": 4.96e-4, "params": 5451, "online": 7}),
    "rde": Config("rde", (2.3, 2.7), period=2 * math.pi, seconds=120.0, baseline_seconds=30.0,
                  galerkin=False, uq_every=10, published=None),
    "burgers1d": Config("burgers1d", (0.05, 0.09), period=2 * math.pi, width=16, depth=4,
                        hyper_width=12, steps=3000, seconds=40.0, baseline_seconds=20.0,
                        galerkin_dt=1e-2, uq_every=8, sensors=24, vi_steps=800),
}
QUICK_NUS = (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1)


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


def run_uq(cfg: Config, model: pde.ReducedModel, test: list[pde.Trajectory], alphas: list[torch.Tensor],
           sigma_model: float, device: torch.device, progress: bool) -> dict:
    """Laplace at every ``uq_every``-th time of each test trajectory; VI and NUTS at one snapshot."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(0)
    out: dict = {"per_mu": [], "methods": {}}
    x = test[0].points.to(device)
    maps = []
    for tr, al in zip(test, alphas):
        u = tr.flat.to(device)
        sigma_n = cfg.noise * rms(u)
        sigma = math.sqrt(sigma_n ** 2 + sigma_model ** 2)
        idx = torch.randperm(x.shape[0], generator=gen)[:cfg.sensors].to(device)
        times = list(range(0, u.shape[0], cfg.uq_every))
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
    # one snapshot, three engines (the middle UQ time of the first test parameter)
    tr, al = test[0], alphas[0]
    u = tr.flat.to(device)
    k = list(range(0, u.shape[0], cfg.uq_every))[len(range(0, u.shape[0], cfg.uq_every)) // 2]
    rec0 = out["per_mu"][0]
    sigma, s = rec0["sigma"], float(torch.tensor(rec0["prior_scale"]).median())
    sigma_n = cfg.noise * rms(u)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(x.shape[0], generator=g)[:cfg.sensors].to(device)
    y_obs = u[k, idx] + sigma_n * torch.randn(cfg.sensors, u.shape[-1], generator=g).to(device)
    settings = {"laplace": {"map_steps": cfg.map_steps},
                "vi": {"steps": cfg.vi_steps, "lr": 1e-2, "init_scale": 1e-3},
                "nuts": {"num_samples": cfg.nuts_samples, "warmup": cfg.nuts_samples}}
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
        preds[method] = pred
    out["snapshot"] = {"mu": tr.mu, "t": float(tr.t[k]), "index": k, "prior_scale": s}
    return out, maps, (k, idx, y_obs, preds)


def run_factor_uq(cfg: Config, model: pde.ReducedModel, data: pde.Snapshots, test: list[pde.Trajectory],
                  x: torch.Tensor, sigma_model: float, progress: bool) -> dict:
    """Laplace over the adapter factors A, B (training snapshots), bands at the test parameters."""
    t0 = time.perf_counter()
    fsub, post = pde.factor_laplace(model, data, sigma_model, max_snapshots=cfg.factor_snapshots,
                                    n_points=cfg.factor_points, progress=progress)
    out = {"dim": fsub.dim, "prior_precision": post.history[0]["prior_precision"], "per_mu": []}
    for tr in test:
        tmu = torch.stack([tr.t, torch.full_like(tr.t, tr.mu)], -1).to(x.device, torch.float64)
        inputs = (x.double(), tmu)
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
    out["seconds"] = time.perf_counter() - t0
    return out


def figures(cfg: Config, out: str, test: list[pde.Trajectory], preds: list[torch.Tensor],
            gal: list[torch.Tensor | None], base: list[torch.Tensor], hist: dict, uq: dict, maps: list,
            snap: tuple) -> list[str]:
    """Truth / prediction / error / uncertainty over time, error curves, training curves, a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for tr, pr, mp in zip(test, preds, maps):
        u = tr.flat
        err = (pr - u).abs()
        times = mp["times"]
        if len(tr.axes) == 1:
            q_n = u.shape[-1]
            fig, axes = plt.subplots(q_n, 4, figsize=(16, 3.2 * q_n), squeeze=False)
            ext = [float(tr.axes[0][0]), float(tr.axes[0][-1]), float(tr.t[-1]), float(tr.t[0])]
            for q in range(q_n):
                for j, (img, title) in enumerate([(u[..., q], "truth"), (pr[..., q], "prediction"),
                                                  (err[..., q], "|error|"),
                                                  (mp["std"][..., q], "posterior sd (sensors)")]):
                    e = ext if j < 3 else [ext[0], ext[1], float(tr.t[times[-1]]), float(tr.t[0])]
                    im = axes[q, j].imshow(img.numpy(), aspect="auto", extent=e, cmap="viridis")
                    axes[q, j].set(title=f"{title}, field {q}", xlabel="x", ylabel="t")
                    fig.colorbar(im, ax=axes[q, j])
        else:
            n1, n2 = (a.numel() for a in tr.axes)
            picks = [times[0], times[len(times) // 2], times[-1]]
            fig, axes = plt.subplots(3, 4, figsize=(16, 11), squeeze=False)
            for r, k in enumerate(picks):
                kk = times.index(k)
                for j, (img, title) in enumerate([(u[k], "truth"), (pr[k], "prediction"),
                                                  (err[k], "|error|"), (mp["std"][kk], "posterior sd")]):
                    box = [float(tr.axes[0][0]), float(tr.axes[0][-1]),
                           float(tr.axes[1][0]), float(tr.axes[1][-1])]
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

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, (tr, pr, ga, ba, rec) in enumerate(zip(test, preds, gal, base, uq["per_mu"])):
        c = f"C{i}"
        axes[0].semilogy(tr.t, pde.relative_errors(pr, tr.flat), c, label=f"data-driven mu={tr.mu:g}")
        axes[0].semilogy(tr.t, pde.relative_errors(ba, tr.flat), c, ls=":", label=f"baseline mu={tr.mu:g}")
        if ga is not None:
            axes[0].semilogy(tr.t, pde.relative_errors(ga, tr.flat), c, ls="--", label=f"Galerkin mu={tr.mu:g}")
        axes[1].semilogy(rec["t"], rec["err_post"], c, marker="o", label=f"posterior mean error mu={tr.mu:g}")
        axes[1].semilogy(rec["t"], rec["rel_std"], c, ls="--", label=f"posterior sd (rel.) mu={tr.mu:g}")
        axes[1].semilogy(rec["t"], rec["err_prior"], c, ls=":", label=f"prior (data-driven) error mu={tr.mu:g}")
        fac = uq["factors"]["per_mu"][i]
        axes[1].semilogy(fac["t"], fac["rel_epistemic_sd"], c, ls="-.", alpha=0.7,
                         label=f"factor-Laplace epistemic sd (rel.), no sensors, mu={tr.mu:g}")
    axes[0].set(xlabel="t", ylabel="relative L2 error", title="online phase")
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

    k, idx, y_obs, snap_preds = snap
    tr = test[0]
    x = tr.points
    if len(tr.axes) == 1:
        sel = torch.arange(x.shape[0])
    else:  # the slice x1 = middle of the 2-D grid
        n1, n2 = (a.numel() for a in tr.axes)
        sel = torch.arange(n1) * n2 + n2 // 2
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.5))
    truth = tr.flat[k][sel, :1]
    for method, pred in snap_preds.items():
        p = pred.to("cpu")
        moments = [p.aleatoric[sel, :1], p.epistemic[sel, :1], p.total[sel, :1]]
        bc.plots.predictive_band(x[sel, 0], bc.Predictive(p.mean[sel, :1], *moments), ax=ax, label=method)
        bc.plots.predictive_band(x[sel, 0], bc.Predictive(p.mean[sel, :1] - truth, *moments), ax=ax2,
                                 label=method)
    ax.plot(x[sel, 0], truth[:, 0], "k", lw=0.8, label="truth")
    ax2.axhline(0.0, color="k", lw=0.8)
    if len(tr.axes) == 1:
        ax.scatter(x[idx.cpu(), 0], y_obs[:, 0].cpu(), marker="x", color="k", label="sensors")
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
    pub = res.get("published") or {}
    rows = [
        "| model | mean rel. L2 error (test) | parameters | online coordinates | offline s | online s / trajectory |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| continuous CoLoRA, data-driven | {res['rel_err']:.3e} | {res['params']['total']:,} | "
        f"{res['n_online']} | {res['seconds']['offline']:.1f} | {res['seconds']['online_data']:.4f} |",
    ]
    if res.get("galerkin_rel_err") is not None:
        rows.append(f"| continuous CoLoRA, Neural Galerkin ({res['config']['galerkin_scheme']}) | "
                    f"{res['galerkin_rel_err']:.3e} | {res['params']['total']:,} | {res['n_online']} | - | "
                    f"{res['seconds']['online_galerkin']:.2f} |")
    elif res.get("galerkin_failure"):
        rows.append(f"| continuous CoLoRA, Neural Galerkin | failed: {res['galerkin_failure']} | - | - | - | - |")
    rows.append(f"| baseline u(x, t, mu), no adaptation | {res['baseline_rel_err']:.3e} | "
                f"{res['params']['baseline']:,} | - | {res['seconds']['baseline']:.1f} | - |")
    if pub:
        rows.append(f"| published (Berman & Peherstorfer 2024) | {pub['rel_err']:.2e} | {pub['params']:,} | "
                    f"{pub['online']} | - | - |")
    lines = [f"# continuous CoLoRA: {res['dataset']}", "", *rows, "",
             "Per test parameter: " + ", ".join(f"mu={m}: {e:.3e}" for m, e in res["rel_err_per_mu"].items()),
             "", "## Uncertainty (sensors, Laplace on the online coordinates)", "",
             "| mu | prior (data-driven) error | error of u(x; posterior mean) | rel. predictive sd | 95% coverage (total) "
             "| 95% coverage (epistemic) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rec in res["uq"]["per_mu"]:
        mean = lambda k: sum(rec[k]) / len(rec[k])  # noqa: E731
        lines.append(f"| {rec['mu']:g} | {mean('err_prior'):.3e} | {mean('err_post'):.3e} | "
                     f"{mean('rel_std'):.3e} | {mean('coverage95'):.3f} | {mean('coverage95_epistemic'):.3f} |")
    snap = res["uq"]["snapshot"]
    lines += ["", f"One snapshot (mu={snap['mu']:g}, t={snap['t']:.2f}), three engines:", "",
              "| engine | error of u(x; posterior mean) | rel. predictive sd | rel. epistemic sd | 95% coverage (total) "
              "| 95% coverage (epistemic) | seconds |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, r in res["uq"]["methods"].items():
        if "failed" in r:
            lines.append(f"| {m} | failed: {r['failed']} | - | - | - | - | - |")
            continue
        lines.append(f"| {m} | {r['rel_err']:.3e} | {r['rel_std']:.3e} | {r['rel_epistemic_std']:.3e} | "
                     f"{r['coverage95']:.3f} | {r['coverage95_epistemic']:.3f} | {r['seconds']:.1f} |")
    fac = res["uq"]["factors"]
    lines += ["", f"## Uncertainty over the adapter factors A, B (d = {fac['dim']}, Laplace on training "
              f"snapshots, prior precision {fac['prior_precision']:.3g}, {fac['seconds']:.1f} s), no sensors", "",
              "| mu | rel. epistemic sd (mean over t) | 95% coverage (total) | 95% coverage (epistemic) |",
              "| ---: | ---: | ---: | ---: |"]
    for rec in fac["per_mu"]:
        lines.append(f"| {rec['mu']:g} | {sum(rec['rel_epistemic_sd']) / len(rec['rel_epistemic_sd']):.3e} | "
                     f"{rec['coverage95']:.3f} | {rec['coverage95_epistemic']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="folder of HDF5 trajectories (pde/burgers or pde/rde); "
                    "default: built-in 1-D Burgers")
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (built-in data unless --data)")
    ap.add_argument("--out", default="runs/continuous_pde", help="output folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=None, help="offline budget of the reduced model")
    ap.add_argument("--baseline-seconds", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None, help="at most this many offline steps")
    ap.add_argument("--space-stride", type=int, default=0,
                    help="grid subsampling (default: down to the data set's max_grid points per axis)")
    ap.add_argument("--no-galerkin", action="store_true")
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
    torch.manual_seed(0)
    start = time.perf_counter()
    cfg, trajs = load_data(args)
    overrides = {"seconds": args.seconds, "steps": args.steps, "baseline_seconds": args.baseline_seconds,
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

    model = pde.ReducedModel.build(d_in, q, cfg.width, cfg.depth, cfg.rank, "layer", cfg.period,
                                   cfg.hyper_width, cfg.hyper_depth).to(device)
    n_net, n_hyper = pde.n_parameters(model.sub.model), pde.n_parameters(model.hyper)
    t0 = time.perf_counter()
    hist = pde.train_offline(model, data, steps=cfg.steps, lr=cfg.lr, batch=cfg.batch,
                             max_seconds=cfg.seconds, progress=progress)
    t_off = time.perf_counter() - t0

    width = pde.baseline_width(n_net + n_hyper, d_in, q, cfg.depth)
    torch.manual_seed(0)
    base = pde.ConcatBaseline(d_in, q, width, cfg.depth, cfg.period).to(device)
    t0 = time.perf_counter()
    hist_b = pde.train_offline(base, data, steps=cfg.steps, lr=cfg.lr, batch=cfg.batch,
                               max_seconds=cfg.baseline_seconds, progress=progress)
    t_base = time.perf_counter() - t0

    # online, data-driven
    preds, alphas, t_online = [], [], 0.0
    for tr in test:
        tmu = torch.stack([tr.t, torch.full_like(tr.t, tr.mu)], -1).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            al = model.alpha(tmu)
            pr = model.field(tdata.x, al)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_online += (time.perf_counter() - t0) / len(test)
        preds.append(pr.cpu())
        alphas.append(al)
    errs = [pde.relative_errors(p, tr.flat) for p, tr in zip(preds, test)]
    rel_err = float(torch.cat(errs).mean())
    base_preds = [pde.predict_snapshots(base, tdata.x, torch.stack([tr.t, torch.full_like(tr.t, tr.mu)], -1)
                                        .to(device)).cpu() for tr in test]
    base_err = float(torch.cat([pde.relative_errors(p, tr.flat) for p, tr in zip(base_preds, test)]).mean())
    print(f"data-driven test error {rel_err:.3e}, baseline {base_err:.3e}")

    # online, equation-driven
    gal, gal_err, t_gal, gal_failure = [None] * len(test), None, None, None
    if cfg.galerkin and not args.no_galerkin:
        t0 = time.perf_counter()
        try:
            for i, (tr, al) in enumerate(zip(test, alphas)):
                eq = pde.equation_for(cfg.name, tr.mu)
                xs = tr.subsample(space=cfg.galerkin_stride).points.to(device)
                a_t = pde.neural_galerkin(lambda x, a: model.field(x, a), eq, al[0].detach(), xs,
                                          tr.t.to(device), dt=cfg.galerkin_dt, scheme=cfg.galerkin_scheme,
                                          progress=progress)
                with torch.no_grad():
                    gal[i] = model.field(tdata.x, a_t).cpu()
            t_gal = (time.perf_counter() - t0) / len(test)
            gal_err = float(torch.cat([pde.relative_errors(g, tr.flat) for g, tr in zip(gal, test)]).mean())
            print(f"Neural Galerkin test error {gal_err:.3e}")
        except ValueError as err:      # a blow-up is a result to report, not a crash
            gal, gal_failure = [None] * len(test), str(err)
            print(f"Neural Galerkin failed: {err}")

    # uncertainty
    with torch.no_grad():
        train_pred = pde.predict_snapshots(model, data.x, data.tmu)
    sigma_model = rms(train_pred - data.u)
    uq, maps, snap = run_uq(cfg, model, test, [a.detach() for a in alphas], sigma_model, device, progress)
    uq["factors"] = run_factor_uq(cfg, model, data, test, tdata.x, sigma_model, progress)

    res = {
        "dataset": cfg.name if args.data else "burgers1d (built-in solver)",
        "device": str(device), "quick": args.quick,
        "config": {k: v for k, v in cfg.__dict__.items() if k != "published"},
        "grid_points": int(data.x.shape[0]), "n_train_snapshots": int(data.u.shape[0]),
        "test_mus": [tr.mu for tr in test],
        "rel_err": rel_err, "rel_err_per_mu": {f"{tr.mu:g}": float(e.mean()) for tr, e in zip(test, errs)},
        "galerkin_rel_err": gal_err, "galerkin_failure": gal_failure, "baseline_rel_err": base_err,
        "n_online": model.n_online,
        "params": {"network": n_net, "hypernetwork": n_hyper, "total": n_net + n_hyper,
                   "baseline": pde.n_parameters(base), "baseline_width": width},
        "offline_steps": {"colora": hist[-1]["step"], "baseline": hist_b[-1]["step"]},
        "seconds": {"offline": t_off, "baseline": t_base, "online_data": t_online,
                    "online_galerkin": t_gal, "total": None},
        "sigma_model": sigma_model, "uq": uq, "published": cfg.published,
        "history": {"colora": hist, "baseline": hist_b},
    }
    os.makedirs(args.out, exist_ok=True)
    for final in (False, True):        # numbers first, so that a plotting failure cannot lose them
        if final:
            paths = figures(cfg, args.out, test, preds, gal, base_preds,
                            {"continuous CoLoRA": hist, "baseline": hist_b}, uq, maps, snap)
        res["seconds"]["total"] = time.perf_counter() - start
        _atomic_write(os.path.join(args.out, "results.json"),
                      lambda tmp: open(tmp, "w").write(json.dumps(res, indent=1)))
        table = markdown(res)
        _atomic_write(os.path.join(args.out, "results.md"), lambda tmp: open(tmp, "w").write(table))
    print(table)
    print(f"wrote {args.out}/results.json, results.md, "
          f"{', '.join(os.path.basename(p) for p in paths)} in {res['seconds']['total']:.0f} s")
    return res


if __name__ == "__main__":
    main()
