r"""PDE trajectories: the HDF5 layout of ``../shared/data/README.md``, splits by the physics
parameter, and flattening into snapshots for training.

One HDF5 file holds one trajectory at one physics parameter ``mu``: dataset ``u`` of shape
``(Q, T, N1[, N2])`` whose dimension scales (``q``, ``t``, ``x0``[, ``x1``]) are datasets of the
same file, and attributes ``mu``, ``equation``, ``input_dim``, ``output_dim``.

In memory a :class:`Trajectory` stores ``u`` as ``(T, *grid, Q)`` (fields last, the layout the
networks produce) plus the axes ``t`` ``(T,)`` and ``axes`` (one ``(N_k,)`` tensor per spatial
dimension).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..subspace import _atomic_write


@dataclass
class Trajectory:
    """One solution ``u(t, x; mu)`` on a tensor grid: ``u`` ``(T, *grid, Q)``, ``t`` ``(T,)``,
    ``axes`` one ``(N_k,)`` tensor per spatial dimension."""

    u: torch.Tensor
    t: torch.Tensor
    axes: list[torch.Tensor]
    mu: float
    equation: str = ""
    attrs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        want = (self.t.numel(), *(a.numel() for a in self.axes))
        if tuple(self.u.shape[:-1]) != want:
            raise ValueError(f"u has shape {tuple(self.u.shape)}, expected (T, *grid, Q) with "
                             f"(T, *grid) = {want} from the time and space axes")

    @property
    def points(self) -> torch.Tensor:
        """The grid points, ``(N, D)`` with ``N = prod(grid)``, in the order of ``u``'s grid."""
        mesh = torch.meshgrid(*self.axes, indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], -1)

    @property
    def flat(self) -> torch.Tensor:
        """``u`` as ``(T, N, Q)``."""
        return self.u.reshape(self.u.shape[0], -1, self.u.shape[-1])

    def subsample(self, space: int = 1, time: int = 1) -> "Trajectory":
        """Every ``space``-th grid point along each axis and every ``time``-th snapshot."""
        idx = (slice(None, None, time),) + (slice(None, None, space),) * len(self.axes)
        return Trajectory(self.u[idx].contiguous(), self.t[::time].clone(),
                          [a[::space].clone() for a in self.axes], self.mu, self.equation, dict(self.attrs))


def load_trajectory(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Trajectory:
    """Read one HDF5 file of the layout above."""
    import h5py

    with h5py.File(path, "r") as f:
        if "u" not in f:
            raise ValueError(f"{path} has no dataset 'u' (keys: {list(f)}); expected the PDE layout "
                             f"of data/README.md")
        u = f["u"]
        labels = [d.label for d in u.dims]
        if not labels or labels[:2] != ["q", "t"] or len(labels) != u.ndim:
            raise ValueError(f"{path}: u has dimension labels {labels}, expected ['q', 't', 'x0', ...]")
        scales = [torch.as_tensor(f[name][()], dtype=torch.float64) for name in labels[1:]]
        data = torch.as_tensor(u[()]).to(dtype)
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    if "mu" not in attrs:
        raise ValueError(f"{path} has no attribute 'mu' (the physics parameter)")
    equation = attrs.get("equation", "")
    equation = equation.decode() if isinstance(equation, bytes) else str(equation)
    return Trajectory(data.movedim(0, -1).contiguous(), scales[0].to(dtype),
                      [s.to(dtype) for s in scales[1:]], float(attrs["mu"]), equation, attrs)


def save_trajectory(path: str | os.PathLike, traj: Trajectory) -> None:
    """Write ``traj`` in the HDF5 layout above, atomically."""
    import h5py

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("u", data=traj.u.movedim(-1, 0).cpu().numpy())
            names = ["q", "t"] + [f"x{i}" for i in range(len(traj.axes))]
            scales = [torch.arange(traj.u.shape[-1]), traj.t] + list(traj.axes)
            for i, (name, scale) in enumerate(zip(names, scales)):
                f[name] = scale.cpu().numpy()
                f[name].make_scale(name)
                f["u"].dims[i].attach_scale(f[name])
                f["u"].dims[i].label = name
            f.attrs["mu"] = traj.mu
            f.attrs["equation"] = traj.equation
            f.attrs["input_dim"] = len(traj.axes)
            f.attrs["output_dim"] = traj.u.shape[-1]

    _atomic_write(path, write)


def load_folder(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> list[Trajectory]:
    """Every ``*.hdf5`` / ``*.h5`` file of ``folder``, sorted by ``mu``."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".hdf5", ".h5"))
    if not files:
        raise FileNotFoundError(f"no .hdf5 files in {folder}; expected one file per physics parameter "
                                f"(see data/README.md)")
    return sorted((load_trajectory(p, dtype) for p in files), key=lambda tr: tr.mu)


def split_by_mu(trajs: Sequence[Trajectory], test_mus: Sequence[float],
                rtol: float = 1e-6) -> tuple[list[Trajectory], list[Trajectory]]:
    """``(train, test)``: the trajectories whose ``mu`` is (within ``rtol``) in ``test_mus``, and the rest."""
    def is_test(mu: float) -> bool:
        return any(abs(mu - m) <= rtol * max(abs(m), 1e-12) for m in test_mus)
    test = [tr for tr in trajs if is_test(tr.mu)]
    if len(test) != len(test_mus):
        raise ValueError(f"test parameters {list(test_mus)} found {[tr.mu for tr in test]} among "
                         f"{[tr.mu for tr in trajs]}")
    return [tr for tr in trajs if not is_test(tr.mu)], test


@dataclass
class Snapshots:
    """Trajectories on one common grid, flattened: ``x`` ``(N, D)``, ``u`` ``(S, N, Q)``,
    ``tmu`` ``(S, 2)`` (time and parameter of each snapshot)."""

    x: torch.Tensor
    u: torch.Tensor
    tmu: torch.Tensor

    @classmethod
    def from_trajectories(cls, trajs: Sequence[Trajectory]) -> "Snapshots":
        if not trajs:
            raise ValueError("no trajectories given")
        x = trajs[0].points
        for tr in trajs[1:]:
            if tr.points.shape != x.shape or not torch.allclose(tr.points, x):
                raise ValueError(f"trajectory mu={tr.mu} lies on another grid ({tuple(tr.points.shape)} "
                                 f"points) than mu={trajs[0].mu} ({tuple(x.shape)}); resample first")
        u = torch.cat([tr.flat for tr in trajs])
        tmu = torch.cat([torch.stack([tr.t, torch.full_like(tr.t, tr.mu)], -1) for tr in trajs])
        return cls(x, u, tmu)

    def to(self, device: torch.device | str) -> "Snapshots":
        return Snapshots(self.x.to(device), self.u.to(device), self.tmu.to(device))


def compact_copy(src: str | os.PathLike, dst: str | os.PathLike, space: int = 2, time: int = 1) -> int:
    """Copy every trajectory of folder ``src`` into ``dst``, subsampled by :meth:`Trajectory.subsample`
    (e.g. the 2-D Burgers set from 34 MB to 8.7 MB with ``space=2``); returns the bytes written."""
    os.makedirs(dst, exist_ok=True)
    total = 0
    for p in sorted(Path(src).iterdir()):
        if p.suffix in (".hdf5", ".h5"):
            out = Path(dst) / p.name
            save_trajectory(out, load_trajectory(p).subsample(space, time))
            total += out.stat().st_size
    return total


if __name__ == "__main__":  # python -m bayes_colora.pde.data SRC DST [SPACE] [TIME]
    import sys

    if len(sys.argv) not in (3, 4, 5):
        raise SystemExit("usage: python -m bayes_colora.pde.data SRC DST [SPACE_STRIDE] [TIME_STRIDE]")
    size = compact_copy(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
    print(f"wrote {size / 2**20:.1f} MiB to {sys.argv[2]}")
