"""Depth task kit: depth networks, per-pixel depth likelihoods and predictive uncertainty maps,
depth metrics and uncertainty evaluation."""
from .likelihoods import DepthLikelihood
from .models import (DECODER_TARGETS, DepthAnything, DepthNet, depth_anything, load_mobilenet_features,
                     mobilenet_depth)
from .predict import DepthPrediction, predict_depth
from .metrics import (DEFAULT_FRACTIONS, aurg, ause, depth_metrics, depth_nll, evaluate_depth,
                      sparsification_curve, valid_depth_mask)
