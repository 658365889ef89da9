"""Inference engines: each sees a Subspace, a Likelihood, a prior and data, and returns a Posterior."""
from .laplace import fit_laplace
from .map import fit_map
from .mcmc import fit_nuts, pca_basis, random_basis
from .swag import fit_swag
from .vi import fit_vi

__all__ = ["fit_laplace", "fit_map", "fit_nuts", "fit_swag", "fit_vi", "pca_basis", "random_basis"]
