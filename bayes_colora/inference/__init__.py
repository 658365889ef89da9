"""Inference engines: each sees a Subspace, a Likelihood, a prior and data, and returns a Posterior."""
from .map import fit_map

__all__ = ["fit_map"]
