"""Shared tiny models for the tests: each builder returns ``(model, x)`` with a fresh, randomly
initialised model (fixed seed, no download) in eval mode and an input batch for it.

``MODEL_CASES`` maps a name to ``(builder, specs)``, where ``specs`` maps an adapter label to a
function returning the adapter spec(s) to attach, chosen so that every kind touches layers the
output depends on.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import bayes_colora as bc

logging.getLogger("transformers").setLevel(logging.ERROR)


def mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    return model.eval(), torch.randn(5, 4)


def resnet() -> tuple[nn.Module, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    for m in model.modules():  # non-trivial BatchNorm statistics, as in a trained network
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)  # timm zero-initialises the last BN of a block
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval(), torch.randn(2, 3, 32, 32)


def bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def vit() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                    image_size=16, patch_size=8, num_labels=3)
    return ViTForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}


def gpt2() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), {"input_ids": torch.randint(0, 50, (2, 6))}


def depth_anything() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Depth Anything with a 2-layer Dinov2 backbone (hidden 16) and a 2-stage DPT neck
    (its reassemble stage has a Conv2d projection and a ConvTranspose2d resize)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, image_size=28, patch_size=14, out_indices=[1, 2],
                            reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16,
                              neck_hidden_sizes=[8, 16], reassemble_factors=[2, 1],
                              fusion_hidden_size=8, head_hidden_size=4, patch_size=14)
    model = DepthAnythingForDepthEstimation(cfg).eval()
    with torch.no_grad():  # like a trained network: no zero biases, layer scales of order 1
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
            elif "layer_scale" in name:
                p.fill_(1.0)
        for m in model.modules():  # He-scaled kernels so the DPT neck passes signal through
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5)
        model.head.conv3.bias.fill_(1.0)  # keep the final ReLU mostly active
    return model, {"pixel_values": torch.randn(2, 3, 28, 28)}


MODEL_CASES = {
    "mlp": (mlp, {
        "lora": lambda: bc.LoRA(rank=2),
        "bitfit": lambda: bc.BitFit(),
        "difffit": lambda: bc.DiffFit(),
        "stacked": lambda: [bc.BitFit(), bc.LoRA(rank=2, targets=r"^3$"), bc.DiffFit(targets=r"^1$")],
    }),
    "resnet18": (resnet, {
        "lora": lambda: bc.LoRA(rank=2, targets=r"layer4\.1", types=(nn.Conv2d,)),
        "bitfit": lambda: bc.BitFit(targets=r"layer4|fc"),
        "difffit": lambda: bc.DiffFit(targets=r"layer4\.1\.(conv|bn)"),
        "stacked": lambda: [bc.BitFit(targets=r"layer4"), bc.LoRA(rank=2, targets=r"fc|layer4\.1\.conv2")],
    }),
    "bert": (bert, {
        "lora": lambda: bc.LoRA(rank=2, targets=r"attention\.self\.(query|value)"),
        "bitfit": lambda: bc.BitFit(targets=r"encoder"),
        "difffit": lambda: bc.DiffFit(targets=r"LayerNorm"),
        "stacked": lambda: [bc.BitFit(), bc.LoRA(rank=2, targets=r"classifier|value")],
    }),
    "vit": (vit, {
        "lora": lambda: bc.LoRA(rank=2, targets=r"attention\.(q_proj|v_proj)"),
        "bitfit": lambda: bc.BitFit(targets=r"layers\.1"),
        "difffit": lambda: bc.DiffFit(targets=r"layernorm|fc2"),
        "stacked": lambda: [bc.BitFit(targets=r"layers"), bc.LoRA(rank=2, targets=r"classifier|fc1")],
    }),
    "gpt2": (gpt2, {
        "lora": lambda: bc.LoRA(rank=2, targets=r"c_attn|c_proj"),
        "bitfit": lambda: bc.BitFit(targets=r"c_attn|ln_f"),
        "difffit": lambda: bc.DiffFit(targets=r"c_fc|ln_2"),
        "stacked": lambda: [bc.BitFit(targets=r"c_fc"), bc.LoRA(rank=2, targets=r"c_fc|c_attn")],
    }),
    "depth_anything": (depth_anything, {
        "lora": lambda: bc.LoRA(rank=2, targets=[r"attention\.(q_proj|v_proj)", r"neck|head"]),
        "bitfit": lambda: bc.BitFit(targets=r"neck|head"),
        "difffit": lambda: bc.DiffFit(targets=r"neck\.(reassemble|convs)|head\.conv1"),
        "stacked": lambda: [bc.BitFit(targets=r"neck"), bc.LoRA(rank=2, targets=r"reassemble_stage|head")],
    }),
}


@pytest.fixture
def tiny_mlp() -> tuple[nn.Module, torch.Tensor]:
    return mlp()


def linear_in_theta(p: int) -> bc.Subspace:
    """A subspace whose output is linear in theta: ``f(x; g) = 1^T x + x^T g`` for ``x`` in R^p.

    DiffFit on an identity ``Linear(p, p)`` without bias gives ``(1 + g) * x``; a fixed
    ``Linear(p, 1)`` of ones sums it. So the Jacobian of ``f`` in theta is ``x`` itself.
    """
    first, second = nn.Linear(p, p, bias=False), nn.Linear(p, 1, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.eye(p))
        second.weight.fill_(1.0)
    return bc.Subspace.from_model(nn.Sequential(first, second), bc.DiffFit(targets=r"^0$"))
