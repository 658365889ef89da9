r"""MedMNIST data: the ``.npz`` layout, image preparation for ImageNet backbones, a synthetic set.

A MedMNIST v2 file (``octmnist.npz``, ``pneumoniamnist.npz``, ...) holds, for each split
``s`` in ``train``, ``val``, ``test``, the arrays ``s_images`` (``(N, H, W)`` grey or
``(N, H, W, 3)`` colour, uint8) and ``s_labels`` (``(N, 1)`` integer class indices). A file may
hold only some of the splits.

:func:`load_medmnist` returns one split as float images ``(N, C, H, W)`` in [0, 1] and labels
``(N,)``; :func:`prepare_images` turns any such batch into what an ImageNet backbone eats:
grey repeated to 3 channels and resized bilinearly to ``size x size``.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")


def load_medmnist(path: str | os.PathLike, split: str, size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of a MedMNIST ``.npz`` file.

    Args:
        path: the ``.npz`` file (e.g. ``octmnist.npz``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: ``None`` keeps the stored resolution and channels; an int gives
            :func:`prepare_images` output (3 channels, ``size x size``).

    Returns:
        ``images`` float32 ``(N, C, H, W)`` in [0, 1] (``C`` = 1 grey, 3 colour, or 3 with
        ``size``) and ``labels`` int64 ``(N,)``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; MedMNIST files have {', '.join(SPLITS)}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MedMNIST file {path} does not exist; download e.g. octmnist.npz "
                                f"from the MedMNIST v2 release and pass its path")
    with np.load(path) as data:
        keys = set(data.files)
        want = (f"{split}_images", f"{split}_labels")
        if not set(want) <= keys:
            have = sorted({k.rsplit("_", 1)[0] for k in keys if k.endswith(("_images", "_labels"))})
            raise KeyError(f"{path} has no {split} split (arrays {want[0]}, {want[1]}); "
                           f"splits present: {', '.join(have) or 'none'}")
        images, labels = data[want[0]], data[want[1]]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(f"{path}: {want[0]} has shape {images.shape}, expected (N, H, W) or (N, H, W, 3)")
    if labels.shape not in ((len(images), 1), (len(images),)):
        raise ValueError(f"{path}: {want[1]} has shape {labels.shape}, expected ({len(images)}, 1) "
                         f"to match {want[0]} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels.reshape(-1).astype(np.int64))
    return (x if size is None else prepare_images(x, size)), y


def prepare_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, 1 or 3, h, w)`` -> ``(B, 3, size, size)``: grey repeated to RGB, bilinear resize
    (antialiased when shrinking); values keep their range."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (B, 1, H, W) or (B, 3, H, W), got {got}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if tuple(images.shape[-2:]) == (size, size):
        return images
    shrink = size < min(images.shape[-2:])
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def synthetic_medmnist(path: str | os.PathLike, n_train: int = 512, n_val: int = 256,
                       size: int = 28, seed: int = 0) -> None:
    r"""Write a built-in two-class set in the MedMNIST ``.npz`` layout (for ``--quick`` runs and tests).

    Each image is a grey grating ``0.5 + 0.25 cos(2 pi f (x cos a + y sin a) + phi)`` plus
    Gaussian noise (sd 0.25), clipped to [0, 1] and stored as uint8. Class 0 has orientation
    ``a ~ U(-50, 50)`` degrees, class 1 ``a ~ U(40, 140)`` degrees: the two overlap on 10 % of the
    angle range each, so no classifier is perfect. Frequency ``f ~ U(2, 5)`` cycles per image,
    phase ``phi ~ U(0, 2 pi)``. Classes alternate, so each split is balanced.
    """
    rng = np.random.default_rng(seed)
    grid = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 2
        angle = np.deg2rad(np.where(labels == 0, rng.uniform(-50, 50, n), rng.uniform(40, 140, n)))
        freq, phase = rng.uniform(2, 5, n), rng.uniform(0, 2 * math.pi, n)
        proj = xx[None] * np.cos(angle)[:, None, None] + yy[None] * np.sin(angle)[:, None, None]
        img = 0.5 + 0.25 * np.cos(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
        img = np.clip(img + 0.25 * rng.standard_normal(img.shape), 0, 1)
        return np.round(img * 255).astype(np.uint8), labels[:, None].astype(np.int64)

    train_images, train_labels = split(n_train)
    val_images, val_labels = split(n_val)
    from ..subspace import _atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, train_images=train_images, train_labels=train_labels,
                                val_images=val_images, val_labels=val_labels)

    _atomic_write(path, write)
