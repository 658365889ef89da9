"""Image classification task kit: MedMNIST data, ImageNet backbones with a fresh head, a full
head update as an adapter, and the merge path that folds trained adapters into a plain network."""
from .backbones import ImageClassifier, classifier, conv_targets, mobilenet_v2, timm_classifier, tiny_cnn
from .export import merged_model
from .head import DenseDelta, DenseDeltaLayer
from .medmnist import load_medmnist, prepare_images, synthetic_medmnist

__all__ = ["DenseDelta", "DenseDeltaLayer", "ImageClassifier", "classifier", "conv_targets",
           "load_medmnist", "merged_model", "mobilenet_v2", "prepare_images", "synthetic_medmnist",
           "timm_classifier", "tiny_cnn"]
