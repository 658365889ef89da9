"""Image restoration task kit: PROD degradations, a compact NAFNet with a heteroscedastic output,
PolyU / clean-image / procedural data, PROD pre-training and restoration metrics."""
from .data import (PairCrops, center_crop, clean_images, load_image, pack, polyu_pairs,
                   procedural_images, random_crop)
from .degradations import KINDS, PROD, gaussian_kernel, line_kernel
from .metrics import evaluate_restoration, pixel_error_and_uncertainty, psnr, ssim
from .nafnet import NAFBlock, NAFNet, nafnet
from .pretrain import ProdStream, gaussian_nll_loss, pretrain

__all__ = ["KINDS", "NAFBlock", "NAFNet", "PROD", "PairCrops", "ProdStream", "center_crop",
           "clean_images", "evaluate_restoration", "gaussian_kernel", "gaussian_nll_loss",
           "line_kernel", "load_image", "nafnet", "pack", "pixel_error_and_uncertainty",
           "polyu_pairs", "pretrain", "procedural_images", "psnr", "random_crop", "ssim"]
