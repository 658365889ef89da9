r"""Restoration data: PolyU real noisy / clean pairs, clean-image folders, procedural images, and
random-crop datasets over them.

Images are float32 tensors ``(3, H, W)`` with values in ``[0, 1]``; grey images are repeated to
three channels. The PolyU folder holds ``NAME_real.JPG`` (noisy) and ``NAME_mean.JPG`` (clean
reference) files; :func:`polyu_pairs` pairs them by ``NAME``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """One image file as ``(3, H, W)`` float32 in ``[0, 1]`` (grey repeated, alpha dropped)."""
    from torchvision.io import ImageReadMode, decode_image

    img = decode_image(str(path), mode=ImageReadMode.RGB)
    return img.float() / 255.0


def _folder(folder: str | os.PathLike, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist; pass the folder that holds "
                                f"the images (e.g. ../shared/data/restoration/{what})")
    return folder


def polyu_pairs(folder: str | os.PathLike, limit: int | None = None
                ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, noisy, clean)`` for every ``NAME_real.*`` with a matching ``NAME_mean.*`` in
    ``folder``, sorted by name; at most ``limit`` pairs."""
    folder = _folder(folder, "polyu")
    noisy = sorted(p for p in folder.iterdir() if p.stem.endswith("_real")
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    pairs = []
    for p in noisy[:limit]:
        name = p.stem[: -len("_real")]
        clean = p.with_name(f"{name}_mean{p.suffix}")
        if not clean.exists():
            raise FileNotFoundError(f"{p.name} has no clean reference {clean.name} in {folder}")
        a, b = load_image(p), load_image(clean)
        if a.shape != b.shape:
            raise ValueError(f"{name}: noisy shape {tuple(a.shape)} differs from clean shape {tuple(b.shape)}")
        pairs.append((name, a, b))
    if not pairs:
        raise FileNotFoundError(f"no NAME_real.JPG / NAME_mean.JPG pairs in {folder}")
    return pairs


def clean_images(folder: str | os.PathLike, limit: int | None = None,
                 min_size: int = 0) -> list[torch.Tensor]:
    """Every image under ``folder`` (recursively, sorted by path), at most ``limit``, skipping
    images smaller than ``min_size`` on either side."""
    folder = _folder(folder, "clean")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    images = [im for im in (load_image(p) for p in paths[:limit]) if min(im.shape[-2:]) >= min_size]
    if not images:
        raise FileNotFoundError(f"no image (png/jpg/bmp) of at least {min_size} pixels under {folder}")
    return images


def procedural_images(n: int, size: int = 64, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    r"""``n`` synthetic clean images ``(n, 3, size, size)`` in ``[0, 1]``: a smooth colour field
    (bilinearly upsampled 4x4 noise) with random rectangles, discs and sinusoidal stripes on top,
    so they hold flat regions, sharp edges and texture."""
    g = generator
    img = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic",
                        align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    for i in range(n):
        for _ in range(int(torch.randint(2, 6, (), generator=g))):
            colour = torch.rand(3, 1, 1, generator=g)
            cx, cy, r = torch.rand(3, generator=g).tolist()
            kind = int(torch.randint(3, (), generator=g))
            if kind == 0:
                mask = ((xx - cx).abs() < 0.1 + 0.3 * r) & ((yy - cy).abs() < 0.05 + 0.2 * cx)
            elif kind == 1:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < (0.05 + 0.25 * r) ** 2
            else:
                freq, angle = 5 + 20 * r, math.pi * cx
                wave = torch.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
                mask = (wave > 0) & ((yy - cy).abs() < 0.3)
            img[i] = torch.where(mask, colour.expand(3, size, size), img[i])
    return img.clamp(0, 1)


def random_crop(images: Sequence[torch.Tensor], size: int, generator: torch.Generator,
                flip: bool = True) -> list[torch.Tensor]:
    """The same random ``size x size`` crop (and, with ``flip``, the same random flips) of each
    image in ``images`` (all of one shape ``(C, H, W)``)."""
    h, w = images[0].shape[-2:]
    if h < size or w < size:
        raise ValueError(f"crop size {size} exceeds the image size {(h, w)}; use a smaller crop")
    top = int(torch.randint(h - size + 1, (), generator=generator))
    left = int(torch.randint(w - size + 1, (), generator=generator))
    out = [im[..., top:top + size, left:left + size] for im in images]
    if flip:
        if torch.rand((), generator=generator) < 0.5:
            out = [o.flip(-1) for o in out]
        if torch.rand((), generator=generator) < 0.5:
            out = [o.flip(-2) for o in out]
    return out


class PairCrops(Dataset):
    """Random aligned crops of ``(noisy, clean)`` pairs: item ``i`` is a crop of pair
    ``i % len(pairs)``, ``crops_per_pair`` items per pair, drawn from a generator seeded with
    ``seed`` (so an epoch with ``shuffle=False`` and ``num_workers=0`` is reproducible).
    Yields ``(noisy, clean)`` of shape ``(3, crop, crop)`` each."""

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], crop: int,
                 crops_per_pair: int = 1, seed: int = 0, flip: bool = True):
        if not pairs:
            raise ValueError("PairCrops needs at least one (noisy, clean) pair")
        self.pairs, self.crop, self.per, self.flip = list(pairs), crop, crops_per_pair, flip
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.pairs) * self.per

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noisy, clean = self.pairs[i % len(self.pairs)]
        a, b = random_crop([noisy, clean], self.crop, self.generator, self.flip)
        return a.contiguous(), b.contiguous()


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size x size`` window of ``(..., H, W)`` (the whole side when smaller)."""
    h, w = image.shape[-2:]
    sh, sw = min(size, h), min(size, w)
    top, left = (h - sh) // 2, (w - sw) // 2
    return image[..., top:top + sh, left:left + sw]


def pack(source: str | os.PathLike, dest: str | os.PathLike, clean_sets: Sequence[str] = ("CBSD68",),
         clean_crop: int = 256) -> dict[str, int]:
    """Copy what the study needs into ``dest`` (for a GPU machine without ``../shared``):
    ``polyu/`` unchanged and, for each of ``clean_sets``, the central ``clean_crop`` square of
    every image as PNG under ``clean/<set>/``. Returns the bytes written per folder."""
    import shutil

    from torchvision.io import write_png

    from ..subspace import _atomic_write

    source, dest = Path(source), Path(dest)
    sizes = {"polyu": 0, "clean": 0}
    for p in sorted(_folder(source / "polyu", "polyu").iterdir()):
        target = dest / "polyu" / p.name
        _atomic_write(target, lambda tmp, p=p: shutil.copyfile(p, tmp))
        sizes["polyu"] += target.stat().st_size
    for name in clean_sets:
        for p in sorted(_folder(source / "clean" / name, "clean").iterdir()):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            crop = (center_crop(load_image(p), clean_crop) * 255).round().to(torch.uint8)
            target = dest / "clean" / name / (p.stem + ".png")
            _atomic_write(target, lambda tmp, crop=crop: write_png(crop, tmp))
            sizes["clean"] += target.stat().st_size
    return sizes
