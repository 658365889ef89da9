"""PDE task kit: continuous CoLoRA reduced models of parametrised PDEs.

Offline, a coordinate network ``u(x; alpha)`` with continuous LoRA layers and a hypernetwork
``h(t, mu) -> alpha`` are trained together on snapshots (:func:`train_offline`). Online, only the
``d`` coordinates ``alpha`` move: data-driven (``h(t, mu)``) or equation-driven
(:func:`neural_galerkin`), with posterior uncertainty from the package's engines
(:func:`sensor_posterior`). Data: the HDF5 layout of ``data/README.md`` (:mod:`.data`) and a
built-in 1-D Burgers solver (:mod:`.solvers`).
"""
from .data import (Snapshots, Trajectory, compact_copy, load_folder, load_trajectory, save_trajectory,
                   split_by_mu)
from .equations import RDE, Burgers1D, Burgers2D, Equation, equation_for
from .galerkin import galerkin_system, galerkin_velocity, neural_galerkin
from .model import (ConcatBaseline, CoordinateNet, HyperNetwork, PeriodicEmbedding, ReducedModel,
                    baseline_width, colora_subspace, n_parameters)
from .solvers import burgers_1d, burgers_cole_hopf, burgers_trajectories
from .train import predict_snapshots, relative_errors, train_offline
from .uncertainty import alpha_reference, factor_laplace, factor_subspace, sensor_posterior

__all__ = [
    "Burgers1D", "Burgers2D", "ConcatBaseline", "CoordinateNet", "Equation", "HyperNetwork",
    "PeriodicEmbedding", "RDE", "ReducedModel", "Snapshots", "Trajectory", "alpha_reference",
    "baseline_width", "burgers_1d", "burgers_cole_hopf", "burgers_trajectories", "colora_subspace",
    "compact_copy", "equation_for", "factor_laplace", "factor_subspace", "galerkin_system", "galerkin_velocity", "load_folder",
    "load_trajectory", "n_parameters", "neural_galerkin", "predict_snapshots", "relative_errors",
    "save_trajectory", "sensor_posterior", "split_by_mu", "train_offline",
]
