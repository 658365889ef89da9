r"""Likelihoods ``p(y | f(x; theta))`` and how they turn sampled outputs into predictive moments.

Every likelihood gives

* ``log_prob(out, y)``: ``log p(y | out)`` summed over the output elements of each example, shape
  ``out.shape[:-k]`` down to the batch axis (leading sample axes broadcast), and
* ``moments(outs)``: from outputs ``outs`` of shape ``(S, batch, ...)`` at S posterior samples, the
  predictive mean and its variance split by the law of total variance,
  ``Var[y] = E_theta[Var[y | theta]] + Var_theta[E[y | theta]]`` = aleatoric + epistemic,
  per output element.

Likelihoods are ``nn.Module`` s: a learned noise scale is a parameter that ``fit_map`` trains with
theta (it is not part of theta).
"""
from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


#: likelihood classes by name, filled by subclassing; ``likelihood_from_config`` builds from it
_KINDS: dict[str, type["Likelihood"]] = {}


class Likelihood(nn.Module):
    """Base class; subclasses implement ``log_prob``, ``moments`` and ``config``.

    Subclassing registers the class by name: ``config()`` returning ``{"kind": name, "module":
    its module, **constructor arguments}`` lets :func:`likelihood_from_config` rebuild it (importing
    the module first if it is a not yet imported ``bayes_colora`` module)."""

    #: "regression" or "classification"
    task = "regression"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _KINDS[cls.__name__] = cls

    def log_prob(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def moments(self, outs: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def mean_output(self, out: torch.Tensor) -> torch.Tensor:
        """The part of the network output that is the predicted mean (all of it by default)."""
        return out

    def config(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def check_target(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming both shapes when ``y`` does not fit ``out``."""
        want = tuple(self.mean_output(out).shape)
        if tuple(y.shape) != want:
            raise ValueError(f"target shape {tuple(y.shape)} does not match the model's "
                             f"prediction shape {want} (output shape {tuple(out.shape)}) for "
                             f"{type(self).__name__}")


def _sum_per_example(t: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Sum all axes after the first ``batch_dims`` ones."""
    return t.reshape(*t.shape[:batch_dims], -1).sum(-1)


def mixture_moments(means: torch.Tensor, variances: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""Moments of the mixture of ``S`` per-sample predictives with ``means`` and ``variances``
    ``(S, ...)``, by the law of total variance: ``mean = E_s[m_s]``, ``aleatoric = E_s[v_s]``,
    ``epistemic = Var_s[m_s]`` (population variance; 0 for one sample), ``total`` their sum."""
    mean = means.mean(0)
    epistemic = means.var(0, unbiased=False) if means.shape[0] > 1 else torch.zeros_like(mean)
    aleatoric = variances.mean(0)
    return {"mean": mean, "aleatoric": aleatoric, "epistemic": epistemic, "total": aleatoric + epistemic}


class NoiseScaled(Likelihood):
    """A likelihood with one noise scale ``sigma``: fixed (a buffer), learned (``log sigma``, a
    parameter) or, when ``heteroscedastic``, given per element by the network's output (then
    ``split(out)`` gives it, and ``sigma`` raises)."""

    learn_sigma: bool
    heteroscedastic: bool

    def _init_noise(self, sigma: torch.Tensor, learn_sigma: bool, heteroscedastic: bool) -> None:
        if learn_sigma and heteroscedastic:
            raise ValueError("choose learn_sigma=True or heteroscedastic=True, not both")
        self.learn_sigma, self.heteroscedastic = learn_sigma, heteroscedastic
        if learn_sigma:
            self.log_sigma = nn.Parameter(sigma.log())
        else:
            self.register_buffer("fixed_sigma", sigma)

    @property
    def sigma(self) -> torch.Tensor:
        """The homoscedastic noise scale (fixed or learned)."""
        if self.heteroscedastic:
            # not AttributeError: nn.Module.__getattr__ would replace this message with its own
            raise ValueError(f"a heteroscedastic {type(self).__name__} has no single sigma; use "
                             f"split(out) for the per-element variance")
        return self.log_sigma.exp() if self.learn_sigma else self.fixed_sigma


class Gaussian(NoiseScaled):
    r"""``y ~ N(mu, sigma^2)`` per output element.

    Three kinds of noise:

    * ``Gaussian(sigma=0.1)``: fixed sigma (a float, or a tensor broadcastable to the output);
    * ``Gaussian(learn_sigma=True, sigma=...)``: one sigma, learned (stored as ``log sigma``);
    * ``Gaussian(heteroscedastic=True, dim=-1)``: the model outputs the mean and ``log sigma^2``
      concatenated along ``dim`` (the first half is the mean); ``dim`` is an axis of one batch
      output ``(B, ...)``, so ``dim=1`` stays the channel axis when sample axes lead.

    ``log p(y) = -0.5 [(y - mu)^2 / sigma^2 + log sigma^2 + log 2 pi]``.
    """

    def __init__(self, sigma: float | torch.Tensor = 1.0, learn_sigma: bool = False,
                 heteroscedastic: bool = False, dim: int = -1):
        super().__init__()
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if (sigma <= 0).any():
            raise ValueError(f"sigma must be positive, got {sigma}")
        self._init_noise(sigma, learn_sigma, heteroscedastic)
        self.dim = dim

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) of ``y`` given the network output ``out`` of one batch, ``(B, ...)``."""
        return self._split(out, lead=0)

    def _split(self, out: torch.Tensor, lead: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`split` for ``out`` with ``lead`` sample axes before the batch axis (a
        non-negative ``dim`` counts from the batch axis, so it is shifted by ``lead``)."""
        if self.heteroscedastic:
            axis = self.dim + lead if self.dim >= 0 else self.dim
            if out.shape[axis] % 2:
                raise ValueError(f"a heteroscedastic Gaussian needs an even output size along dim "
                                 f"{self.dim} (mean and log-variance), got shape {tuple(out.shape)}")
            mean, log_var = out.chunk(2, dim=axis)
            return mean, log_var.clamp(-30.0, 30.0).exp()
        return out, (self.sigma ** 2).to(out).expand_as(out)

    def mean_output(self, out: torch.Tensor) -> torch.Tensor:
        return self.split(out)[0]

    def log_prob(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mean, var = self._split(out, lead=out.dim() - y.dim())
        elem = -0.5 * ((y - mean) ** 2 / var + var.log() + math.log(2 * math.pi))
        return _sum_per_example(elem, out.dim() - y.dim() + 1)

    def moments(self, outs: torch.Tensor) -> dict[str, torch.Tensor]:
        return mixture_moments(*self._split(outs, lead=1))

    def config(self) -> dict[str, Any]:
        return {"kind": "Gaussian", "sigma": None if self.heteroscedastic else self.sigma.detach().cpu(),
                "learn_sigma": self.learn_sigma, "heteroscedastic": self.heteroscedastic,
                "dim": self.dim}

    def extra_repr(self) -> str:
        if self.heteroscedastic:
            return f"heteroscedastic, dim={self.dim}"
        return f"sigma={self.sigma.detach().cpu().numpy()}, learn_sigma={self.learn_sigma}"


class Categorical(Likelihood):
    r"""``y ~ Categorical(softmax(logits))``, classes along axis 1 of the batch
    (``(B, C)`` or ``(B, C, ...)`` per position; targets are class indices of shape ``(B, ...)``).

    Predictive moments treat ``y`` one-hot: ``mean = p̄ = E_theta[p]``, aleatoric
    ``E_theta[p (1 - p)]``, epistemic ``Var_theta[p]``, total ``p̄ (1 - p̄)``; besides them
    ``probs``, ``entropy = H[p̄]`` and ``mutual_info = H[p̄] - E_theta H[p]``.
    """

    task = "classification"

    def log_prob(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lead = out.dim() - y.dim() - 1  # sample axes before the batch axis
        logp = out.log_softmax(dim=lead + 1)
        picked = logp.gather(lead + 1, y.long().expand(*out.shape[:lead], *y.shape).unsqueeze(lead + 1))
        return _sum_per_example(picked.squeeze(lead + 1), lead + 1)

    def check_target(self, out: torch.Tensor, y: torch.Tensor) -> None:
        want = (out.shape[0],) + tuple(out.shape[2:])
        if tuple(y.shape) != want:
            raise ValueError(f"target shape {tuple(y.shape)} does not match the logits shape "
                             f"{tuple(out.shape)}: Categorical wants class indices of shape {want}")
        if y.dtype.is_floating_point:
            raise ValueError(f"Categorical targets must be integer class indices, got {y.dtype}")
        if y.numel() and (y.min() < 0 or y.max() >= out.shape[1]):
            raise ValueError(f"class index out of range [0, {out.shape[1]}): min {int(y.min())}, "
                             f"max {int(y.max())}")

    def moments(self, outs: torch.Tensor) -> dict[str, torch.Tensor]:
        probs_s = outs.float().softmax(dim=2)
        probs = probs_s.mean(0)
        aleatoric = (probs_s * (1 - probs_s)).mean(0)
        epistemic = probs_s.var(0, unbiased=False) if outs.shape[0] > 1 else torch.zeros_like(probs)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(1)
        expected_entropy = -(probs_s * probs_s.clamp_min(1e-30).log()).sum(2).mean(0)
        return {"mean": probs, "aleatoric": aleatoric, "epistemic": epistemic,
                "total": probs * (1 - probs), "probs": probs, "entropy": entropy,
                "mutual_info": (entropy - expected_entropy).clamp_min(0.0)}

    def config(self) -> dict[str, Any]:
        return {"kind": "Categorical"}


def likelihood_from_config(config: dict[str, Any]) -> Likelihood:
    """Rebuild a likelihood from :meth:`Likelihood.config` (used by ``load_posterior``)."""
    config = dict(config)
    kind = config.pop("kind")
    if kind == "Categorical":
        return Categorical()
    if kind == "Gaussian":
        sigma = config.pop("sigma")
        return Gaussian(sigma=1.0 if sigma is None else sigma, **config)
    module = config.pop("module", None)
    if kind not in _KINDS and isinstance(module, str) and module.startswith("bayes_colora."):
        importlib.import_module(module)  # a task kit's likelihood registers itself on import
    if kind in _KINDS:
        return _KINDS[kind](**config)
    raise ValueError(f"unknown likelihood kind {kind!r} (known: {sorted(_KINDS)})")
