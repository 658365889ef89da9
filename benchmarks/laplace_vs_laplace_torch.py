"""Full-GGN Laplace fit + predictive on a conv model with dense (H x W) outputs: bayes_colora's JVP
engine against laplace-torch, time and peak memory, each run in a fresh subprocess that is killed
when its resident memory passes a cap (default 4 GiB, polled every 10 ms): "fails" in the table.

    .venv/bin/python benchmarks/laplace_vs_laplace_torch.py [--cap-gib 4] [--sizes 16 32 64 128]
    python benchmarks/laplace_vs_laplace_torch.py --device cuda     # on a GPU
    ... --warm        # time a second run in each process (steady state)

On CUDA both run on the GPU (laplace-torch's default ``CurvlinopsGGN`` forms the full GGN as
``linop @ torch.eye(d)`` with the identity on the CPU, so its worker sets the default device to
CUDA; the ``AsdlGGN`` and ``BackPackGGN`` backends refuse a model with frozen parameters), times are taken after ``torch.cuda.synchronize()``, and memory
is the peak of ``torch.cuda.max_memory_allocated`` (no RSS cap; running out of GPU memory is
"fails").

Model: ``Conv(1,c,3) - tanh - Conv(c,c,3) - tanh - Conv(c,1,3)``, LoRA of rank r on every conv,
a random point theta, Gaussian likelihood sigma = 0.1, prior precision 1. Fit on N images, then
predict per-pixel variances on 8 images: bayes_colora by the linearised predictive with 32
samples (JVPs), laplace-torch by its GLM predictive (``pred_type="glm"``, closed form, which forms
the (B, HW, HW) output covariance). Peak memory is the process's peak RSS minus its RSS just before
the fit. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

THREADS = 2


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl: str, size: int, channels: int, rank: int, n_train: int, out: str,
           device: str = "cpu", warm: bool = False, chunk: int = 32) -> None:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import bayes_colora as bc

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(channels, 1, 3, padding=1))
    sub = bc.Subspace.from_model(model, bc.LoRA(rank=rank)).to(device)
    sub.theta = 0.1 * torch.randn(sub.dim, device=device)
    x, y = torch.randn(n_train, 1, size, size, device=device), torch.randn(n_train, 1, size, size, device=device)
    xt = torch.randn(8, 1, size, size, device=device)
    lik, sigma = bc.Gaussian(sigma=0.1), 0.1
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed() -> tuple[float, float, float, float, "torch.Tensor", "torch.Tensor"]:
        rss0 = rss_bytes()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            mem0 = torch.cuda.memory_allocated()
        sync()
        t0 = time.perf_counter()
        if impl == "bayes_colora":
            loader = DataLoader(TensorDataset(x, y), batch_size=8)
            post = bc.fit_laplace(sub, loader, lik, bc.NormalPrior(1.0), hessian="full", backend="jvp",
                                  chunk_size=chunk, progress=False)
            sync()
            t_fit = time.perf_counter() - t0
            var = bc.predict(sub, post, xt, n_samples=32, linearized=True).epistemic
            cov = post.covariance
        else:
            from laplace import Laplace

            class Flat(nn.Module):
                def __init__(self, sub):
                    super().__init__()
                    self.sub = sub

                def forward(self, x):
                    return self.sub(x).flatten(1)

            loader = DataLoader(TensorDataset(x, y.flatten(1)), batch_size=8)
            if cuda:  # laplace-torch 0.3's CurvlinopsGGN.full multiplies by a torch.eye made on the CPU
                torch.set_default_device(device)
            la = Laplace(Flat(sub), "regression", subset_of_weights="all", hessian_structure="full",
                         sigma_noise=sigma, prior_precision=1.0)
            la.fit(loader)
            sync()
            t_fit = time.perf_counter() - t0
            _, f_var = la(xt, pred_type="glm")
            var = f_var.diagonal(dim1=-2, dim2=-1)
            cov = la.posterior_covariance
        sync()
        total = time.perf_counter() - t0
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            extra = peak - mem0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            extra = peak - rss0
        return t_fit, total, peak, extra, cov, var

    first = timed()
    if warm:  # time a second run: without CUDA context, kernel loading, cuDNN / oneDNN set-up
        t_fit, total, peak, extra, cov, var = timed()
        if not cuda:  # the RSS peak is the process's: keep the first run's memory figures
            peak, extra = first[2], first[3]
    else:
        t_fit, total, peak, extra, cov, var = first
    torch.save({"cov": cov.detach().cpu(), "var": var.detach().flatten().cpu()}, out + ".pt")
    with open(out, "w") as f:
        json.dump({"d": sub.dim, "fit_s": t_fit, "total_s": total, "peak_gib": peak / 2 ** 30,
                   "extra_gib": extra / 2 ** 30}, f)


def run(impl: str, size: int, channels: int, rank: int, n_train: int, cap: int,
        device: str = "cpu", warm: bool = False, chunk: int = 32) -> dict:
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)

    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    proc = subprocess.Popen([sys.executable, __file__, "--worker", impl, str(size), str(channels),
                             str(rank), str(n_train), out, device, str(int(warm)), str(chunk)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = False
    while proc.poll() is None:  # the memory cap: kill the worker when its RSS passes it
        try:
            with open(f"/proc/{proc.pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError):
            break
        if rss > cap and not device.startswith("cuda"):
            proc.kill()
            killed = True
        time.sleep(0.01)
    stderr = proc.communicate()[1]
    if killed:
        return {"failed": f"over the {cap / 2 ** 30:.0f} GiB cap"}
    if proc.returncode != 0:
        return {"failed": (stderr.strip().splitlines() or ["?"])[-1][:120]}
    with open(out) as f:
        res = json.load(f)
    res["out"] = out
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap-gib", type=float, default=4.0)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--reference", action="store_true", help="also run 64x64 with d ~ 5000")
    ap.add_argument("--device", default="cpu", help="cpu (RSS, capped) or cuda (GPU memory)")
    ap.add_argument("--chunk-size", type=int, default=32, help="bayes_colora's JVPs per call")
    ap.add_argument("--warm", action="store_true",
                    help="time a second run in each process (steady state, without start-up costs)")
    args = ap.parse_args()
    import torch

    cap = int(args.cap_gib * 2 ** 30)
    where = f"cap {args.cap_gib} GiB RSS, {THREADS} threads" if args.device == "cpu" else args.device
    print(f"{where}, N = {args.n_train}{', second run timed' if args.warm else ''}\n")
    print("| outputs | d | bayes_colora fit+pred (s) | laplace-torch fit+pred (s) | time ratio "
          "| bayes_colora extra / peak RSS (GiB) | laplace-torch extra / peak RSS (GiB) | memory ratio (extra) "
          "| cov. rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        ours = run("bayes_colora", size, args.channels, args.rank, args.n_train, cap, args.device, args.warm, args.chunk_size)
        ref = run("laplace-torch", size, args.channels, args.rank, args.n_train, cap, args.device, args.warm, args.chunk_size)
        row = [f"{size}x{size} = {size * size}", str(ours.get("d", "?"))]
        cell = lambda r: (f"{r['total_s']:.2f} (fit {r['fit_s']:.2f})" if "failed" not in r  # noqa: E731
                          else f"fails: {r['failed']}")
        mem = lambda r: f"{r['extra_gib']:.3f} / {r['peak_gib']:.2f}" if "failed" not in r else "-"  # noqa: E731
        row += [cell(ours), cell(ref)]
        both = "failed" not in ours and "failed" not in ref
        row.append(f"{ref['total_s'] / ours['total_s']:.1f}x" if both else "-")
        row += [mem(ours), mem(ref)]
        row.append(f"{ref['extra_gib'] / max(ours['extra_gib'], 1e-9):.1f}x" if both else "-")
        if both:
            a, b = torch.load(ours["out"] + ".pt")["cov"], torch.load(ref["out"] + ".pt")["cov"]
            row.append(f"{float((a - b).norm() / b.norm()):.1e}")
        else:
            row.append("-")
        print("| " + " | ".join(row) + " |", flush=True)
    if args.reference:
        r = run("bayes_colora", 64, 12, 20, 8, cap, args.device)
        print(f"\nreference 64x64 (4096 outputs), channels 12, LoRA rank 20, N = 8: "
              f"{json.dumps({k: v for k, v in r.items() if k != 'out'})}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7],
               *sys.argv[8:9], *(bool(int(a)) for a in sys.argv[9:10]), *(int(a) for a in sys.argv[10:11]))
    else:
        main()
