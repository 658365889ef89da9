"""What every adapter shares: the wrapper module and the spec that selects layers to wrap.

An *adapter layer* wraps one base layer ``base`` and adds a delta that is exactly zero at
initialisation, so a fresh subspace reproduces the pretrained model. It owns only its own
parameters (the base stays frozen) and can ``merge()`` its delta into the base weights and
``unmerge()`` it again. Adapters may be stacked (a BitFit delta on a LoRA-wrapped layer): each
adapter's ``base`` is then the adapter below it, and ``base_layer`` is the original layer.

An *adapter spec* (``bc.LoRA(rank=4, targets=...)``) is a small config object: it chooses which
modules of a model to wrap (regular expressions over qualified module names, searched with
``re.search``, and module types) and builds the adapter layer for each.
"""
from __future__ import annotations

import difflib
import re
from abc import ABC, abstractmethod
from typing import Iterable, Sequence

import torch
from torch import nn


class AdapterLayer(nn.Module, ABC):
    """A frozen base layer plus a trainable delta; ``forward`` is ``base(x)`` plus the delta.

    Subclasses implement ``adapted_forward`` (the output with the delta, unmerged) and
    ``_merge_into_base(sign)`` (add, ``sign=+1``, or remove, ``sign=-1``, the delta from the
    base layer's parameters).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.merged = False

    def __getattr__(self, name: str):
        """Attributes the adapter lacks (``weight``, ``in_features``, ...) come from the original
        layer (not from stacked adapters in between), so code that inspects a layer (e.g. ``projection.weight.dtype``) still works."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base_layer, name)

    @property
    def base_layer(self) -> nn.Module:
        """The original (innermost) layer, below any stacked adapters."""
        layer = self.base
        while isinstance(layer, AdapterLayer):
            layer = layer.base
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.adapted_forward(x)

    @abstractmethod
    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus this adapter's delta."""

    @abstractmethod
    def _merge_into_base(self, sign: float) -> None:
        """Add (``sign=1``) or subtract (``sign=-1``) the delta in the base layer's weights."""

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into the base layer; ``forward`` then runs the base layer alone."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged; call unmerge() first")
        if isinstance(self.base, AdapterLayer) and not self.base.merged:
            raise RuntimeError("merge the inner adapter before the outer one (Subspace.merge does)")
        self._merge_into_base(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()``: take the delta out of the base weights again."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        self._merge_into_base(-1.0)
        self.merged = False

    def merge_and_reset(self, generator: torch.Generator | None = None) -> None:
        """Fold the current delta into the base weights and start again from a zero delta
        (the CoLoRA training recipe, once per epoch). Needs a ``reset_factors`` method."""
        reset = getattr(self, "reset_factors", None)
        if reset is None:
            raise NotImplementedError(f"{type(self).__name__} cannot reset its factors")
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is merged; unmerge() first")
        with torch.no_grad():
            self._merge_into_base(1.0)
        reset(generator)

    def extra_repr(self) -> str:
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("base."))
        return f"params={n}, merged={self.merged}"


class AdapterSpec(ABC):
    """Chooses the layers an adapter kind wraps, and wraps them.

    Args:
        targets: regular expression (or several) searched in each qualified module name
            (``re.search``); ``None`` means every module of a supported type.
        types: module classes to restrict to; ``None`` means every type the adapter supports.
    """

    #: layer types this adapter can wrap; subclasses set it
    supported: tuple[type, ...] = ()

    def __init__(self, targets: str | Sequence[str] | None = None,
                 types: Sequence[type] | None = None):
        if isinstance(targets, str):
            targets = [targets]
        self.targets = list(targets) if targets is not None else None
        self._patterns = [re.compile(t) for t in self.targets] if self.targets else None
        self.types = tuple(types) if types is not None else None

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def wrap(self, name: str, layer: nn.Module) -> AdapterLayer:
        """Build the adapter layer around ``layer`` (the module at qualified name ``name``)."""

    def accepts(self, layer: nn.Module) -> str | None:
        """``None`` if this adapter can wrap ``layer``, else the reason it cannot."""
        if not isinstance(layer, self.supported) and not self._supports_by_name(layer):
            kinds = ", ".join(t.__name__.lstrip("_") for t in self.supported)
            return f"{type(layer).__name__} is not supported by {self.name} (supported: {kinds})"
        return None

    def _supports_by_name(self, layer: nn.Module) -> bool:
        """Hook for layer classes matched by class name (transformers' Conv1D)."""
        return False

    def select(self, named_modules: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
        """The (name, module) pairs this spec wraps, with clear errors when there are none.

        A pattern that matches no module name raises ``ValueError`` listing close candidates;
        a pattern that matches only modules this adapter cannot wrap raises ``TypeError``
        naming them and the supported types.
        """
        named = _logical_modules(named_modules)
        if self._patterns is not None:
            for pattern in self._patterns:
                if not any(pattern.search(n) for n, _ in named):
                    raise ValueError(_no_match_message(self.name, pattern.pattern, [n for n, _ in named]))
            named = [(n, m) for n, m in named if any(p.search(n) for p in self._patterns)]
        chosen, rejected = [], []
        for n, m in named:
            base = m.base_layer if isinstance(m, AdapterLayer) else m
            if self.types is not None and not isinstance(base, self.types):
                continue
            reason = self.accepts(base)
            if reason is None:
                chosen.append((n, m))
            elif self._patterns is not None and not list(base.children()):
                rejected.append(f"{n}: {reason}")
        if not chosen:
            where = f"targets {self.targets}" if self.targets else "the model"
            kinds = ", ".join(t.__name__.lstrip("_") for t in self.supported)
            detail = "; ".join(rejected[:5]) if rejected else f"no module of a supported type ({kinds})"
            raise TypeError(f"{self.name}: nothing to adapt in {where}: {detail}. "
                            f"Choose targets that name supported layers.")
        return chosen

    def __repr__(self) -> str:
        return f"{self.name}(targets={self.targets})"


def _logical_modules(named_modules: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Named modules as the user sees them: an adapter layer stands for the layer it wraps, and
    the modules inside it (its ``base``) are hidden, so patterns match the original names."""
    out, inside = [], []
    for n, m in named_modules:
        if not n or any(n.startswith(p + ".") for p in inside):
            continue
        out.append((n, m))
        if isinstance(m, AdapterLayer):
            inside.append(n)
    return out


def _no_match_message(adapter: str, pattern: str, names: list[str]) -> str:
    leaves = sorted(set(names))
    close = difflib.get_close_matches(pattern, leaves, n=8, cutoff=0.3)
    if not close:  # compare against the last components too: "query" vs "...attention.query"
        tails = {n.rsplit(".", 1)[-1]: n for n in leaves}
        close = [tails[t] for t in difflib.get_close_matches(pattern, list(tails), n=8, cutoff=0.3)]
    hint = ", ".join(close) if close else ", ".join(leaves[:8])
    return (f"{adapter}: target pattern {pattern!r} matches no module name. "
            f"Close candidates: {hint}. Patterns are searched (re.search) in qualified names "
            f"such as those of model.named_modules().")
