"""Adapter kinds: each one wraps base layers and owns only its own (trainable) parameters."""
from .base import AdapterLayer, AdapterSpec
from .bitfit import BitFit
from .conv import ConvCoLoRA, TuckerCoLoRA
from .dense import DenseDelta
from .difffit import DiffFit
from .lora import LoRA

__all__ = ["AdapterLayer", "AdapterSpec", "BitFit", "ConvCoLoRA", "DenseDelta", "DiffFit", "LoRA",
           "TuckerCoLoRA"]
