"""Sentence classification files (``LABEL sentence`` per line) and few-shot splits of them.

The files are those of the sentence-CNN benchmark collection (``../shared/data/text``): SST-2
(``stsa.binary.{train,test}``), MR (``rt-polarity.all``), CR (``custrev.all``), Subj
(``subj.all``) and TREC (``TREC.{train,test}.all``). ``*.all`` files have no split: a fixed
permutation (seed 0) holds out the test examples, the rest is the training pool.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TaskSpec:
    """A task: its training file, its test file (``None``: split the training file) and classes."""

    train: str
    test: str | None
    n_classes: int


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("stsa.binary.train", "stsa.binary.test", 2),
    "mr": TaskSpec("rt-polarity.all", None, 2),
    "cr": TaskSpec("custrev.all", None, 2),
    "subj": TaskSpec("subj.all", None, 2),
    "trec": TaskSpec("TREC.train.all", "TREC.test.all", 6),
}


def read_sentences(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """``(sentences, labels)`` of a file with one ``LABEL sentence...`` line per example.

    Blank lines are skipped; a line whose first token is not an integer raises ``ValueError``
    naming the file and the line number.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; pass the folder of the sentence files "
                                f"(e.g. --data ../shared/data/text)")
    sentences, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            label, _, text = line.partition(" ")
            if not label.lstrip("-").isdigit():
                raise ValueError(f"{path}, line {i}: expected 'LABEL sentence' with an integer label, "
                                 f"got {line[:40]!r}")
            labels.append(int(label))
            sentences.append(text.strip())
    if not sentences:
        raise ValueError(f"{path} holds no example")
    return sentences, labels


def few_shot_split(folder: str | os.PathLike, task: str, n_train: int, n_test: int, seed: int = 0
                   ) -> tuple[list[str], torch.Tensor, list[str], torch.Tensor]:
    """``(train_sentences, train_labels, test_sentences, test_labels)`` of ``task``.

    The test set (``n_test`` examples, fewer if the file is smaller) does not depend on ``seed``
    or ``n_train``; the training set is the first ``n_train`` examples of a seed-``seed``
    permutation of the training pool, so smaller training sets are nested in larger ones.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    spec = TASKS[task]
    sents, labels = read_sentences(os.path.join(folder, spec.train))
    if spec.test is None:
        order = torch.randperm(len(sents), generator=torch.Generator().manual_seed(0)).tolist()
        n_hold = min(n_test, len(sents) // 2)
        test_idx, pool_idx = order[:n_hold], order[n_hold:]
        test_s, test_l = [sents[i] for i in test_idx], [labels[i] for i in test_idx]
        pool_s, pool_l = [sents[i] for i in pool_idx], [labels[i] for i in pool_idx]
    else:
        pool_s, pool_l = sents, labels
        test_s, test_l = read_sentences(os.path.join(folder, spec.test))
        order = torch.randperm(len(test_s), generator=torch.Generator().manual_seed(0)).tolist()[:n_test]
        test_s, test_l = [test_s[i] for i in order], [test_l[i] for i in order]
    if n_train > len(pool_s):
        raise ValueError(f"{task}: asked for {n_train} training examples, the pool has {len(pool_s)}")
    order = torch.randperm(len(pool_s), generator=torch.Generator().manual_seed(1000 + seed)).tolist()[:n_train]
    bad = sorted({l for l in pool_l + test_l if not 0 <= l < spec.n_classes})
    if bad:
        raise ValueError(f"{task}: labels {bad} outside 0 ... {spec.n_classes - 1}")
    return ([pool_s[i] for i in order], torch.tensor([pool_l[i] for i in order]),
            test_s, torch.tensor(test_l))
