"""``sub(x, theta=T)`` with T of shape (S, d): one vectorised call versus two Python loops over S.

The paths, all under ``torch.no_grad`` as in ``bc.predict``:

* vectorised: ``sub(x, theta=T)``, one ``vmap``-ed functional call;
* auto: ``sub(x, theta=T, chunk_size="auto")``, timed after its first call has measured and
  remembered the fastest chunking (all at once, or 16, 8, 4 samples a call);
* functional loop: ``sub(x, theta=t)`` for each row ``t``;
* parameter loop: write ``t`` into the model's parameters, then a plain forward (what
  laplace-torch's sampling predictive does with ``vector_to_parameters``).

The last two cases adapt only the top of a network (the text and depth studies' placement): the
frozen layers below the first adapter see no batched tensor, so ``vmap`` runs them once for all S
samples, while both loops run the whole network S times.

Run: .venv/bin/python benchmarks/vmap_vs_loop.py [--samples 32] [--repeats 5] [--device cpu]
Prints a markdown table (the fastest wall time of ``--repeats`` calls of each path, after a
warm-up, and the ratios, measured in one run). The fastest, as ``timeit`` advises, because on a
shared CPU single calls of the same work were seen to take 8 to 80 ms: the minimum is the least
disturbed measurement.
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

import bayes_colora as bc


def cases(device: str) -> dict[str, tuple[bc.Subspace, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))
    # eager attention: torch has no vmap batching rule for the CPU flash-attention kernel
    vit = ViTForImageClassification(ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                                              intermediate_size=768, image_size=64, patch_size=8, num_labels=10,
                                              attn_implementation="eager"))
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    top_resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    deep_vit = ViTForImageClassification(ViTConfig(hidden_size=192, num_hidden_layers=8, num_attention_heads=3,
                                                   intermediate_size=768, image_size=64, patch_size=8,
                                                   num_labels=10, attn_implementation="eager"))
    small = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(8, 1, 3, padding=1))  # the dense-output model of the Laplace benchmark
    return {
        "MLP 16-64-1, LoRA r=2, batch 8": (
            bc.Subspace.from_model(small, bc.LoRA(rank=2)), torch.randn(8, 16)),
        "MLP 16-256-256-1, LoRA r=4, batch 256": (
            bc.Subspace.from_model(mlp, bc.LoRA(rank=4)), torch.randn(256, 16)),
        "ViT (4 layers, 192 wide), LoRA r=4 on q/v, batch 8 of 64x64": (
            bc.Subspace.from_model(vit, bc.LoRA(rank=4, targets=r"attention\.(q_proj|v_proj)$")),
            torch.randn(8, 3, 64, 64)),
        "conv 1-8-8-1 (32x32 outputs), LoRA r=4, batch 8": (
            bc.Subspace.from_model(conv, bc.LoRA(rank=4)), torch.randn(8, 1, 32, 32)),
        "resnet18, BitFit, batch 8 of 64x64": (
            bc.Subspace.from_model(resnet, bc.BitFit()), torch.randn(8, 3, 64, 64)),
        "ViT (8 layers), LoRA r=4 on q/v of the top 2 layers, batch 8 of 64x64": (
            bc.Subspace.from_model(deep_vit, bc.LoRA(rank=4, targets=r"layers\.[67]\.attention\.(q_proj|v_proj)$")),
            torch.randn(8, 3, 64, 64)),
        "resnet18, BitFit on layer4 + fc, batch 8 of 64x64": (
            bc.Subspace.from_model(top_resnet, bc.BitFit(targets=r"^(layer4\.|fc$)")), torch.randn(8, 3, 64, 64)),
    }


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"S = {args.samples}, device = {args.device}, torch threads = {torch.get_num_threads()}")
    print("| model | d | vectorised (s) | auto (s), chunk | functional loop (s) | parameter loop (s) | "
          "functional loop / vectorised | parameter loop / vectorised | parameter loop / auto | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (sub, x) in cases(args.device).items():
        sub, x = sub.to(args.device), x.to(args.device)
        theta0 = sub.theta
        thetas = theta0 + 0.01 * torch.randn(args.samples, sub.dim, device=args.device)

        def parameter_loop() -> torch.Tensor:
            outs = []
            for t in thetas:
                sub.theta = t
                outs.append(sub(x))
            sub.theta = theta0
            return torch.stack(outs)

        with torch.no_grad():
            vec = timed(lambda: sub(x, theta=thetas), args.repeats, sync)
            auto = timed(lambda: sub(x, theta=thetas, chunk_size="auto"), args.repeats, sync)
            chunk = next(iter(sub._chunk_choice.values()))
            loop = timed(lambda: torch.stack([sub(x, theta=t) for t in thetas]), args.repeats, sync)
            plain = timed(parameter_loop, args.repeats, sync)
            diff = (sub(x, theta=thetas) - parameter_loop()).abs().max().item()
        print(f"| {name} | {sub.dim:,} | {vec:.4f} | {auto:.4f}, {chunk or 'all'} | {loop:.4f} | {plain:.4f} | "
              f"{loop / vec:.2f}x | {plain / vec:.2f}x | {plain / auto:.2f}x | {diff:.1e} |")

if __name__ == "__main__":
    main()
