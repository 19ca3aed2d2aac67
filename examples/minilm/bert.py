"""A plain-torch BERT encoder with mean pooling: the all-MiniLM-L6-v2 architecture.

Every projection is an ``nn.Linear``, so the quantizer sees 6 x (query, key, value,
attention output, feed-forward in, feed-forward out) = 36 Linear layers. BERT's pooler
(``[CLS]`` dense + tanh) is not part of a sentence-transformers embedding and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MASK_BIAS = -1e4  # added to the attention scores of padding tokens


@dataclass(frozen=True)
class BertShape:
    """The sizes of a BERT encoder (the values of all-MiniLM-L6-v2's ``config.json``)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class BertEmbeddings(nn.Module):
    """Word + position + token-type (always type 0) embeddings, then LayerNorm."""

    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.word = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.position = nn.Embedding(shape.max_positions, shape.hidden_size)
        self.token_type = nn.Embedding(shape.type_vocab_size, shape.hidden_size)
        self.norm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return self.norm(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate query/key/value/output Linear layers."""

    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        h = shape.hidden_size
        self.num_heads = shape.num_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.output = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._heads(proj(x)) for proj in (self.query, self.key, self.value))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias)
        return self.output(context.transpose(1, 2).flatten(2))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2)


class EncoderLayer(nn.Module):
    """Post-norm transformer layer: attention, add & norm, GELU feed-forward, add & norm."""

    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.attention = SelfAttention(shape)
        self.attention_norm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)
        self.ffn_in = nn.Linear(shape.hidden_size, shape.intermediate_size)
        self.ffn_out = nn.Linear(shape.intermediate_size, shape.hidden_size)
        self.ffn_norm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, mask_bias))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class SentenceEncoder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation.

    ``forward(input_ids=[B, L] int64, attention_mask=[B, L] int64) -> [B, hidden]``.
    """

    def __init__(self, shape: BertShape | None = None) -> None:
        super().__init__()
        shape = shape or BertShape()
        self.embeddings = BertEmbeddings(shape)
        self.layers = nn.ModuleList(EncoderLayer(shape) for _ in range(shape.num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask_bias = _mask_bias(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, mask_bias)
        return F.normalize(_mean_pool(x, attention_mask), dim=-1)


def _mask_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, 1, L]`` additive bias: 0 for tokens, ``MASK_BIAS`` for padding (its softmax
    weight is exactly 0 in float32 and float16; a constant, not ``torch.finfo(dtype).min``,
    so that torch.fx can trace the model)."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * MASK_BIAS


def _mean_pool(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
