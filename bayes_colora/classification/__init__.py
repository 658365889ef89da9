"""Image classification task kit: MedMNIST data and ImageNet backbones with a fresh head.

The head is trained in full with the core adapter ``bc.DenseDelta``, and ``bc.merged_model``
folds trained adapters into a plain network."""
from .backbones import ImageClassifier, classifier, conv_targets, mobilenet_v2, timm_classifier, tiny_cnn
from .medmnist import load_medmnist, prepare_images, synthetic_medmnist

__all__ = ["ImageClassifier", "classifier", "conv_targets", "load_medmnist", "mobilenet_v2",
           "prepare_images", "synthetic_medmnist", "timm_classifier", "tiny_cnn"]
