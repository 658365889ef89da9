"""bayes_colora: Bayesian inference on the parameter subspaces that adapters define.

>>> import bayes_colora as bc
>>> sub = bc.Subspace.from_model(model, bc.LoRA(rank=4, targets=r"attention\\.(query|value)"))
>>> post = bc.fit_map(sub, loader, bc.Gaussian(sigma=0.1), prior=bc.NormalPrior(1.0))
>>> pred = bc.predict(sub, post, x, n_samples=32)   # .mean, .aleatoric, .epistemic, .total
"""
from .adapters.collaborative import CollaborativeLoRA
from .adapters import AdapterLayer, AdapterSpec, BitFit, ConvCoLoRA, DenseDelta, DiffFit, LoRA, TuckerCoLoRA
from .inference import fit_map
from .inference import fit_laplace
from .inference import fit_nuts, fit_swag, fit_vi, pca_basis, random_basis
from .linearized import output_covariance
from .likelihoods import Categorical, Gaussian, Likelihood
from .posterior import (DiagGaussianPosterior, DiracPosterior, GaussianPosterior,
                        LowRankGaussianPosterior, Posterior, load_posterior)
from .posterior import LowRankPrecisionGaussianPosterior
from .posterior import SamplePosterior
from .posterior import KronGaussianPosterior
from .predictive import Predictive, predict
from .priors import NormalPrior
from .subspace import Subspace, merged_model
from . import metrics, plots, weights
from . import depth
from .adapters.continuous import ContinuousLoRA; from . import pde  # noqa: E702
from . import classification
from .adapters.contribution import ContributionLoRA
from .contribution import contribution_scores
from . import restoration

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer", "AdapterSpec", "BitFit", "Categorical", "CollaborativeLoRA", "ConvCoLoRA", "DenseDelta",
    "DiagGaussianPosterior", "DiffFit",
    "DiracPosterior", "GaussianPosterior", "LowRankGaussianPosterior",
    "Gaussian", "Likelihood", "LoRA", "NormalPrior", "Posterior", "Predictive", "Subspace", "TuckerCoLoRA",
    "fit_map", "load_posterior", "merged_model", "predict",
    "fit_laplace", "output_covariance", "LowRankPrecisionGaussianPosterior",
    "SamplePosterior", "fit_nuts", "fit_swag", "fit_vi", "pca_basis", "random_basis",
    "ContinuousLoRA",
    "ContributionLoRA", "contribution_scores",
    "KronGaussianPosterior",
]
