"""Text classification kit: the ``LABEL sentence`` files of the sentence benchmarks (SST-2, MR, CR,
Subj, TREC), few-shot splits, and a multi-task sentence classifier (a frozen transformer bottom,
adaptable top layers, mean pooling and one linear head per task)."""
from .data import TASKS, TaskSpec, few_shot_split, read_sentences
from .models import (DictBatches, MultiTaskClassifier, encode_bottom, load_sentence_encoder,
                     token_length)

__all__ = ["DictBatches", "MultiTaskClassifier", "TASKS", "TaskSpec", "encode_bottom", "few_shot_split",
           "load_sentence_encoder", "read_sentences", "token_length"]
