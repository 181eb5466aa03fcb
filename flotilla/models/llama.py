"""Llama-architecture decoders: Llama 2/3, Mistral, Qwen2 (q/k/v bias), SmolLM2 and TinyLlama (tied
embeddings). Composed only from flotilla.layers, so tensor parallelism changes sizes, not this code; the
pipeline stage (which layers this process builds) comes from ``get_pp_group()``, never a process group."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from flotilla.distributed.parallel_state import get_pp_group
from flotilla.distributed.utils import get_pp_layer_range
from flotilla.layers.activation import SiluAndMul
from flotilla.layers.attention import Attention, AttentionContext
from flotilla.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from flotilla.layers.fused_decode import FusedDecodeLayer
from flotilla.layers.layernorm import RMSNorm
from flotilla.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from flotilla.layers.pipeline import IntermediateTensors, PPMissingLayer
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
    fused_decode: FusedDecodeLayer | None = None  # one op per decode step where it applies (enable_fused_decode)

    def __init__(self, config, layer_idx: int, dtype: torch.dtype, qkv_bias: bool, o_bias: bool,
                 rotary: RotaryEmbedding):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.self_attn = LlamaAttention(config, layer_idx, dtype, qkv_bias, o_bias, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.mlp = LlamaMLP(config, dtype, bias=bool(getattr(config, "mlp_bias", False)))

    def forward(self, positions, hidden, residual, ctx: AttentionContext):
        if self.fused_decode is not None:
            out = self.fused_decode(positions, hidden, residual, ctx)
            if out is not None:
                return out
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """The decoder stack of one pipeline stage (the whole stack at pipeline size 1).

    The stage comes from ``get_pp_group()``: the embedding exists only on the first stage, decoder layers
    only for ``[start_layer, end_layer)`` and the final norm only on the last stage; everything else is a
    parameter-free ``PPMissingLayer`` so indices and checkpoint names still line up.
    """

    def __init__(self, config, dtype: torch.dtype, qkv_bias: bool, o_bias: bool, max_positions: int,
                 pp_partition: list[int] | None = None):
        super().__init__()
        pp = get_pp_group()
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        num_layers = config.num_hidden_layers
        self.start_layer, self.end_layer = get_pp_layer_range(num_layers, pp.rank_in_group, pp.world_size,
                                                              pp_partition)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype) \
            if self.is_first_stage else PPMissingLayer("model.embed_tokens")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(head_dim, max_positions, rope_parameters(config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, dtype, qkv_bias, o_bias, rotary)
            if self.start_layer <= i < self.end_layer else PPMissingLayer(f"model.layers.{i}")
            for i in range(num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype) \
            if self.is_last_stage else PPMissingLayer("model.norm")

    def _stage_layers(self) -> list[nn.Module]:
        """This stage's decoder layers (``self.layers[start:end]`` builds a new ModuleList per call)."""
        return list(self.layers)[self.start_layer:self.end_layer]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, ctx: AttentionContext,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """First stage: embeds ``input_ids`` (T,); later stages continue from ``intermediate``.
        Returns ``IntermediateTensors`` on non-last stages, the final normed hidden (T, hidden) on the last.
        """
        if self.is_first_stage:
            hidden, residual = self.embed_tokens(input_ids), None  # (T, hidden)
        elif intermediate is None:
            raise ValueError("a non-first pipeline stage needs the previous stage's IntermediateTensors")
        else:
            hidden, residual = intermediate.hidden, intermediate.residual  # (T, hidden) each
        layers = self._stage_layers()
        fused = [getattr(layer, "fused_decode", None) for layer in layers]  # None: a streamed (offloaded) layer
        if layers and None not in fused and len({f.dense_from for f in fused}) == 1 \
                and fused[0].applies(hidden, residual, ctx):
            for layer in fused:  # decodes only: one op per layer, no module calls
                hidden, residual = layer.run(positions, hidden, residual, ctx)
        else:
            for layer in layers:
                hidden, residual = layer(positions, hidden, residual, ctx)
        if not self.is_last_stage:
            return IntermediateTensors(hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden  # (T, hidden)


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over the paged KV cache, or one pipeline stage of it.

    Contract: ``forward(input_ids (T,), positions (T,), ctx, intermediate=None)`` returns the final hidden
    (T, hidden) on the last pipeline stage and ``IntermediateTensors`` on the others (non-first stages
    need the previous stage's ``intermediate``; only the first stage reads ``input_ids``).
    ``compute_logits(hidden (N, hidden)) -> (N, vocab)`` in float32, last stage only. ``load_weights``
    takes Hugging Face parameter names, skips what ``wants_weight`` rejects and routes each tensor through
    its parameter's ``weight_loader``. ``ctx.kv_caches`` must hold a cache for every index in
    ``local_layer_indices`` (and needs none for the other stages' layers). ``pp_partition`` optionally
    gives the layer count of each pipeline stage (default: even split, see ``get_pp_layer_range``).
    """

    qkv_bias = False
    # HF checkpoint name fragment -> (our fused parameter fragment, shard id)
    stacked_params = [(".q_proj", ".qkv_proj", "q"), (".k_proj", ".qkv_proj", "k"), (".v_proj", ".qkv_proj", "v"),
                      (".gate_proj", ".gate_up_proj", 0), (".up_proj", ".gate_up_proj", 1)]

    def __init__(self, config, dtype: torch.dtype = torch.float32, max_model_len: int | None = None,
                 pp_partition: list[int] | None = None):
        super().__init__()
        self.config = config
        attention_bias = bool(getattr(config, "attention_bias", False))
        max_positions = max_model_len or config.max_position_embeddings
        self.model = LlamaModel(config, dtype, qkv_bias=self.qkv_bias or attention_bias, o_bias=attention_bias,
                                max_positions=max_positions, pp_partition=pp_partition)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.model.is_last_stage:
            # Tied on a last stage that is not also first: the head is its own copy of the embedding.
            tied = self.model.embed_tokens if self.tie_word_embeddings and self.model.is_first_stage else None
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype, tied_to=tied)
        else:
            self.lm_head = PPMissingLayer("lm_head")

    @property
    def local_layer_indices(self) -> range:
        """Global indices of the decoder layers this pipeline stage runs (and needs KV caches for)."""
        return range(self.model.start_layer, self.model.end_layer)

    @property
    def is_first_stage(self) -> bool:
        return self.model.is_first_stage

    @property
    def is_last_stage(self) -> bool:
        return self.model.is_last_stage

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, ctx: AttentionContext,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, ctx, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # (N, vocab)

    def wants_weight(self, name: str) -> bool:
        """Whether this stage needs checkpoint tensor ``name`` (HF naming); a predicate for
        ``iterate_weights_filtered`` so the other stages' tensors are never read."""
        if "rotary_emb.inv_freq" in name:
            return False
        m = _LAYER_NAME.match(name)
        if m:
            return self.model.start_layer <= int(m.group(1)) < self.model.end_layer
        if name.startswith("model.embed_tokens."):
            return self.is_first_stage or (self.is_last_stage and self.tie_word_embeddings)
        if name.startswith("model.norm."):
            return self.is_last_stage
        if name.startswith("lm_head."):
            return self.is_last_stage and not self.tie_word_embeddings
        return True  # unknown: let load_named_weights report it

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_named_weights(self, self._stage_weights(weights), self.stacked_params)

    def enable_fused_decode(self) -> int:
        """Give each local decoder layer whose linear weights are all packed quantized weights its one-op decode
        path (layers/fused_decode.py); returns how many layers got one. Streamed (offloaded) layers get none."""
        count = 0
        for i in self.local_layer_indices:
            layer = self.model.layers[i]
            if not isinstance(layer, LlamaDecoderLayer):
                continue  # a streamed (offloaded) layer (models/offload.py): its weights come and go, no fused path
            layer.fused_decode = FusedDecodeLayer.build(layer.input_layernorm, layer.self_attn,
                                                        layer.post_attention_layernorm, layer.mlp)
            count += layer.fused_decode is not None
        return count

    def _stage_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        """The tensors this stage owns; with tied embeddings on a last stage that is not first, the
        embedding is loaded into the LM head."""
        head_from_embedding = self.tie_word_embeddings and self.is_last_stage and not self.is_first_stage
        for name, tensor in weights:
            if not self.wants_weight(name):
                continue
            if head_from_embedding and name == "model.embed_tokens.weight":
                name = "lm_head.weight"
            yield name, tensor


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama with biases on q, k and v."""

    qkv_bias = True


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the Llama architecture (sliding window is handled by capping max_model_len)."""
