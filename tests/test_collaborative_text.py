"""The text kit (sentence files, few-shot splits, the multi-task classifier) on tiny BERT models
built from a config, and the text study's report helpers. No download, no shared data."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import bayes_colora as bc
from bayes_colora.text import (DictBatches, MultiTaskClassifier, encode_bottom, few_shot_split,
                               read_sentences, token_length)
from bayes_colora.text.models import PAD

WORDS = ["good", "bad", "movie", "great", "awful", "plot", "what", "is", "a", "the", "fun", "dull"]


@pytest.fixture()
def tiny(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, attn_implementation="eager")
    return BertModel(cfg).eval(), tokenizer


def _write(path, lines):
    path.write_text("".join(f"{l} {s}\n" for l, s in lines))


def test_read_sentences_and_errors(tmp_path):
    _write(tmp_path / "a.all", [(0, "a dull movie ."), (1, "great fun")])
    (tmp_path / "a.all").write_text((tmp_path / "a.all").read_text() + "\n")
    assert read_sentences(tmp_path / "a.all") == (["a dull movie .", "great fun"], [0, 1])
    (tmp_path / "b.all").write_text("0 fine\nbad line here\n")
    with pytest.raises(ValueError, match="line 2"):
        read_sentences(tmp_path / "b.all")
    with pytest.raises(FileNotFoundError, match="--data"):
        read_sentences(tmp_path / "missing.all")


def test_few_shot_split_is_nested_and_test_fixed(tmp_path):
    _write(tmp_path / "custrev.all", [(i % 2, f"sentence {i}") for i in range(40)])
    tr8, y8, te, yte = few_shot_split(tmp_path, "cr", 8, 10, seed=0)
    tr4, _, te_b, _ = few_shot_split(tmp_path, "cr", 4, 10, seed=0)
    _, _, te_c, _ = few_shot_split(tmp_path, "cr", 8, 10, seed=1)
    assert tr4 == tr8[:4] and te == te_b == te_c and len(te) == 10
    assert not set(tr8) & set(te)                          # disjoint
    assert [int(s.split()[1]) % 2 for s in tr8] == y8.tolist()
    with pytest.raises(ValueError, match="pool has 30"):
        few_shot_split(tmp_path, "cr", 31, 10)
    with pytest.raises(ValueError, match="unknown task"):
        few_shot_split(tmp_path, "imdb", 4, 10)
    _write(tmp_path / "subj.all", [(3, "x")] * 6)
    with pytest.raises(ValueError, match=r"labels \[3\] outside 0 ... 1"):
        few_shot_split(tmp_path, "subj", 2, 2)


def test_classifier_matches_full_encoder_and_selects_heads(tiny):
    encoder, tokenizer = tiny
    sents = ["good movie", "the plot is dull and awful", "what fun", "a bad movie"]
    length = token_length(tokenizer, sents, 16)
    assert length == 8  # [CLS] + 6 words ("and" is [UNK]) + [SEP]
    cached = encode_bottom(encoder, tokenizer, sents, n_frozen=1, length=length, progress=False)
    model = MultiTaskClassifier(encoder, n_frozen=1, n_classes=[2, 3])
    torch.manual_seed(1)
    for head in model.heads:
        torch.nn.init.normal_(head.weight)
        torch.nn.init.normal_(head.bias)
    task = torch.tensor([0, 1, 1, 0])
    sub = bc.Subspace.from_model(model, bc.CollaborativeLoRA(2, 2, targets=r"attention\.self\.query$"))
    logits = sub(dict(cached, task=task))
    # reference: the whole encoder, mean pooling over real tokens, head of each example's task
    enc = tokenizer(sents, padding="max_length", max_length=length, return_tensors="pt")
    with torch.no_grad():
        h = encoder(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    pooled = (h * m).sum(1) / m.sum(1)
    for i, t in enumerate(task.tolist()):
        ref = model.heads[t](pooled[i])
        torch.testing.assert_close(logits[i, :ref.shape[0]], ref, rtol=1e-4, atol=1e-5)
        assert (logits[i, ref.shape[0]:] == PAD).all()
    with pytest.raises(ValueError, match="2 task heads"):
        MultiTaskClassifier(encoder, n_frozen=1, n_classes=[2, 3])(cached["hidden"], cached["mask"])


def test_collaborative_classifier_under_vmap_and_engines(tiny):
    encoder, tokenizer = tiny
    sents = ["good movie", "awful plot", "what is fun", "the dull movie", "great", "bad"]
    length = token_length(tokenizer, sents, 16)
    data = encode_bottom(encoder, tokenizer, sents, n_frozen=1, length=length, progress=False)
    data["task"] = torch.tensor([0, 0, 1, 1, 0, 1])
    data["labels"] = torch.tensor([1, 1, 2, 2, 1, 2])  # one class per task: each head must learn its own
    model = MultiTaskClassifier(encoder, n_frozen=1, n_classes=[2, 3])
    sub = bc.Subspace.from_model(model, [bc.CollaborativeLoRA(2, 2, targets=r"attention\.self\.(query|value)$"),
                                         bc.LoRA(rank=2, targets=r"heads\.0$"), bc.LoRA(rank=3, targets=r"heads\.1$")])
    thetas = sub.theta + 0.1 * torch.randn(3, sub.dim)
    x = {k: data[k] for k in ("hidden", "mask", "task")}
    torch.testing.assert_close(sub(x, theta=thetas), torch.stack([sub(x, theta=t) for t in thetas]),
                               rtol=1e-4, atol=1e-5)
    loader = DictBatches(data, batch_size=4, seed=0)
    assert len(loader) == 2 and len(loader.dataset) == 6
    post = bc.fit_map(sub, loader, bc.Categorical(), prior=bc.NormalPrior(1.0), epochs=30, lr=3e-2, progress=False)
    assert post.history[-1]["nll"] < 0.2 * post.history[0]["nll"]
    la = bc.fit_laplace(sub, loader, bc.Categorical(), hessian="diag", diag_probes=4, progress=False,
                        generator=torch.Generator().manual_seed(0))
    pred = bc.predict(sub, la, x, n_samples=4, linearized=True)
    assert pred.probs.shape == (6, 3) and (pred.probs[data["task"] == 0, 2] < 1e-6).all()


def _study():
    path = os.path.join(os.path.dirname(__file__), "..", "studies", "collaborative_text.py")
    spec = importlib.util.spec_from_file_location("collaborative_text", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_study_summary_and_table():
    ct = _study()
    rows = [{"n": 64, "seed": s, "adapter": a, "engine": e, "task": t, "accuracy": acc, "nll": 0.5, "ece": 0.1}
            for s in (0, 1) for a in ct.ADAPTERS for e in ct.ENGINES
            for t, acc in (("sst2", 0.8 + 0.1 * s), ("mr", 0.6), ("trec", 0.3))]
    summ = ct.summarise(rows)
    assert summ[(64, "collaborative", "map", "sst2")]["accuracy"] == pytest.approx(0.85)
    assert summ[(64, "collaborative", "map", "sentiment")]["accuracy"] == pytest.approx((0.8 + 0.9 + 0.6 + 0.6) / 4)
    cfg = {"tasks": ("sst2", "mr", "trec"), "samples": (64,), "seeds": 2}
    table = ct.markdown({"config": cfg, "rows": rows})
    assert "| 64 | independent | swag | 0.850 | 0.600 | 0.300 | 0.725 |" in table
