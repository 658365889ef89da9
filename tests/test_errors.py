"""Bad input gets a clear error naming the problem (and the fix); each one is checked here,
message content included."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayes_colora as bc
from conftest import bert


def _mlp_sub(out: int = 1) -> bc.Subspace:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out))
    return bc.Subspace.from_model(model, bc.BitFit())


def _fit(sub, loader, lik=None, **kw):
    return bc.fit_map(sub, loader, lik or bc.Gaussian(sigma=1.0), epochs=1, progress=False, **kw)


# ---------------------------------------------------------------- adapter selection
def test_target_matching_nothing_lists_close_candidates():
    model, _ = bert()
    with pytest.raises(ValueError) as err:
        bc.Subspace.from_model(model, bc.LoRA(targets=r"attention\.self\.querry"))
    msg = str(err.value)
    assert "'attention\\\\.self\\\\.querry' matches no module name" in msg
    assert "bert.encoder.layer.0.attention.self.query" in msg  # a close candidate is listed


def test_lora_on_an_unsupported_layer_names_it_and_the_supported_types():
    with pytest.raises(TypeError, match=r"1: Tanh is not supported by LoRA \(supported: Linear"):
        bc.Subspace.from_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), bc.LoRA(targets=r"^1$"))
    model, _ = bert()
    with pytest.raises(TypeError, match=r"word_embeddings: Embedding is not supported by LoRA"):
        bc.Subspace.from_model(model, bc.LoRA(targets=r"word_embeddings"))


def test_bitfit_on_layers_without_bias_says_so():
    with pytest.raises(TypeError, match=r"0: Linear has no bias"):
        bc.Subspace.from_model(nn.Sequential(nn.Linear(3, 4, bias=False)), bc.BitFit(targets="0"))


def test_bad_specs():
    with pytest.raises(ValueError, match="at least one adapter spec"):
        bc.Subspace.from_model(nn.Linear(2, 2), [])
    with pytest.raises(TypeError, match="expected adapter specs such as bc.LoRA"):
        bc.Subspace.from_model(nn.Linear(2, 2), ["lora"])
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        bc.LoRA(rank=0)


# ---------------------------------------------------------------- theta shapes
def test_theta_of_wrong_length_names_both_shapes():
    sub = _mlp_sub()
    d = sub.dim
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=re.escape(f"theta has shape ({d + 1},), expected ({d},) or (S, {d})")):
        sub(x, theta=torch.zeros(d + 1))
    with pytest.raises(ValueError, match=re.escape(f"theta has shape (2, 3, {d}), expected ({d},) or (S, {d})")):
        sub(x, theta=torch.zeros(2, 3, d))
    with pytest.raises(ValueError, match=re.escape(f"theta has shape ({d - 1},), expected ({d},) for")):
        sub.theta = torch.zeros(d - 1)
    with pytest.raises(ValueError, match=re.escape(f"theta has shape (2, {d}), expected ({d},) for")):
        sub.theta = torch.zeros(2, d)  # the setter takes one theta


# ---------------------------------------------------------------- data
def test_non_finite_data_names_the_batch():
    sub = _mlp_sub()
    good = (torch.randn(4, 3), torch.randn(4, 1))
    bad_x = (torch.randn(4, 3), torch.randn(4, 1))
    bad_x[0][2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"batch 1: input has 1 non-finite value\(s\) \(NaN or inf\)"):
        _fit(sub, [good, bad_x])
    bad_y = (torch.randn(4, 3), torch.randn(4, 1))
    bad_y[1][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"batch 2: target has 1 non-finite"):
        _fit(sub, [good, good, bad_y])
    bad_dict = {"input": torch.randn(4, 3), "labels": torch.randn(4, 1)}
    bad_dict["input"][0, 0] = float("-inf")
    sub_dict = bc.Subspace.from_model(_Named(), bc.BitFit())
    with pytest.raises(ValueError, match=r"batch 0: input\['input'\] has 1 non-finite"):
        _fit(sub_dict, [bad_dict])


class _Named(nn.Module):
    """A model taking keyword inputs, like transformers' models."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, input):  # noqa: A002
        return self.lin(input)


def test_non_finite_loss_names_the_batch():
    sub = _mlp_sub()
    good = (torch.randn(4, 3), torch.randn(4, 1))
    huge = (torch.randn(4, 3), torch.full((4, 1), 1e30))  # finite, but its square overflows
    with pytest.raises(ValueError, match=r"epoch 0, batch 1: the loss is not finite"):
        _fit(sub, [good, huge])


def test_target_shape_mismatch_names_both_shapes():
    sub = _mlp_sub(out=1)
    with pytest.raises(ValueError, match=re.escape("target shape (4,) does not match the model's "
                                                   "prediction shape (4, 1)")):
        _fit(sub, [(torch.randn(4, 3), torch.randn(4))])
    sub3 = _mlp_sub(out=3)
    with pytest.raises(ValueError, match=re.escape("target shape (4, 3) does not match the logits "
                                                   "shape (4, 3): Categorical wants class indices of shape (4,)")):
        _fit(sub3, [(torch.randn(4, 3), torch.zeros(4, 3, dtype=torch.long))], bc.Categorical())
    with pytest.raises(ValueError, match="integer class indices, got torch.float32"):
        _fit(sub3, [(torch.randn(4, 3), torch.zeros(4))], bc.Categorical())
    with pytest.raises(ValueError, match=re.escape("class index out of range [0, 3): min 0, max 3")):
        _fit(sub3, [(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))], bc.Categorical())


def test_empty_loader():
    sub = _mlp_sub()
    with pytest.raises(ValueError, match="the loader is empty: it yields no batch"):
        _fit(sub, [])
    empty = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 1)), batch_size=2)
    with pytest.raises(ValueError, match="the loader is empty"):
        _fit(sub, empty)
    with pytest.raises(ValueError, match="the loader is empty"):  # n_data given: the loop notices
        _fit(sub, [], n_data=10)


def test_malformed_batches():
    sub = _mlp_sub()
    with pytest.raises(ValueError, match=r"batch 0 is a dict without a 'labels' entry"):
        _fit(sub, [{"x": torch.randn(2, 3)}])
    with pytest.raises(ValueError, match=r"batch 0 is a tuple of length 3; expected an \(x, y\) pair"):
        _fit(sub, [(torch.randn(2, 3),) * 3])


# ---------------------------------------------------------------- likelihoods, priors, predict
def test_likelihood_and_prior_arguments():
    with pytest.raises(ValueError, match="sigma must be positive"):
        bc.Gaussian(sigma=0.0)
    with pytest.raises(ValueError, match="learn_sigma=True or heteroscedastic=True, not both"):
        bc.Gaussian(learn_sigma=True, heteroscedastic=True)
    with pytest.raises(ValueError, match=r"even output size along dim -1 .* got shape \(2, 3\)"):
        bc.Gaussian(heteroscedastic=True).log_prob(torch.zeros(2, 3), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="no single sigma; use split"):
        bc.Gaussian(heteroscedastic=True).sigma
    with pytest.raises(ValueError, match="prior scale must be positive and finite"):
        bc.NormalPrior(scale=-1.0)


def test_predict_arguments():
    sub = _mlp_sub()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="carries no likelihood; pass likelihood="):
        bc.predict(sub, bc.DiracPosterior(sub.theta), x)
    with pytest.raises(ValueError, match=f"over {sub.dim + 1} parameters, the subspace has {sub.dim}"):
        bc.predict(sub, bc.DiracPosterior(torch.zeros(sub.dim + 1), bc.Gaussian()), x)
    with pytest.raises(ValueError, match="n_samples must be at least 1, got 0"):
        bc.predict(sub, bc.DiracPosterior(sub.theta, bc.Gaussian()), x, n_samples=0)


def test_model_output_that_cannot_be_read():
    sub = bc.Subspace.from_model(_DictOut(), bc.BitFit())
    with pytest.raises(TypeError, match=r"cannot tell which model output to use among \['foo'\]"):
        sub(torch.randn(2, 3))
    sub = bc.Subspace.from_model(_DictOut(), bc.BitFit(), output=lambda out: out["foo"])
    assert sub(torch.randn(2, 3)).shape == (2, 2)


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return {"foo": self.lin(x)}


def test_checkpoint_of_another_subspace(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    loader = [(torch.randn(4, 3), torch.randn(4, 1))]
    _fit(_mlp_sub(), loader, checkpoint=ckpt)
    other = bc.Subspace.from_model(nn.Sequential(nn.Linear(3, 1)), bc.BitFit())
    with pytest.raises(ValueError, match=r"holds theta of shape \(5,\), this subspace has \(1,\)"):
        _fit(other, loader, checkpoint=ckpt)


def test_unknown_posterior_kind(tmp_path):
    path = tmp_path / "p.pt"
    torch.save({"kind": "Nope", "state": {}}, path)
    with pytest.raises(ValueError, match="unknown posterior kind 'Nope'"):
        bc.load_posterior(path)


def test_theta_cannot_be_used_while_merged():
    torch.manual_seed(0)
    sub = bc.Subspace.from_model(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)), bc.LoRA(rank=2))
    x = torch.randn(5, 3)
    sub.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        sub.theta = torch.zeros(sub.dim)
    with pytest.raises(RuntimeError, match="unmerge"):
        sub(x, theta=torch.zeros(2, sub.dim))
    sub.unmerge()
    sub.theta = torch.zeros(sub.dim)  # allowed again
    assert torch.equal(sub.theta, torch.zeros(sub.dim))


def test_one_shot_iterator_needs_n_data():
    sub = bc.Subspace.from_model(nn.Sequential(nn.Linear(3, 1)), bc.BitFit())
    batches = iter([(torch.randn(4, 3), torch.randn(4, 1))])
    with pytest.raises(ValueError, match="one-shot iterator"):
        bc.fit_map(sub, batches, bc.Gaussian(), epochs=1, progress=False)
