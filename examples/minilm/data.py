"""Data source: disjoint calibration / evaluation sentences from the stdlib's docstrings."""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from examples.minilm.corpus import stdlib_sentences
from examples.minilm.tokenizer import fixed_length_tokenizer


class SentenceDataset(Dataset):
    """Sentences tokenized on access: ``{"input_ids": [L], "attention_mask": [L]}`` int64."""

    def __init__(self, sentences: list[str], max_length: int = 48) -> None:
        self.sentences = list(sentences)
        self.max_length = max_length
        fixed_length_tokenizer(max_length)  # fail here, not in a DataLoader worker

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        encoding = fixed_length_tokenizer(self.max_length).encode(self.sentences[index])
        return {"input_ids": torch.tensor(encoding.ids, dtype=torch.int64),
                "attention_mask": torch.tensor(encoding.attention_mask, dtype=torch.int64)}


def stdlib_text(num_calibration: int = 256, num_evaluation: int = 512, max_length: int = 48,
                seed: int = 0) -> dict[str, Dataset]:
    """``{"calibration", "evaluation"}``: disjoint random draws of stdlib docstring sentences."""
    sentences = list(stdlib_sentences())
    wanted = num_calibration + num_evaluation
    if num_calibration < 1 or num_evaluation < 2 or wanted > len(sentences):
        raise ValueError(f"num_calibration={num_calibration}, num_evaluation={num_evaluation}: "
                         f"need >= 1 and >= 2, together at most {len(sentences)} sentences")
    random.Random(seed).shuffle(sentences)
    return {"calibration": SentenceDataset(sentences[:num_calibration], max_length),
            "evaluation": SentenceDataset(sentences[num_calibration:wanted], max_length)}
