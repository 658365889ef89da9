"""Test error of the continuous CoLoRA reduced model after a fixed CPU-time (or step) budget:
the runs behind the "Accuracy per second" tables of docs/continuous.md.

One run per call; prints one JSON line (settings, steps done, CPU seconds, training and test
error). The budget is CPU seconds of this process, not wall seconds: ``train_offline``'s clock
is replaced by ``time.process_time`` here, so runs on a shared CPU stay comparable.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pde_accuracy_budget.py --batch 8 --points 256
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pde_accuracy_budget.py --batch 32 --steps 1500 --lr 1e-2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pde_accuracy_budget.py --data runs/data/pde/rde \\
        --test 2.3 2.7 --period 6.283185307179586 --batch 32 --embed-activation
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bayes_colora import pde  # noqa: E402
from bayes_colora.pde import train as train_module  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="runs/data/pde/burgers")
    ap.add_argument("--test", type=float, nargs="+", default=[0.00397, 0.00793], help="test parameters")
    ap.add_argument("--period", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=120.0, help="CPU-second budget (ignored with --steps)")
    ap.add_argument("--steps", type=int, default=None, help="a step budget instead")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--points", type=int, default=None, help="points per snapshot and step (default: all)")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--final-lr", type=float, default=0.0)
    ap.add_argument("--hyper-depth", type=int, default=3)
    ap.add_argument("--embed-activation", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # the budget in CPU seconds of this process: a shared CPU slows the wall clock, not this one
    train_module.time = type(sys)("cpu_clock")
    train_module.time.perf_counter = time.process_time
    trajs = pde.load_folder(args.data)
    n_grid = max(a.numel() for a in trajs[0].axes)
    if len(trajs[0].axes) == 2 and n_grid > 65:          # the study's 65-point grid
        trajs = [tr.subsample(space=(n_grid - 1) // 64) for tr in trajs]
    train, test = pde.split_by_mu(trajs, args.test)
    data, tdata = pde.Snapshots.from_trajectories(train), pde.Snapshots.from_trajectories(test)
    model = pde.ReducedModel.build(data.x.shape[1], data.u.shape[-1], 25, 7, 3, "layer", args.period, 15,
                                   args.hyper_depth, seed=args.seed, embed_activation=args.embed_activation)
    hist = pde.train_offline(model, data, steps=args.steps or 10 ** 9, lr=args.lr, final_lr=args.final_lr,
                             batch=args.batch, n_points=args.points, seed=args.seed, progress=False,
                             max_seconds=None if args.steps else args.seconds, log_every=25)
    err = pde.relative_errors(pde.predict_snapshots(model, tdata.x, tdata.tmu), tdata.u).mean()
    train_err = pde.relative_errors(pde.predict_snapshots(model, data.x, data.tmu), data.u).mean()
    out = {**vars(args), "steps_done": hist[-1]["step"], "cpu_seconds": time.process_time(),
           "train_rel_err": float(train_err), "test_rel_err": float(err)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
