"""One SVI step with 8 particles: vectorised (one batched forward) versus 8 sequential forwards.

Run: .venv/bin/python benchmarks/vi_particles.py [--device cuda]   (CPU by default; prints a
markdown table). Model: an MLP 64-256-256-10 with LoRA rank 4 on every Linear (random weights),
Categorical likelihood, batch 128, low-rank guide (rank 10). The two variants take steps in
turn (so load from other processes hits both alike); the table gives the fastest and the median
of 30 steps each, after 3 warm-up steps.
"""
from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import bayes_colora as bc
from bayes_colora.inference.vi import make_guide, make_model

PARTICLES, BATCH, N, STEPS, WARMUP = 8, 128, 10_000, 30, 3


def make_svi(vectorise: bool, device: str) -> tuple[SVI, int]:
    """An SVI object over a fresh subspace (its own param store names) and d."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    sub = bc.Subspace.from_model(model.to(device), bc.LoRA(rank=4))
    pmodel = make_model(sub, bc.Categorical(), bc.NormalPrior(1.0), N)
    guide = make_guide(pmodel, "lowrank", sub.theta, 1e-2, 10)
    guide._pyro_name = f"guide_{'vectorised' if vectorise else 'sequential'}"  # own param names
    elbo = Trace_ELBO(num_particles=PARTICLES, vectorize_particles=vectorise, max_plate_nesting=1)
    return SVI(pmodel, guide, pyro.optim.Adam({"lr": 1e-3}), loss=elbo), sub.dim


def timed(svi: SVI, x: torch.Tensor, y: torch.Tensor, device: str) -> float:
    start = time.perf_counter()
    svi.step(x, y)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    device = parser.parse_args().device
    x = torch.randn(BATCH, 64, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    pyro.clear_param_store()
    runs = {}
    for vectorise in (True, False):
        svi, d = make_svi(vectorise, device)
        for _ in range(WARMUP):
            timed(svi, x, y, device)
        runs[vectorise] = svi
    times = {True: [], False: []}
    for _ in range(STEPS):
        for vectorise, svi in runs.items():
            times[vectorise].append(timed(svi, x, y, device))
    threads = f"{torch.get_num_threads()} threads" if device == "cpu" else device
    print(f"SVI step, {PARTICLES} particles, d = {d}, batch {BATCH}, {threads}\n")
    print("| timing | vectorised (ms) | sequential (ms) | speed-up |")
    print("|---|---|---|---|")
    for name, stat in (("fastest", min), ("median", statistics.median)):
        vec, seq = stat(times[True]), stat(times[False])
        print(f"| {name} of {STEPS} | {vec * 1e3:.1f} | {seq * 1e3:.1f} | {seq / vec:.2f}x |")


if __name__ == "__main__":
    main()
