"""Llama-architecture decoders: Llama 2/3, Mistral, Qwen2 (q/k/v bias), SmolLM2 and TinyLlama (tied
embeddings). Composed only from flotilla.layers, so tensor parallelism changes sizes, not this code."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flotilla.layers.activation import SiluAndMul
from flotilla.layers.attention import Attention, AttentionContext
from flotilla.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from flotilla.layers.layernorm import RMSNorm
from flotilla.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from flotilla.layers.rotary import RotaryEmbedding, rope_parameters
from flotilla.models.weights import load_named_weights


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, qkv_bias: bool, o_bias: bool,
                 rotary: RotaryEmbedding):
        super().__init__()
        self.layer_idx = layer_idx
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads, num_kv,
                                          bias=qkv_bias, dtype=dtype)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.head_dim = head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=o_bias,
                                        dtype=dtype)
        self.rotary = rotary  # shared by all layers
        self.attn = Attention(self.num_heads, head_dim, self.num_kv_heads, head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, (h + 2 * kvh) * head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, ctx.kv_caches[self.layer_idx], ctx.metadata, ctx.backend)  # (T, h * head_dim)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype, bias: bool = False):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias, dtype=dtype)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias, dtype=dtype)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))  # (T, hidden)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, qkv_bias: bool, o_bias: bool,
                 rotary: RotaryEmbedding):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.self_attn = LlamaAttention(config, layer_idx, dtype, qkv_bias, o_bias, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.mlp = LlamaMLP(config, dtype, bias=bool(getattr(config, "mlp_bias", False)))

    def forward(self, positions, hidden, residual, ctx: AttentionContext):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, dtype: torch.dtype, qkv_bias: bool, o_bias: bool, max_positions: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(head_dim, max_positions, rope_parameters(config))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, dtype, qkv_bias, o_bias, rotary)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids, positions, ctx: AttentionContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # (T, hidden)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden  # (T, hidden)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over the paged KV cache.

    Contract: ``forward(input_ids (T,), positions (T,), ctx) -> hidden (T, hidden)``;
    ``compute_logits(hidden (N, hidden)) -> (N, vocab)`` in float32; ``load_weights`` takes Hugging Face
    parameter names and routes each tensor through its parameter's ``weight_loader``.
    """

    qkv_bias = False
    # HF checkpoint name fragment -> (our fused parameter fragment, shard id)
    stacked_params = [(".q_proj", ".qkv_proj", "q"), (".k_proj", ".qkv_proj", "k"), (".v_proj", ".qkv_proj", "v"),
                      (".gate_proj", ".gate_up_proj", 0), (".up_proj", ".gate_up_proj", 1)]

    def __init__(self, config, dtype: torch.dtype = torch.float32, max_model_len: int | None = None):
        super().__init__()
        self.config = config
        attention_bias = bool(getattr(config, "attention_bias", False))
        max_positions = max_model_len or config.max_position_embeddings
        self.model = LlamaModel(config, dtype, qkv_bias=self.qkv_bias or attention_bias, o_bias=attention_bias,
                                max_positions=max_positions)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        tied = self.model.embed_tokens if self.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype, tied_to=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # (N, vocab)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ("rotary_emb.inv_freq",)
        if self.tie_word_embeddings:
            skip = skip + ("lm_head.weight",)
        return load_named_weights(self, weights, self.stacked_params, skip)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama with biases on q, k and v."""

    qkv_bias = True


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the Llama architecture (sliding window is handled by capping max_model_len)."""
