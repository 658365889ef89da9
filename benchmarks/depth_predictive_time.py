r"""The S-sample depth predictive against one forward pass, by where the adapters sit.

Depth Anything "small" (24.8M parameters, random init: the time does not depend on the weights)
with the aleatoric channel, a batch of images, and a diagonal Gaussian posterior over each
adapter's theta. For every (placement, adapter) it times, on one set of inputs:

* one deterministic forward pass, ``sub(images)``;
* the S-sample predictive of ``bc.depth.predict_depth`` (the frozen layers below the first
  adapter run once, the rest once per sample, vectorised);
* the same with ``chunk_size="auto"``;
* the naive way: S forward passes of the whole network, one per sample (``sub(images, theta=t)``,
  what a parameter-loop predictive such as laplace-torch's does).

and reports ``predictive / forward`` (the issue's target: at most 3x with S = 32 when the
adapters are only in the decoder) and ``naive / predictive``.

The placements, as regular expressions over module names:

* ``decoder``: every layer of the DPT neck and head (the study's default);
* ``fusion3+head``: the last (finest) fusion block and the head;
* ``head``: the head's three convolutions;
* ``head.conv2+3``: the head's full-resolution convolutions;
* ``head.conv3``: the head's output convolution.

Run: python benchmarks/depth_predictive_time.py --device cuda [--bf16] [--size 266 350]
[--batch 8] [--samples 32] [--repeats 5]. Prints a markdown table; times are medians of
``--repeats`` calls after a warm-up. Absolute times count on the GPU only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

import torch

import bayes_colora as bc
from bayes_colora.depth import DECODER_TARGETS, DepthLikelihood, depth_anything, predict_depth
from bayes_colora.depth.experiment import ADAPTERS, median_seconds

PLACEMENTS: dict[str, str] = {
    "decoder": DECODER_TARGETS,
    "fusion3+head": r"^decoder\.(neck\.fusion_stage\.layers\.3\.|head\.)",
    "head": r"^decoder\.head\.",
    "head.conv2+3": r"^decoder\.head\.conv[23]$",
    "head.conv3": r"^decoder\.head\.conv3$",
}


def measure(placement: str, adapter: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = depth_anything(args.model_size, aleatoric=True).to(device)
    sub = bc.Subspace.from_model(model, ADAPTERS[adapter](PLACEMENTS[placement])).to(device)
    lik = DepthLikelihood(space="depth", heteroscedastic=True)
    theta = sub.theta.detach()
    post = bc.DiagGaussianPosterior(theta, torch.full_like(theta, 1e-3), likelihood=lik)
    images = torch.rand(args.batch, 3, *args.size, device=device)
    thetas = post.sample(args.samples)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        forward = median_seconds(lambda: sub(images), args.repeats, device)
        predictive = median_seconds(lambda: predict_depth(sub, post, images, args.samples, likelihood=lik),
                                    args.repeats, device)
        auto = median_seconds(lambda: predict_depth(sub, post, images, args.samples, likelihood=lik,
                                                    chunk_size="auto"), args.repeats, device)
        naive = median_seconds(lambda: [sub(images, theta=t) for t in thetas], args.repeats, device)
    return {"placement": placement, "adapter": adapter, "d": sub.dim, "forward_ms": 1e3 * forward,
            "predictive_ms": 1e3 * predictive, "auto_ms": 1e3 * auto, "naive_ms": 1e3 * naive,
            "ratio": predictive / forward, "auto_ratio": auto / forward, "naive_over_predictive":
            naive / min(predictive, auto)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-size", default="small", choices=["tiny", "small"])
    parser.add_argument("--size", nargs=2, type=int, default=(266, 350), metavar=("H", "W"),
                        help="image size, multiples of 14")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="run under bfloat16 autocast")
    parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    parser.add_argument("--adapters", nargs="+", default=["bitfit", "lora"], choices=list(ADAPTERS))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if any(s % 14 for s in args.size):
        parser.error(f"--size {args.size[0]} {args.size[1]}: Depth Anything needs multiples of 14 "
                     f"(e.g. 266 350)")
    print(f"Depth Anything {args.model_size}, batch {args.batch} of {args.size[0]}x{args.size[1]}, "
          f"S = {args.samples}, {'bf16 autocast' if args.bf16 else 'fp32'}, device {args.device}")
    print("| adapters on | adapter | d | forward (ms) | predictive (ms) | ratio | auto chunk (ms) | "
          "ratio | S forwards (ms) | S forwards / best predictive |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for placement in args.placements:
        for adapter in args.adapters:
            r = measure(placement, adapter, args)
            rows.append(r)
            print(f"| {placement} | {adapter} | {r['d']:,} | {r['forward_ms']:.2f} | {r['predictive_ms']:.1f} | "
                  f"{r['ratio']:.2f}x | {r['auto_ms']:.1f} | {r['auto_ratio']:.2f}x | {r['naive_ms']:.1f} | "
                  f"{r['naive_over_predictive']:.1f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
