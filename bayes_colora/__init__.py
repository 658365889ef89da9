"""bayes_colora: Bayesian inference on the parameter subspaces that adapters define.

>>> import bayes_colora as bc
>>> sub = bc.Subspace.from_model(model, bc.LoRA(rank=4, targets=r"attention\\.(query|value)"))
>>> post = bc.fit_map(sub, loader, bc.Gaussian(sigma=0.1), prior=bc.NormalPrior(1.0))
>>> pred = bc.predict(sub, post, x, n_samples=32)   # .mean, .aleatoric, .epistemic, .total
"""
from .adapters import AdapterLayer, AdapterSpec, BitFit, DiffFit, LoRA
from .inference import fit_map
from .likelihoods import Categorical, Gaussian, Likelihood
from .posterior import (DiagGaussianPosterior, DiracPosterior, GaussianPosterior,
                        LowRankGaussianPosterior, Posterior, load_posterior)
from .predictive import Predictive, predict
from .priors import NormalPrior
from .subspace import Subspace

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer", "AdapterSpec", "BitFit", "Categorical", "DiagGaussianPosterior", "DiffFit",
    "DiracPosterior", "GaussianPosterior", "LowRankGaussianPosterior",
    "Gaussian", "Likelihood", "LoRA", "NormalPrior", "Posterior", "Predictive", "Subspace",
    "fit_map", "load_posterior", "predict",
]
