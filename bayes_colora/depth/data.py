"""Real RGB-D data: the Microsoft 7-Scenes frame layout and the NYU Depth v2 labelled ``.mat``.

Both give ``(image (3, H, W) float in [0, 1], depth (1, H, W) metres)`` pairs, depth 0 where the
sensor gave none (a likelihood masks those pixels). Images are resized bilinearly and depths by
nearest neighbour (averaging would invent depths across edges and holes).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


def _resize_pair(image: torch.Tensor, depth: torch.Tensor, size: tuple[int, int] | None,
                 crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop ``crop`` pixels from every border (sensor edges), then resize to ``size`` (H, W)."""
    if crop:
        image, depth = image[:, crop:-crop, crop:-crop], depth[:, crop:-crop, crop:-crop]
    if size is not None and tuple(image.shape[-2:]) != tuple(size):
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                              antialias=True)[0]
        depth = F.interpolate(depth[None], size=size, mode="nearest")[0]
    return image.clamp(0, 1), depth


class SevenScenes(Dataset):
    """Frames of one 7-Scenes sequence folder: ``frame-NNNNNN.color.jpg`` (RGB) and
    ``frame-NNNNNN.depth.png`` (uint16 millimetres, 0 or 65535 = missing).

    Args:
        root: the folder holding the frames (and ``camera-intrinsics.txt``).
        frames: frame numbers to use (e.g. ``range(600)``); default all found.
        size: output ``(H, W)``; ``None`` keeps 480x640 (after ``crop``).
        crop: pixels cut from each border before resizing.
        cache: keep decoded frames in memory after the first read.
    """

    def __init__(self, root: str | os.PathLike, frames: Iterable[int] | None = None,
                 size: tuple[int, int] | None = (240, 320), crop: int = 0, cache: bool = True):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"7-Scenes folder {self.root} does not exist")
        found = sorted(int(f[6:12]) for f in os.listdir(self.root)
                       if f.startswith("frame-") and f.endswith(".color.jpg"))
        if not found:
            raise FileNotFoundError(f"no frame-NNNNNN.color.jpg files in {self.root}")
        if frames is None:
            self.frames = found
        else:
            self.frames = list(frames)
            missing = sorted(set(self.frames) - set(found))
            if missing:
                raise FileNotFoundError(f"{self.root} lacks frames {missing[:5]}"
                                        f"{' ...' if len(missing) > 5 else ''} (it has {found[0]}..{found[-1]})")
        self.size, self.crop, self.cache = size, crop, cache
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def intrinsics(self) -> torch.Tensor:
        """The 3x3 camera matrix K of the depth camera (``camera-intrinsics.txt``)."""
        return torch.from_numpy(np.loadtxt(os.path.join(self.root, "camera-intrinsics.txt"))).float()

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index in self._cache:
            return self._cache[index]
        from PIL import Image

        stem = os.path.join(self.root, f"frame-{self.frames[index]:06d}")
        image = torch.from_numpy(np.array(Image.open(stem + ".color.jpg").convert("RGB"))).permute(2, 0, 1)
        raw = np.asarray(Image.open(stem + ".depth.png")).astype(np.float32)
        raw[raw >= 65535] = 0.0
        depth = torch.from_numpy(raw / 1000.0)[None]
        pair = _resize_pair(image.float() / 255.0, depth, self.size, self.crop)
        if self.cache:
            self._cache[index] = pair
        return pair


class NYUDepthV2(Dataset):
    """The NYU Depth v2 labelled set, ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5).

    The file stores ``images`` as ``(N, 3, W, H)`` uint8 and ``depths`` as ``(N, W, H)`` float
    metres (MATLAB's column-major order seen from HDF5); both are transposed to ``(C, H, W)``.

    Args:
        path: the ``.mat`` file.
        indices: which of the N examples (default all).
        size, crop: as for :class:`SevenScenes`.
    """

    def __init__(self, path: str | os.PathLike, indices: Sequence[int] | None = None,
                 size: tuple[int, int] | None = (240, 320), crop: int = 0):
        import h5py

        self.path = os.fspath(path)
        with h5py.File(self.path, "r") as f:
            for key in ("images", "depths"):
                if key not in f:
                    raise KeyError(f"{self.path} has no '{key}' dataset (keys: {list(f)}); "
                                   f"expected the NYU Depth v2 labelled .mat layout")
            n = f["images"].shape[0]
        self.indices = list(range(n)) if indices is None else list(indices)
        if self.indices and (min(self.indices) < 0 or max(self.indices) >= n):
            raise IndexError(f"{self.path} holds {n} examples; indices must lie in [0, {n})")
        self.size, self.crop = size, crop
        self._file = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r")
        k = self.indices[index]
        image = torch.from_numpy(np.asarray(self._file["images"][k])).permute(0, 2, 1).float() / 255.0
        depth = torch.from_numpy(np.asarray(self._file["depths"][k], dtype=np.float32)).T[None]
        return _resize_pair(image, depth.contiguous(), self.size, self.crop)
