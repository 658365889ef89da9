r"""Built-in procedural RGB-D scenes with exact depth (for the demo and the tests; no download).

Each scene is a room (floor, back wall, two side walls, ceiling) with a few boxes and spheres,
seen by a pinhole camera at the origin looking along +z with a random pitch and yaw. Rays are cast
analytically for every pixel: ``p(t) = t R (u, v, 1)`` with ``u = (j - c_x) / f``,
``v = (i - c_y) / f``, so the hit parameter ``t`` *is* the z-depth in the camera frame. Colour is
two-sided Lambertian shading of a per-surface albedo with procedural textures (checkerboard floor, stripes
on walls, noise on objects) plus a little sensor noise.

Returned tensors: images ``(N, 3, H, W)`` in [0, 1], depths ``(N, 1, H, W)`` in metres.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset


def _rotation(pitch: float, yaw: float) -> torch.Tensor:
    cp, sp, cy, sy = math.cos(pitch), math.sin(pitch), math.cos(yaw), math.sin(yaw)
    rx = torch.tensor([[1, 0, 0], [0, cp, -sp], [0, sp, cp]], dtype=torch.float32)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float32)
    return ry @ rx


def _plane_hits(dirs: torch.Tensor, normal: torch.Tensor, offset: float) -> torch.Tensor:
    """t where the ray meets ``normal . p = offset`` (inf where it does not, ahead of the camera)."""
    denom = dirs @ normal
    t = offset / denom.where(denom.abs() > 1e-6, torch.full_like(denom, 1e-6))
    return t.where(t > 1e-3, torch.full_like(t, math.inf))


def _sphere_hits(dirs: torch.Tensor, centre: torch.Tensor, radius: float) -> torch.Tensor:
    a = (dirs * dirs).sum(-1)
    b = -2 * dirs @ centre
    c = centre @ centre - radius ** 2
    disc = b * b - 4 * a * c
    t = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    return t.where((disc >= 0) & (t > 1e-3), torch.full_like(t, math.inf))


def _box_hits(dirs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab test: (t of entry, index 0..2 of the axis whose face was hit)."""
    inv = 1.0 / dirs.where(dirs.abs() > 1e-9, torch.full_like(dirs, 1e-9))
    t0, t1 = lo * inv, hi * inv
    t_near = torch.minimum(t0, t1)
    t_far = torch.maximum(t0, t1).min(-1).values
    t_enter, axis = t_near.max(-1)
    hit = (t_enter <= t_far) & (t_enter > 1e-3)
    return t_enter.where(hit, torch.full_like(t_enter, math.inf)), axis


def render_scene(height: int, width: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random scene: ``(image (3, H, W), depth (1, H, W))``."""
    def uniform(lo: float, hi: float, n: int = 1) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    focal = 0.9 * width
    i, j = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                          torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
    cam_dirs = torch.stack([(j - width / 2) / focal, (i - height / 2) / focal, torch.ones_like(i)], -1)
    rot = _rotation(float(uniform(-0.25, 0.1)), float(uniform(-0.35, 0.35)))
    dirs = (cam_dirs.reshape(-1, 3) @ rot.T)  # world directions, z-component of cam_dirs is 1

    # y axis points down (image rows), so the floor is at y = +floor_y
    floor_y, ceil_y = float(uniform(1.0, 1.6)), -float(uniform(1.2, 2.0))
    back_z, side_x = float(uniform(5.0, 9.0)), float(uniform(2.0, 3.5))
    surfaces = [  # (t, normal (P, 3), albedo (P, 3))
        ("floor", _plane_hits(dirs, torch.tensor([0.0, 1.0, 0.0]), floor_y), torch.tensor([0.0, -1.0, 0.0])),
        ("ceiling", _plane_hits(dirs, torch.tensor([0.0, 1.0, 0.0]), ceil_y), torch.tensor([0.0, 1.0, 0.0])),
        ("back", _plane_hits(dirs, torch.tensor([0.0, 0.0, 1.0]), back_z), torch.tensor([0.0, 0.0, -1.0])),
        ("left", _plane_hits(dirs, torch.tensor([1.0, 0.0, 0.0]), -side_x), torch.tensor([1.0, 0.0, 0.0])),
        ("right", _plane_hits(dirs, torch.tensor([1.0, 0.0, 0.0]), side_x), torch.tensor([-1.0, 0.0, 0.0])),
    ]
    n_pix = dirs.shape[0]
    best_t = torch.full((n_pix,), math.inf)
    normal = torch.zeros(n_pix, 3)
    albedo = torch.zeros(n_pix, 3)
    base_colours = torch.rand(5, 3, generator=generator) * 0.5 + 0.35

    def take(t: torch.Tensor, n: torch.Tensor, colour: torch.Tensor) -> None:
        closer = t < best_t
        best_t[closer] = t[closer]
        normal[closer] = n.expand(n_pix, 3)[closer] if n.dim() == 1 else n[closer]
        albedo[closer] = colour.expand(n_pix, 3)[closer] if colour.dim() == 1 else colour[closer]

    for k, (name, t, n) in enumerate(surfaces):
        p = dirs * t.clamp_max(1e3).unsqueeze(-1)
        if name == "floor":
            pattern = ((p[:, 0] // 0.5 + p[:, 2] // 0.5) % 2).unsqueeze(-1)
        else:
            pattern = ((p[:, 1] // 0.3) % 2).unsqueeze(-1) * 0.5 + 0.5
        take(t, n, base_colours[k] * (0.6 + 0.4 * pattern))

    for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):  # boxes on the floor
        size = uniform(0.4, 1.2, 3)
        centre = torch.cat([uniform(-side_x + 0.6, side_x - 0.6), torch.tensor([floor_y]) - size[1] / 2,
                            uniform(2.0, back_z - 1.0)])
        t, axis = _box_hits(dirs, centre - size / 2, centre + size / 2)
        n = torch.nn.functional.one_hot(axis, 3).float() * -torch.sign(dirs.gather(1, axis[:, None]))
        take(t, n, torch.rand(3, generator=generator) * 0.7 + 0.2)

    for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):  # spheres
        radius = float(uniform(0.3, 0.7))
        centre = torch.cat([uniform(-side_x + 0.8, side_x - 0.8), torch.tensor([floor_y - radius]),
                            uniform(2.0, back_z - 1.0)])
        t = _sphere_hits(dirs, centre, radius)
        n = torch.nn.functional.normalize(dirs * t.clamp_max(1e3).unsqueeze(-1) - centre, dim=-1)
        take(t, n, torch.rand(3, generator=generator) * 0.7 + 0.2)

    depth_along_ray = best_t.clamp_max(50.0)
    light = torch.nn.functional.normalize(torch.cat([uniform(-0.5, 0.5), uniform(-1.0, -0.5),
                                                     uniform(-0.8, -0.3)]), dim=0)
    shade = 0.6 + 0.6 * (normal @ -light).abs().unsqueeze(-1)
    falloff = (1.0 / (1.0 + 0.02 * depth_along_ray ** 2)).unsqueeze(-1) * 0.4 + 0.6
    colour = albedo * shade * falloff + 0.02 * torch.randn(n_pix, 3, generator=generator)
    image = colour.clamp(0, 1).reshape(height, width, 3).permute(2, 0, 1)
    # z-depth in the camera frame: the camera-frame ray has z = 1, so t is already the z-depth
    depth = depth_along_ray.reshape(1, height, width)
    return image, depth


def procedural_scenes(n: int, height: int = 96, width: int = 128, seed: int = 0) -> TensorDataset:
    """``n`` random scenes as a ``TensorDataset`` of images ``(n, 3, H, W)`` and depths
    ``(n, 1, H, W)`` in metres; the same ``seed`` gives the same scenes."""
    if n < 1 or height < 8 or width < 8:
        raise ValueError(f"need n >= 1 scenes of at least 8x8 pixels, got n={n}, {height}x{width}")
    generator = torch.Generator().manual_seed(seed)
    images, depths = zip(*(render_scene(height, width, generator) for _ in range(n)))
    return TensorDataset(torch.stack(images), torch.stack(depths))


def shifted_scenes(n: int, height: int = 96, width: int = 128, seed: int = 1,
                   depth_scale: float = 1.5, gamma: float = 0.6, tint: tuple[float, float, float] = (1.0, 0.85, 0.7)
                   ) -> TensorDataset:
    r"""A *target domain* for adaptation: :func:`procedural_scenes` seen by another camera.

    Depths are scaled, ``y' = depth_scale * y`` (larger rooms, the same images would be
    ambiguous otherwise: the scale is a property of the whole domain), and colours change as
    ``x' = tint * x ** gamma`` (another sensor's response). Shapes as :func:`procedural_scenes`.
    """
    if depth_scale <= 0 or gamma <= 0:
        raise ValueError(f"depth_scale and gamma must be positive, got {depth_scale}, {gamma}")
    images, depths = procedural_scenes(n, height, width, seed).tensors
    images = (torch.tensor(tint).view(1, 3, 1, 1) * images.clamp_min(0) ** gamma).clamp(0, 1)
    return TensorDataset(images, depths * depth_scale)
