"""Offline training speed of the continuous CoLoRA reduced model: steps per second against the
snapshots per step (and points per snapshot), on a PDE data folder.

Run (about 10 s per row plus start-up):

    .venv/bin/python benchmarks/pde_training_speed.py --data runs/data/pde/burgers --device cuda
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pde_training_speed.py --data runs/data/pde/burgers --batches 8 32

Prints a markdown table: batch, points, steps/s and million point evaluations per second, each
from one ``bc.pde.train_offline`` run of ``--seconds``, counted after its first ``--warmup``
steps (which include the compile time with ``--compile``: give that more ``--seconds``). The
architecture is the study's (7 continuous LoRA layers of width 25, rank 3, hypernetwork
3 x 15, no embedding swish); a 2-D grid is subsampled to 65 points per axis as in the study.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bayes_colora import pde  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="runs/data/pde/burgers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--points", type=int, nargs="+", default=[0], help="points per snapshot; 0: all")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--period", type=float, default=None, help="embedding period (default: 2 for 2-D, 2 pi for 1-D)")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    trajs = pde.load_folder(args.data)
    n_grid = max(a.numel() for a in trajs[0].axes)
    stride = math.ceil((n_grid - 1) / 64) if n_grid > 65 and len(trajs[0].axes) == 2 else 1
    data = pde.Snapshots.from_trajectories([tr.subsample(space=stride) for tr in trajs]).to(device)
    d_in, q = data.x.shape[1], data.u.shape[-1]
    period = args.period or (2.0 if d_in == 2 else 2 * math.pi)
    print(f"{args.data}: {data.u.shape[0]} snapshots x {data.x.shape[0]} points x {q} fields on {device}"
          f"{' (torch.compile)' if args.compile else ''}\n")
    print("| batch | points | steps/s | M point evaluations/s |\n| ---: | ---: | ---: | ---: |")
    for batch in args.batches:
        for n_points in args.points:
            model = pde.ReducedModel.build(d_in, q, 25, 7, 3, "layer", period, 15, 3).to(device)
            hist = pde.train_offline(model, data, steps=10 ** 9, batch=batch, n_points=n_points or None,
                                     max_seconds=args.seconds, log_every=args.warmup, progress=False,
                                     compile=args.compile)
            if len(hist) < 3:
                raise SystemExit(f"batch {batch}: only {hist[-1]['step']} steps in {args.seconds} s; "
                                 f"raise --seconds (with --compile it includes the compile time)")
            # from the first record (after the warm-up steps) to the last
            rate = (hist[-1]["step"] - hist[0]["step"]) / (hist[-1]["seconds"] - hist[0]["seconds"])
            pts = n_points or data.x.shape[0]
            evals = rate * min(batch, data.u.shape[0]) * pts / 1e6
            print(f"| {batch} | {pts} | {rate:.1f} | {evals:.2f} |", flush=True)


if __name__ == "__main__":
    main()
