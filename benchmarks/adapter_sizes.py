"""Parameter count d of each adapter kind on timm resnet50 and a ViT-B/16-sized transformers model.

Run: .venv/bin/python benchmarks/adapter_sizes.py    (prints the markdown table of docs/adapters.md)
Models are built with random weights (counts do not depend on the weights).
"""
from __future__ import annotations

import timm
import torch
from transformers import ViTConfig, ViTForImageClassification

import bayes_colora as bc

SPECS = {
    "LoRA r=8, every Linear/Conv": lambda: bc.LoRA(rank=8),
    "LoRA r=8, attention q_proj+v_proj": lambda: bc.LoRA(rank=8, targets=r"attention\.(q_proj|v_proj)$"),
    "BitFit": lambda: bc.BitFit(),
    "DiffFit": lambda: bc.DiffFit(),
}


def models() -> dict[str, callable]:
    return {
        "timm resnet50": lambda: timm.create_model("resnet50", pretrained=False),
        "ViT-B/16 (transformers)": lambda: ViTForImageClassification(ViTConfig()),  # defaults = ViT-B/16
    }


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for model_name, build in models().items():
        n_base = sum(p.numel() for p in build().parameters())
        for spec_name, spec in SPECS.items():
            try:
                sub = bc.Subspace.from_model(build(), spec())
            except ValueError:  # the pattern names attention layers, which a CNN does not have
                rows.append((model_name, spec_name, "n/a", "no such layers"))
                continue
            rows.append((model_name, spec_name, f"{sub.dim:,}", f"{100 * sub.dim / n_base:.2f}% of {n_base:,}"))
    print("| model | adapter | d | share of base parameters |")
    print("| --- | --- | ---: | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
