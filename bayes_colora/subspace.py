r"""The subspace: a frozen base model plus adapters, seen as a function ``f(x; theta)``.

``theta`` in R^d is the concatenation of every adapter parameter, flattened in the order of
``model.named_parameters()``. ``theta = theta_0`` (the adapters' initial values, every delta zero)
reproduces the pretrained model exactly. ``f(x; theta)`` runs the model with theta's pieces in
the adapter parameters' places (a functional call); for ``T`` of shape ``(S, d)`` it runs under
``torch.func.vmap``: one batched call, not a loop over S.
:func:`merged_model` folds the adapters into a plain copy of the base architecture.
"""
from __future__ import annotations

import copy
import os
import tempfile
from contextvars import ContextVar
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import vmap

from .adapters.base import AdapterLayer, AdapterSpec
from .chunking import resolve_chunk, shape_key

#: Per-example side inputs that travel with a batch but are no model argument: the task id of
#: each example (``sub(x, task=ids)`` or a ``"task"`` entry of a dict ``x``). The subspace takes
#: them out of ``x`` and holds them here for the duration of one forward call, so engines (which
#: call ``sub(x, theta=...)`` with the batch's ``x``) pass them unchanged, also under ``vmap``;
#: modules read them with :func:`current_task` (``bc.CollaborativeLoRA`` does).
_TASK: ContextVar[torch.Tensor | None] = ContextVar("bayes_colora_task", default=None)


def current_task() -> torch.Tensor | None:
    """The task ids ``(B,)`` (integer) of the batch in the running ``Subspace`` call, or ``None``."""
    return _TASK.get()

OutputFn = Callable[[Any], torch.Tensor]


def default_output(out: Any) -> torch.Tensor:
    """The prediction tensor of a model's output.

    A tensor is returned as is; a tuple or list gives its first item; a mapping (transformers'
    ``ModelOutput``) gives ``logits``, ``predicted_depth`` or ``prediction``, whichever it has.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "predicted_depth", "prediction"):
            if out.get(key) is not None:
                return out[key]
        raise TypeError(f"cannot tell which model output to use among {list(out)}; "
                        f"pass output=lambda out: out[<key>] to Subspace.from_model")
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; pass output=<callable> to "
                    f"Subspace.from_model to pick the prediction tensor")


def call_model(model: nn.Module, x: Any) -> Any:
    """``model(**x)`` for a dict of tensors, ``model(*x)`` for a tuple, else ``model(x)``."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


class Subspace(nn.Module):
    """A frozen model with adapters attached; ``theta`` is the vector of all adapter parameters.

    Build one with :meth:`from_model`. ``sub(x)`` runs the model at the current ``theta``;
    ``sub(x, theta=t)`` runs it at ``t`` of shape ``(d,)``, or of shape ``(S, d)`` in one
    vectorised call returning a leading ``S`` axis.
    """

    def __init__(self, model: nn.Module, specs: Sequence[AdapterSpec], output: OutputFn | None = None):
        super().__init__()
        self.model = model
        self.specs = list(specs)
        self.output = output or default_output
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.param_names:
            raise ValueError("the subspace is empty: no adapter parameter was created")
        params = dict(model.named_parameters())
        self.param_shapes = [params[n].shape for n in self.param_names]
        self.param_numels = [params[n].numel() for n in self.param_names]
        # Resolved once, as ``param_names`` is (the module tree is fixed after ``from_model``),
        # rather than by a search of the model on every call.
        self._slots = _slots(model, self.param_names)
        self._adapters = tuple(m for m in model.modules() if isinstance(m, AdapterLayer))
        #: ``chunk_size="auto"``'s measured choices, by (what, S, input shapes)
        self._chunk_choice: dict = {}

    @classmethod
    def from_model(cls, model: nn.Module, spec: AdapterSpec | Sequence[AdapterSpec],
                   output: OutputFn | None = None) -> "Subspace":
        """Freeze ``model`` (weights and BatchNorm statistics: it is put in eval mode) and attach
        the adapters of ``spec`` (one spec or a list, applied in order; later ones may wrap
        layers earlier ones adapted). The model is modified in place.

        Args:
            model: any ``nn.Module`` (an MLP, a timm model, a transformers model).
            spec: e.g. ``bc.LoRA(rank=4, targets=r"attention\\.(query|value)")``.
            output: picks the prediction tensor from the model's output; default
                :func:`default_output`.
        """
        specs = [spec] if isinstance(spec, AdapterSpec) else list(spec)
        if not specs:
            raise ValueError("give at least one adapter spec, e.g. bc.LoRA(rank=4)")
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for s in specs:
            if not isinstance(s, AdapterSpec):
                raise TypeError(f"expected adapter specs such as bc.LoRA(...), got {type(s).__name__}")
            for name, layer in s.select(model.named_modules()):
                _set_submodule(model, name, s.wrap(name, layer))
        return cls(model, specs, output)

    # ------------------------------------------------------------------ theta
    @property
    def dim(self) -> int:
        """d, the number of adapter parameters."""
        return sum(self.param_numels)

    def _params(self) -> list[nn.Parameter]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.param_names]

    @property
    def theta(self) -> torch.Tensor:
        """The current adapter parameters as one detached 1-D tensor of length d."""
        return torch.cat([p.detach().reshape(-1) for p in self._params()])

    @theta.setter
    def theta(self, value: torch.Tensor) -> None:
        self._check_not_merged("setting theta")
        self._check_theta(value, allow_batch=False)
        with torch.no_grad():
            for p, piece in zip(self._params(), self.unflatten(value).values()):
                p.copy_(piece)

    @property
    def device(self) -> torch.device:
        return self.model.get_parameter(self.param_names[0]).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_parameter(self.param_names[0]).dtype

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a length-d vector into views shaped like the adapter parameters."""
        pieces = torch.split(theta, self.param_numels, dim=-1)
        return {n: piece.reshape(*theta.shape[:-1], *shape)
                for n, piece, shape in zip(self.param_names, pieces, self.param_shapes)}

    def _check_theta(self, theta: torch.Tensor, allow_batch: bool) -> None:
        ok = isinstance(theta, torch.Tensor) and theta.shape[-1:] == (self.dim,) and (
            theta.dim() == 1 or (allow_batch and theta.dim() == 2))
        if not ok:
            got = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
            want = f"({self.dim},)" + (f" or (S, {self.dim})" if allow_batch else "")
            raise ValueError(f"theta has shape {got}, expected {want} for this subspace (d = {self.dim})")

    def _check_not_merged(self, what: str) -> None:
        if any(layer.merged for layer in self._adapters):
            raise RuntimeError(f"{what} needs unmerged adapters: merged deltas live in the base "
                               f"weights, where theta cannot reach them; call sub.unmerge() first")

    # ---------------------------------------------------------------- forward
    def forward(self, x: Any, theta: torch.Tensor | None = None,
                chunk_size: int | str | None = None, task: torch.Tensor | None = None) -> torch.Tensor:
        """``f(x; theta)``.

        Args:
            x: a tensor, a dict of tensors (passed as keyword arguments) or a tuple. A dict's
                ``"task"`` entry is taken out and treated as ``task``.
            theta: ``None`` (current parameters), shape ``(d,)``, or ``(S, d)``.
            chunk_size: with ``(S, d)``, evaluate at most this many samples at once (memory), or
                ``"auto"``: the fastest of all-at-once and chunks of 16, 8, 4, timed on the first
                call with these shapes and remembered (:mod:`bayes_colora.chunking`).
            task: integer task id of each example, ``(B,)``, visible to the adapters through
                :func:`current_task` during this call (multi-task adapters need it).

        Returns:
            the prediction tensor; with ``theta`` of shape ``(S, d)`` it has a leading ``S`` axis.
        """
        if isinstance(x, Mapping) and "task" in x:
            if task is not None:
                raise ValueError("the task ids were given twice: as task= and as x['task']; give one")
            task = x["task"]
            x = {k: v for k, v in x.items() if k != "task"}
        if task is None:
            return self._forward(x, theta, chunk_size)
        if not isinstance(task, torch.Tensor) or task.dim() != 1 or task.is_floating_point():
            got = tuple(task.shape) if isinstance(task, torch.Tensor) else type(task).__name__
            raise ValueError(f"task ids must be a 1-D integer tensor (one id per example), got {got}")
        token = _TASK.set(task.to(self.device))
        try:
            return self._forward(x, theta, chunk_size)
        finally:
            _TASK.reset(token)

    def _forward(self, x: Any, theta: torch.Tensor | None, chunk_size: int | str | None) -> torch.Tensor:
        if theta is None:
            return self.output(call_model(self.model, x))
        self._check_not_merged("sub(x, theta=...)")
        self._check_theta(theta, allow_batch=True)
        theta = theta.to(device=self.device)
        if theta.dim() == 1:
            return self._functional(theta, x)

        def run(chunk: int | None) -> torch.Tensor:
            return vmap(self._functional, in_dims=(0, None), chunk_size=chunk)(theta, x)
        return run(self.chunk_for(chunk_size, "forward", x, len(theta), run))

    def chunk_for(self, chunk_size: int | str | None, what: str, x: Any, n_samples: int,
                  run: Callable[[int | None], Any]) -> int | None:
        """``chunk_size``, or for ``"auto"`` the fastest chunking of ``run(chunk)`` over
        ``n_samples`` samples of inputs like ``x`` (:func:`bayes_colora.chunking.resolve_chunk`),
        measured once per ``(what, n_samples, input shapes)`` and remembered by this subspace."""
        return resolve_chunk(chunk_size, self._chunk_choice, (what, n_samples, shape_key(x)), run,
                             n_samples, self.device)

    def _functional(self, theta: torch.Tensor, x: Any) -> torch.Tensor:
        """``f(x; theta)`` for one ``theta`` (``(d,)``; one sample under ``vmap``): every slot of
        every adapter parameter (:func:`_slots`) holds its piece of ``theta`` for the duration of
        the call, and the module's own parameters are put back after it, also when it raises.
        This is what ``torch.func.functional_call(model, pieces, tie_weights=False)`` does with
        the aliases given, without resolving the names on every call."""
        swapped = []
        try:
            for piece, slots in zip(self.unflatten(theta).values(), self._slots):
                for table, key in slots:
                    swapped.append((table, key, table[key]))
                    table[key] = piece
            out = call_model(self.model, x)
        finally:
            for table, key, own in reversed(swapped):
                table[key] = own
        return self.output(out)

    # ------------------------------------------------------------- adapters
    def adapter_layers(self) -> dict[str, AdapterLayer]:
        """Every adapter layer by qualified name, outermost wrappers included."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, AdapterLayer)}

    def count_by_adapter(self) -> dict[str, int]:
        """Number of theta entries owned by each adapter kind (class name of the layer)."""
        counts: dict[str, int] = {}
        for layer in self.adapter_layers().values():
            own = sum(p.numel() for n, p in layer.named_parameters(recurse=False))
            counts[type(layer).__name__] = counts.get(type(layer).__name__, 0) + own
        return counts

    def merge(self) -> None:
        """Fold every adapter's delta into the base weights (inner adapters first)."""
        for layer in reversed(list(self.adapter_layers().values())):
            layer.merge()

    def unmerge(self) -> None:
        """Undo :meth:`merge` (outer adapters first)."""
        for layer in self.adapter_layers().values():
            layer.unmerge()

    def merge_and_reset(self, generator: torch.Generator | None = None) -> None:
        """Fold every resettable adapter's delta into the base and restart it at zero
        (:meth:`AdapterLayer.merge_and_reset`); ``theta`` changes, the function does not."""
        layers = self.resettable_layers()
        if not layers:
            raise ValueError("no adapter in this subspace can be reset (ConvCoLoRA, TuckerCoLoRA "
                             "and LoRA can)")
        for layer in layers:
            layer.merge_and_reset(generator)

    def resettable_layers(self) -> list[nn.Module]:
        """The adapter layers that :meth:`merge_and_reset` restarts (those with ``reset_factors``)."""
        return [m for m in self.adapter_layers().values() if hasattr(m, "reset_factors")]

    def save_adapters(self, path: str | os.PathLike) -> None:
        """Write the adapter parameters to a safetensors file, atomically."""
        from safetensors.torch import save_file

        tensors = {n: t.contiguous().cpu() for n, t in self.unflatten(self.theta).items()}
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"dim": str(self.dim)}))

    def load_adapters(self, path: str | os.PathLike) -> None:
        """Load adapter parameters written by :meth:`save_adapters` into this subspace."""
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        missing = [n for n in self.param_names if n not in loaded]
        extra = [n for n in loaded if n not in self.param_names]
        if missing or extra:
            raise ValueError(f"{path} does not fit this subspace: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}; build the subspace with the same adapters")
        for n, shape in zip(self.param_names, self.param_shapes):
            if loaded[n].shape != shape:
                raise ValueError(f"{path}: {n} has shape {tuple(loaded[n].shape)}, "
                                 f"this subspace has {tuple(shape)}")
        self.theta = torch.cat([loaded[n].reshape(-1) for n in self.param_names]).to(self.device)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, adapters={self.specs}"


def merged_model(sub: Subspace) -> nn.Module:
    r"""A copy of ``sub.model`` with every adapter merged and removed (``sub`` is untouched).

    For every adapter ``y = base(x) + delta(x)`` whose delta is linear in the base weights' slot
    (LoRA ``W + (alpha / r) B A``, ConvCoLoRA ``W + P * D``, BitFit ``b + db``, DiffFit,
    DenseDelta ``W + dW``, ``b + db``), merging sets ``W <- W + dW`` (inner adapters first, as
    :meth:`Subspace.merge`); replacing each outermost adapter module by its original layer then leaves a
    network of the base architecture, with the base's inference cost, that computes the adapted
    function (up to float rounding of ``W + dW``). Adapters already merged in ``sub`` stay merged.

    Returns:
        a plain module (no :class:`AdapterLayer` inside) in eval mode, parameters frozen.
    """
    model = copy.deepcopy(sub.model)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    for layer in reversed(layers):  # named_modules lists outer wrappers first: merge inner first
        if not layer.merged:
            layer.merge()
    for name in _outermost(model):
        _set_submodule(model, name, model.get_submodule(name).base_layer)
    return model.eval()


def _outermost(model: nn.Module) -> list[str]:
    """Qualified names of adapter layers not inside another adapter layer."""
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def _slots(model: nn.Module, names: Sequence[str]) -> list[list[tuple[dict[str, Any], str]]]:
    """For every parameter ``name``, the module slots that hold its tensor, as ``(table, key)``
    with ``table`` a module's ``_parameters`` or ``_buffers``: the owner's slot first, then every
    other slot that holds the same tensor (a parameter shared by two modules), which
    ``Subspace._functional`` fills too, as ``functional_call(tie_weights=True)`` would. A module
    reachable by two paths is one slot: filling it once reaches both (and filling it twice would
    leave theta's piece in it afterwards)."""
    holders: dict[int, dict[tuple[int, str], tuple[dict[str, Any], str]]] = {}  # id(tensor) -> slots
    for module in model.modules():  # each module once, however many paths reach it
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None:
                    holders.setdefault(id(t), {}).setdefault((id(module), key), (table, key))
    slots = []
    for name in names:
        prefix, _, key = name.rpartition(".")
        owner = model.get_submodule(prefix)
        own, held = (id(owner), key), holders[id(owner._parameters[key])]
        slots.append([held[own]] + [slot for where, slot in held.items() if where != own])
    return slots


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
