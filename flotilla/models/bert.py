"""BERT-family encoders (``BertModel``: all-MiniLM, bge, e5 and other sentence-transformers models).

Composed from flotilla.layers only: token, position and token-type embeddings with a LayerNorm, then
post-norm encoder layers (bidirectional attention over each sequence, GELU MLP). Sequences run packed, with
no KV cache (``PackedSequences`` describes the batch); the output is every token's final hidden state,
which the pooler turns into sentence embeddings. Checkpoint names are Hugging Face's ``BertModel`` names
(``embeddings.*``, ``encoder.layer.N.*``); the classification ``pooler.*`` head is not loaded (sentence
embeddings never use it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flotilla.errors import ModelLoadError
from flotilla.layers.activation import get_act_fn
from flotilla.layers.attention import EncoderAttention, PackedSequences
from flotilla.layers.embedding import VocabParallelEmbedding
from flotilla.layers.layernorm import LayerNorm
from flotilla.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from flotilla.models.weights import load_named_weights


class BertEmbeddings(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, hidden, dtype)
        self.position_embeddings = VocabParallelEmbedding(config.max_position_embeddings, hidden, dtype)
        self.token_type_embeddings = VocabParallelEmbedding(config.type_vocab_size, hidden, dtype)
        self.LayerNorm = LayerNorm(hidden, config.layer_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions (T,) -> (T, hidden); every token has token type 0 (one segment)."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (T, hidden)
        x = x + self.token_type_embeddings(torch.zeros_like(input_ids))
        return self.LayerNorm(x)


class BertOutput(nn.Module):
    """Projection back to the hidden size, residual add and LayerNorm (HF ``attention.output`` with
    ``in_size`` = hidden, and the MLP's ``output`` with ``in_size`` = intermediate)."""

    def __init__(self, config, in_size: int, dtype: torch.dtype):
        super().__init__()
        self.dense = RowParallelLinear(in_size, config.hidden_size, bias=True, dtype=dtype)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)  # (T, in_size / tp) -> (T, hidden)


class BertAttention(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, heads, heads, bias=True, dtype=dtype)
        self.attn = EncoderAttention(self.qkv_proj.num_heads, head_dim, head_dim ** -0.5)
        self.output = BertOutput(config, config.hidden_size, dtype)

    def forward(self, x: torch.Tensor, layout: PackedSequences) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # (T, 3 * h * head_dim) = [q | k | v]
        return self.output(self.attn(qkv, layout), x)  # (T, hidden)


class BertLayer(nn.Module):
    """One post-norm encoder layer: x = LN(x + attn(x)); x = LN(x + W2 act(W1 x))."""

    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.attention = BertAttention(config, dtype)
        self.intermediate = BertIntermediate(config, dtype)
        self.output = BertOutput(config, config.intermediate_size, dtype)

    def forward(self, x: torch.Tensor, layout: PackedSequences) -> torch.Tensor:
        x = self.attention(x, layout)  # (T, hidden)
        return self.output(self.intermediate(x), x)  # (T, hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.dense = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True, dtype=dtype)
        try:
            self.act = get_act_fn(config.hidden_act)
        except ValueError as e:
            raise ModelLoadError(f"BertModel: {e}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # (T, intermediate / tp)


class BertEncoder(nn.Module):
    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, dtype) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, layout: PackedSequences) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, layout)
        return x  # (T, hidden)


class BertModel(nn.Module):
    """A BERT encoder over packed sequences.

    Contract: ``forward(input_ids (T,), layout) -> (T, hidden)``, the final hidden state of every token of
    the ``layout.num_seqs`` sequences packed in ``input_ids`` (each at most ``max_positions`` tokens; all
    of token type 0). ``load_weights`` takes Hugging Face ``BertModel`` names (``wants_weight`` drops the
    unused ``pooler.*`` head and the ``position_ids`` buffer) and raises ModelLoadError for anything
    missing or unknown. Only absolute position embeddings are supported (ModelLoadError otherwise).
    """

    stacked_params = [(".attention.self.query", ".attention.qkv_proj", "q"),
                      (".attention.self.key", ".attention.qkv_proj", "k"),
                      (".attention.self.value", ".attention.qkv_proj", "v")]

    def __init__(self, config, dtype: torch.dtype = torch.float32, max_model_len: int | None = None, **_):
        super().__init__()
        kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute":
            raise ModelLoadError(f"BertModel with position_embedding_type {kind!r} is not supported "
                                 f"(flotilla runs absolute position embeddings)")
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ModelLoadError("BertModel configured as a decoder is not supported (encoders only)")
        self.config = config
        self.max_positions = int(config.max_position_embeddings)
        self.embeddings = BertEmbeddings(config, dtype)
        self.encoder = BertEncoder(config, dtype)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, layout: PackedSequences) -> torch.Tensor:
        if layout.max_len > self.max_positions:
            raise ValueError(f"a sequence of {layout.max_len} tokens exceeds the model's "
                             f"{self.max_positions} positions")
        x = self.embeddings(input_ids, layout.positions)  # (T, hidden)
        return self.encoder(x, layout)  # (T, hidden)

    @staticmethod
    def wants_weight(name: str) -> bool:
        return not (name.startswith("pooler.") or name.endswith("position_ids"))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_named_weights(self, ((n, t) for n, t in weights if self.wants_weight(n)), self.stacked_params)
