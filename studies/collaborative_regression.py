r"""Collaborative low-rank regression: the theory setting of collaborative CoLoRA.

k tasks, ``y = W_t^* x + noise`` with ``x ~ N(0, I_in)``, noise ``N(0, sigma^2 I_out)`` and

.. math::  W_t^* = B^* R_t^* A^*, \qquad R_t^* = I_r + s\, G_t,\quad G_t \sim N(0, 1)^{r \times r},

``A^*`` (``r x in``) and ``B^*`` (``out x r``) with orthonormal rows / columns. The spread ``s``
sets task similarity (``s = 0``: one task). Three estimators of every ``W_t``, each a low-rank
least-squares fit:

* independent: ``W_t = B_t A_t`` on task t's data alone;
* collaborative: ``W_t = B (I + D_t) A`` with shared ``A``, ``B`` (all data) and personal ``D_t``;
* collaborative_shrunk: the same with each ``R_t`` step a ridge towards the tasks' mean ``R``,
  ``lambda = 10 sigma^2`` (a MAP under ``R_t ~ N(mean R, I / 10)``): stable when ``n`` is tiny;
* shared: one ``W = B A`` for every task, on all data.

Solvers: alternating minimisation (closed-form least squares for ``A``, ``B`` and each ``R_t`` in
turn, from a spectral start: the top-r SVD of the moment estimate ``sum_i y_i x_i^T / n``) and
gradient descent (``bc.fit_map`` on a zero linear layer carrying ``bc.CollaborativeLoRA``).
Error: ``||W_t - W_t^*||_F / ||W_t^*||_F``, averaged over tasks and seeds.

Bayesian part: with ``A``, ``B`` fixed at the collaborative estimate, the model is linear in the
personal ``D_t``; a prior ``D_t ~ N(0, tau^2 I)`` with ``tau`` tuned by the Laplace evidence
(``bc.fit_laplace(tune_prior="marglik")`` on ``bc.CollaborativeLoRA.personal_subspace`` of all
tasks jointly, MAP and evidence alternated) gives a Gaussian posterior whose width follows the
task spread ``s``: similar tasks -> small ``tau`` -> narrow posteriors.

Usage: ``python studies/collaborative_regression.py --quick --out runs/collab_regression``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bayes_colora as bc  # noqa: E402
from bayes_colora.plots import save_figure  # noqa: E402
from bayes_colora.subspace import _atomic_write  # noqa: E402

METHODS = ("independent", "collaborative", "collaborative_shrunk", "shared")
GD_METHODS = ("independent", "collaborative", "shared")
#: the shrinkage of "collaborative_shrunk": a N(mean R, sigma^2 / lambda I) prior on each R_t
SHRINK_PER_NOISE_VAR = 10.0


# ----------------------------------------------------------------------------- data
@dataclass
class Tasks:
    """``x``: ``(k, n, in)``, ``y``: ``(k, n, out)``, ``w_star``: ``(k, out, in)``, ``r_star``: ``(k, r, r)``."""

    x: torch.Tensor
    y: torch.Tensor
    w_star: torch.Tensor
    r_star: torch.Tensor
    noise: float


def make_tasks(n_tasks: int, n: int, d_in: int, d_out: int, rank: int, spread: float, noise: float,
               seed: int, dtype: torch.dtype = torch.float64) -> Tasks:
    """Draw the ground truth and ``n`` examples per task (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(d_in, rank, generator=g, dtype=dtype))[0].T          # (r, in)
    b = torch.linalg.qr(torch.randn(d_out, rank, generator=g, dtype=dtype))[0]           # (out, r)
    r = torch.eye(rank, dtype=dtype) + spread * torch.randn(n_tasks, rank, rank, generator=g, dtype=dtype)
    w = b @ r @ a
    x = torch.randn(n_tasks, n, d_in, generator=g, dtype=dtype)
    y = x @ w.mT + noise * torch.randn(n_tasks, n, d_out, generator=g, dtype=dtype)
    return Tasks(x, y, w, r, noise)


def recovery_error(w: torch.Tensor, w_star: torch.Tensor) -> float:
    """Mean over tasks of ``||W_t - W_t^*||_F / ||W_t^*||_F``."""
    return float((torch.linalg.matrix_norm(w - w_star) / torch.linalg.matrix_norm(w_star)).mean())


# ------------------------------------------------------------- alternating minimisation
def _solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + ridge I)^{-1} rhs`` (plus a ``1e-10 tr(G) / dim`` jitter for rank-deficient ``G``)."""
    lam = ridge + 1e-10 * float(gram.diagonal().mean())
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)


def altmin(x: torch.Tensor, y: torch.Tensor, rank: int, personal: bool = True, iters: int = 500,
           ridge: float = 0.0, shrink: float = 0.0, tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Alternating least squares for ``y_i = B R_{t_i} A x_i`` over tasks ``x: (k, n, in)``, ``y: (k, n, out)``.

    Each step is the exact minimiser of ``sum_t ||Y_t - X_t A^T R_t^T B^T||^2`` in one block:
    each ``R_t`` from ``(B^T B) (x) (U_t^T U_t) vec(R_t) = vec(B^T Y_t^T U_t)`` (``U_t = X_t A^T``,
    row-major vec; ``shrink = lambda > 0`` adds ``lambda (vec(R_t) - vec(mean R))``, a ridge
    towards the previous mean of the ``R_t``), ``A`` from ``sum_t (M_t^T M_t) (x) (X_t^T X_t) vec(A) = sum_t vec(M_t^T Y_t^T X_t)``
    (``M_t = B R_t``), ``B = (sum Y_t^T Z_t)(sum Z_t^T Z_t)^{-1}`` with ``Z_t = X_t A^T R_t^T``.
    ``personal=False`` keeps ``R_t = I`` (one shared ``B A``).

    Start: with the per-task moments ``M_t = Y_t^T X_t / n`` (``E M_t = W_t``), ``A`` spans the top-r
    right singular vectors of ``[M_1; ...; M_k]`` and ``B`` the top-r left ones of ``[M_1 ... M_k]``
    (with ``personal=False``: ``B A`` = the rank-r SVD truncation of ``sum_t M_t / k``). With personal
    matrices the gauge ``B R_t A = (B P)(P^{-1} R_t Q^{-1})(Q A)`` is fixed after every sweep by
    orthonormalising the rows of ``A`` and the columns of ``B`` (QR), which changes no ``W_t``.
    Returns ``(A, B, R)``: ``(r, in)``, ``(out, r)``, ``(k, r, r)``.
    """
    k, n, d_in = x.shape
    moments = y.mT @ x / n                                                               # (k, out, in)
    r = torch.eye(rank, dtype=x.dtype).repeat(k, 1, 1)
    if personal:
        a = torch.linalg.svd(moments.reshape(-1, d_in), full_matrices=False)[2][:rank]
        b = torch.linalg.svd(moments.transpose(0, 1).reshape(moments.shape[1], -1), full_matrices=False)[0][:, :rank]
    else:
        u, s, vt = torch.linalg.svd(moments.mean(0))
        b, a = u[:, :rank] * s[:rank].sqrt(), s[:rank, None].sqrt() * vt[:rank]
    xtx = x.mT @ x                                                                      # (k, in, in)
    prev = math.inf
    for _ in range(iters):
        if personal:
            uu = x @ a.T
            grams = torch.einsum("ab,tij->taibj", b.T @ b, uu.mT @ uu).reshape(k, rank * rank, rank * rank)
            rhs = (b.T @ y.mT @ uu).reshape(k, -1)
            rhs = rhs + shrink * r.mean(0).reshape(1, -1)  # ridge towards the tasks' mean R
            r = torch.stack([_solve(grams[t], rhs[t], ridge + shrink) for t in range(k)]).reshape(k, rank, rank)
        m = b @ r                                                                        # (k, out, r)
        gram = torch.einsum("tab,tij->aibj", m.mT @ m, xtx).reshape(rank * d_in, rank * d_in)
        a = _solve(gram, (m.mT @ y.mT @ x).sum(0).reshape(-1), ridge).reshape(rank, d_in)
        z = x @ a.T @ r.mT                                                               # (k, n, r)
        b = _solve((z.mT @ z).sum(0), (y.mT @ z).sum(0).T, ridge).T
        if personal:  # fix the gauge: A <- Q^T (orthonormal rows), B <- P, R_t <- T R_t S^T
            q, s_fac = torch.linalg.qr(a.T)
            p, t_fac = torch.linalg.qr(b)
            a, b, r = q.T, p, t_fac @ r @ s_fac.T
        loss = float(((x @ (b @ r @ a).mT - y) ** 2).sum())
        if prev - loss <= tol * prev and prev < math.inf:
            break
        prev = loss
    return a, b, r


def fit_altmin(tasks: Tasks, rank: int, method: str) -> torch.Tensor:
    """``W_t`` estimates ``(k, out, in)`` of one method by alternating minimisation."""
    if method in ("collaborative", "collaborative_shrunk"):
        shrink = SHRINK_PER_NOISE_VAR * tasks.noise ** 2 if method == "collaborative_shrunk" else 0.0
        a, b, r = altmin(tasks.x, tasks.y, rank, personal=True, shrink=shrink)
        return b @ r @ a
    if method == "shared":
        a, b, _ = altmin(tasks.x.reshape(1, -1, tasks.x.shape[-1]), tasks.y.reshape(1, -1, tasks.y.shape[-1]),
                         rank, personal=False)
        return (b @ a).expand(tasks.x.shape[0], -1, -1)
    if method == "independent":
        ws = [altmin(tasks.x[t:t + 1], tasks.y[t:t + 1], rank, personal=False) for t in range(tasks.x.shape[0])]
        return torch.stack([b @ a for a, b, _ in ws])
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# -------------------------------------------------------------------- gradient descent
def collaborative_subspace(d_in: int, d_out: int, rank: int, n_tasks: int, seed: int) -> bc.Subspace:
    """A zero linear layer (no bias) with ``bc.CollaborativeLoRA``: ``f(x; theta, t) = B (I + D_t) A x``."""
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.zeros_(layer.weight)
    return bc.Subspace.from_model(nn.Sequential(layer), bc.CollaborativeLoRA(rank, n_tasks))


def task_batches(x: torch.Tensor, y: torch.Tensor, task: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """One full batch ``{"input", "task", "labels"}`` (float32), the format every engine reads."""
    return [{"input": x.float(), "task": task, "labels": y.float()}]


def _stack(tasks: Tasks, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = tasks.x.shape[1]
    task = torch.arange(len(ids)).repeat_interleave(n)
    return tasks.x[ids].reshape(-1, tasks.x.shape[-1]), tasks.y[ids].reshape(-1, tasks.y.shape[-1]), task


def fit_gd(tasks: Tasks, rank: int, method: str, epochs: int, lr: float, seed: int,
           device: str = "cpu") -> torch.Tensor:
    """``W_t`` estimates ``(k, out, in)`` by ``bc.fit_map`` (Adam, full batch, maximum likelihood) on ``device``."""
    k, _, d_in = tasks.x.shape
    d_out = tasks.y.shape[-1]
    groups = {"collaborative": [list(range(k))], "shared": [list(range(k))],
              "independent": [[t] for t in range(k)]}[method]
    ws = []
    for ids in groups:
        x, y, task = _stack(tasks, ids)
        if method == "shared":
            task = torch.zeros_like(task)
        sub = collaborative_subspace(d_in, d_out, rank, len(ids) if method == "collaborative" else 1, seed).to(device)
        bc.fit_map(sub, task_batches(x, y, task), bc.Gaussian(sigma=tasks.noise), epochs=epochs, lr=lr,
                   progress=False)
        ws.append(layer_weights(sub))
    w = torch.cat(ws)
    return w.expand(k, -1, -1) if method == "shared" else w


def layer_weights(sub: bc.Subspace) -> torch.Tensor:
    """``B (I + D_t) A`` of every task of the single CollaborativeLoRA layer: ``(k, out, in)``."""
    layer = next(iter(sub.adapter_layers().values()))
    with torch.no_grad():
        return torch.stack([layer.delta_weight(t) for t in range(layer.n_tasks)]).double().cpu()


# ---------------------------------------------------------------------- Bayesian part
def personal_posterior(tasks: Tasks, rank: int, rounds: int = 3, seed: int = 0
                       ) -> tuple[bc.Posterior, bc.Subspace, bc.Subspace, float]:
    """Gaussian posterior over every task's ``D_t`` with ``A``, ``B`` fixed at the collaborative
    alternating-minimisation estimate and the prior precision tuned by the Laplace evidence.

    Returns ``(posterior, personal subspace, full subspace, tuned prior precision)``.
    """
    k, _, d_in = tasks.x.shape
    a, b, r = altmin(tasks.x, tasks.y, rank, personal=True)
    b = b @ r.mean(0)  # the common part into the shared factor: the R_t then average to I
    sub = collaborative_subspace(d_in, tasks.y.shape[-1], rank, k, seed)
    layer = next(iter(sub.adapter_layers().values()))
    with torch.no_grad():
        layer.lora_A.copy_(a.float())
        layer.lora_B.copy_(b.float())
    personal = bc.CollaborativeLoRA.personal_subspace(sub, list(range(k)))
    loader = task_batches(*_stack(tasks, list(range(k))))
    lik, precision = bc.Gaussian(sigma=tasks.noise), 1.0
    for _ in range(rounds):  # MacKay: MAP at the current precision, then the evidence-optimal one
        # the MAP of this linear-Gaussian model in closed form (bc.fit_map reaches it too, slower)
        personal.theta = closed_form_posterior(personal, loader, tasks.noise, precision)[0].float()
        post = bc.fit_laplace(personal, loader, lik, prior=bc.NormalPrior(scale=precision ** -0.5),
                              hessian="full", tune_prior="marglik", progress=False)
        precision = post.history[-1]["prior_precision"]
    personal.theta = closed_form_posterior(personal, loader, tasks.noise, precision)[0].float()
    post = bc.fit_laplace(personal, loader, lik, prior=bc.NormalPrior(scale=precision ** -0.5),
                          hessian="full", progress=False)
    return post, personal, sub, precision


def closed_form_posterior(personal: bc.Subspace, loader: list[dict[str, torch.Tensor]], noise: float,
                          precision: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact posterior ``N(m, S)`` of a subspace in which the model is linear (here: the personal
    ``D_t`` with ``A``, ``B`` fixed): ``f(x; theta) = f_0 + J theta``, prior ``N(0, precision^{-1} I)``,
    ``S = (J^T J / sigma^2 + precision I)^{-1}``, ``m = S J^T (y - f_0) / sigma^2``.
    ``J`` is built column by column from ``f(e_j) - f(0)`` (exact for a linear model), in float64."""
    (batch,) = loader
    x = {k: v for k, v in batch.items() if k != "labels"}
    zero = torch.zeros(personal.dim)
    with torch.no_grad():
        f0 = personal(x, theta=zero).double().reshape(-1)
        jac = (personal(x, theta=torch.eye(personal.dim)).double().reshape(personal.dim, -1) - f0).T
    prec = jac.T @ jac / noise ** 2 + precision * torch.eye(personal.dim, dtype=torch.float64)
    cov = torch.linalg.inv(prec)
    mean = cov @ jac.T @ (batch["labels"].double().reshape(-1) - f0) / noise ** 2
    return mean, cov


# ----------------------------------------------------------------------------- study
@dataclass
class Config:
    n_tasks: int = 10
    d_in: int = 20
    d_out: int = 10
    rank: int = 2
    noise: float = 0.2
    samples: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    spreads: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)
    seeds: int = 5
    gd_epochs: int = 1000
    gd_lr: float = 2e-2
    gd_seeds: int = 1
    bayes_n: int = 16


QUICK = Config(n_tasks=4, d_in=10, d_out=5, rank=2, samples=(4, 32), spreads=(0.0, 1.0), seeds=1,
               gd_epochs=100, gd_lr=0.1, bayes_n=12)


def run(cfg: Config, progress: bool = True, device: str = "cpu") -> dict:
    """Every (spread, n, seed, method, solver) cell, then the posterior width per spread."""
    rows = []
    cells = [(s, n, seed) for s in cfg.spreads for n in cfg.samples for seed in range(cfg.seeds)]
    for s, n, seed in tqdm(cells, desc="recovery", disable=not progress):
        tasks = make_tasks(cfg.n_tasks, n, cfg.d_in, cfg.d_out, cfg.rank, s, cfg.noise, seed)
        for method in METHODS:
            rows.append({"spread": s, "n": n, "seed": seed, "method": method, "solver": "altmin",
                         "error": recovery_error(fit_altmin(tasks, cfg.rank, method), tasks.w_star)})
            if seed < cfg.gd_seeds and method in GD_METHODS:
                w = fit_gd(tasks, cfg.rank, method, cfg.gd_epochs, cfg.gd_lr, seed, device)
                rows.append({"spread": s, "n": n, "seed": seed, "method": method, "solver": "gd",
                             "error": recovery_error(w, tasks.w_star)})
    bayes = []
    for s in tqdm(cfg.spreads, desc="posterior", disable=not progress):
        for seed in range(cfg.seeds):
            tasks = make_tasks(cfg.n_tasks, cfg.bayes_n, cfg.d_in, cfg.d_out, cfg.rank, s, cfg.noise, 100 + seed)
            post, personal, _, precision = personal_posterior(tasks, cfg.rank, seed=seed)
            bayes.append({"spread": s, "seed": seed, "prior_precision": precision,
                          "posterior_std": float(post.covariance.diagonal().sqrt().mean()),
                          "prior_std": precision ** -0.5})
    return {"config": asdict(cfg), "recovery": rows, "bayes": bayes}


def summarise(results: dict) -> dict:
    """Mean error per (spread, n, method, solver) and mean posterior width per spread."""
    table: dict[tuple, list[float]] = {}
    for r in results["recovery"]:
        table.setdefault((r["spread"], r["n"], r["method"], r["solver"]), []).append(r["error"])
    widths: dict[float, list[float]] = {}
    for r in results["bayes"]:
        widths.setdefault(r["spread"], []).append(r["posterior_std"])
    return {"error": {k: sum(v) / len(v) for k, v in table.items()},
            "posterior_std": {k: sum(v) / len(v) for k, v in widths.items()}}


def markdown(results: dict) -> str:
    cfg, summ = results["config"], summarise(results)
    lines = [f"Recovery error ||W_t - W_t*||_F / ||W_t*||_F (mean over {cfg['n_tasks']} tasks and "
             f"{cfg['seeds']} seeds; alternating minimisation, gradient descent in brackets where run)", "",
             "| spread s | n per task | " + " | ".join(METHODS) + " |", "| ---: | ---: |" + " ---: |" * len(METHODS)]
    for s in cfg["spreads"]:
        for n in cfg["samples"]:
            cells = []
            for m in METHODS:
                cell = f"{summ['error'][(s, n, m, 'altmin')]:.3f}"
                if (s, n, m, "gd") in summ["error"]:
                    cell += f" ({summ['error'][(s, n, m, 'gd')]:.3f})"
                cells.append(cell)
            lines.append(f"| {s:g} | {n} | " + " | ".join(cells) + " |")
    lines += ["", f"Posterior over the personal D_t (n = {cfg['bayes_n']} per task, evidence-tuned prior)", "",
              "| spread s | mean posterior std of D_t entries | prior std (tuned) |", "| ---: | ---: | ---: |"]
    prior = {}
    for r in results["bayes"]:
        prior.setdefault(r["spread"], []).append(r["prior_std"])
    for s, v in summ["posterior_std"].items():
        lines.append(f"| {s:g} | {v:.4f} | {sum(prior[s]) / len(prior[s]):.4f} |")
    return "\n".join(lines) + "\n"


def figures(results: dict, out: str) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    cfg, summ = results["config"], summarise(results)
    fig = Figure(figsize=(3.2 * len(cfg["spreads"]), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(cfg["spreads"]), sharey=True, squeeze=False)[0]
    for ax, s in zip(axes, cfg["spreads"]):
        for m, colour in zip(METHODS, ("tab:blue", "tab:orange", "tab:red", "tab:green")):
            for solver, style in (("altmin", "-o"), ("gd", "--x")):
                ns = [n for n in cfg["samples"] if (s, n, m, solver) in summ["error"]]
                if ns:
                    ax.plot(ns, [summ["error"][(s, n, m, solver)] for n in ns], style, color=colour,
                            label=f"{m} ({solver})", ms=4)
        ax.set(xscale="log", yscale="log", title=f"spread s = {s:g}", xlabel="samples per task")
        ax.set_xticks(list(cfg["samples"]), [str(n) for n in cfg["samples"]], minor=False)
        ax.xaxis.set_minor_locator(NullLocator())
    axes[0].set_ylabel("relative error of W_t")
    axes[-1].legend(fontsize=6)
    paths = [os.path.join(out, "recovery.png")]
    save_figure(fig, paths[0])
    fig = Figure(figsize=(4, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    spreads = list(summ["posterior_std"])
    ax.plot([max(s, 1e-2) for s in spreads], list(summ["posterior_std"].values()), "-o")
    ax.set(xscale="log", yscale="log", xlabel="task spread s (0 drawn at 0.01)",
           ylabel="posterior std of D_t entries", title="personal posterior narrows with similarity")
    paths.append(os.path.join(out, "posterior_width.png"))
    save_figure(fig, paths[1])
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid for a CPU check (about a minute)")
    ap.add_argument("--out", default="runs/collaborative_regression", help="output folder")
    ap.add_argument("--device", default="cpu", help="device of the gradient-descent fits (the closed-form "
                    "solvers run on the CPU in float64); the study is CPU-sized")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    start = time.time()
    results = run(cfg, progress=not args.no_progress, device=args.device)
    results["seconds"] = time.time() - start
    os.makedirs(args.out, exist_ok=True)
    _atomic_write(os.path.join(args.out, "results.json"),
                  lambda tmp: open(tmp, "w").write(json.dumps(results, indent=1)))
    table = markdown(results)
    _atomic_write(os.path.join(args.out, "results.md"), lambda tmp: open(tmp, "w").write(table))
    paths = figures(results, args.out)
    print(table)
    print(f"wrote {args.out}/results.json, results.md, {', '.join(os.path.basename(p) for p in paths)} "
          f"in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
