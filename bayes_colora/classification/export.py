r"""The merge path: a subspace's trained adapters folded into a plain network.

For every adapter ``y = base(x) + delta(x)`` whose delta is linear in the base weights'
slot (LoRA ``W + (alpha / r) B A``, ConvCoLoRA ``W + P * D``, BitFit ``b + db``, DiffFit),
merging sets ``W <- W + dW``; replacing the adapter module by its original layer then leaves
a network of the base architecture, with the base's inference cost, that computes the adapted
function (up to float rounding of ``W + dW``).
"""
from __future__ import annotations

import copy

from torch import nn

from ..adapters.base import AdapterLayer
from ..subspace import Subspace


def merged_model(sub: Subspace) -> nn.Module:
    """A copy of ``sub.model`` with every adapter merged and removed (``sub`` is untouched).

    Returns:
        a plain module (no :class:`AdapterLayer` inside) in eval mode, parameters frozen.
    """
    model = copy.deepcopy(sub.model)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    for layer in reversed(layers):  # named_modules lists outer wrappers first: merge inner first
        if not layer.merged:
            layer.merge()
    for name in _outermost(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, parent.get_submodule(child).base_layer)
    return model.eval()


def _outermost(model: nn.Module) -> list[str]:
    """Qualified names of adapter layers not inside another adapter layer."""
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names
