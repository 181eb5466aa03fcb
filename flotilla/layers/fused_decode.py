"""A decoder layer's decode step as one op (``torch.ops.flotilla.decode_layer``, flotilla/csrc/decode_layer.cpp).

At batch 1 a small model's step is mostly Python: a Llama layer is ~25 Python-level calls (module calls, views,
one kernel each), ~3 ms of a 135M model's step on a 2-core CPU. For a step of decodes only (every request one
token; the paged decode kernel's path), ``FusedDecodeLayer`` runs the layer's kernels in the same order on the
same tensors from C++: the same bits, one call. It applies where every linear weight is a packed
``QuantizedWeight`` (GGUF kept quantized, int4) at tensor-parallel size 1 with the CPU kernels on, to steps of
fewer rows than the weights' float copies take over at (``QuantizedWeight.dense_min_rows``); other steps and
layers take the modules' own path.
"""

from __future__ import annotations

import torch
from torch import nn

from flotilla.layers.attention.torch_paged import TorchPagedMetadata
from flotilla.ops import switched_off, use_kernels


def _linear_args(layer: nn.Module) -> tuple | None:
    """(packed segments, GGML types, row counts, bias) of a layer whose weight is wholly packed, else None."""
    qw = getattr(layer, "quant_weight", None)
    if qw is None or any(s.packed is None for s in qw.segments):
        return None
    return ([s.packed for s in qw.segments], [s.qtype for s in qw.segments],
            [s.stop - s.start for s in qw.segments], layer.bias)


class FusedDecodeLayer:
    """Binds one decoder layer's weights for ``decode_layer``; ``__call__`` returns ``(hidden, residual)`` like
    the layer's forward, or None when the step is not one it runs (then the caller runs the modules)."""

    def __init__(self, op, attn_module: nn.Module, norms: tuple[nn.Module, nn.Module], linears: list[tuple],
                 rotary: nn.Module, attention: nn.Module, dense_from: int | None = None):
        self._op = op
        self.dense_from = dense_from  # steps of at least this many rows multiply the float copies instead
        self._layer_idx = attn_module.layer_idx
        self._norm1, self._norm2 = norms
        self._linears = [x for lin in linears for x in lin]  # qkv, o, gate_up, down: 4 args each
        self._rotary = rotary
        self._attn = attention

    @classmethod
    def build(cls, input_layernorm: nn.Module, self_attn: nn.Module, post_attention_layernorm: nn.Module,
              mlp: nn.Module) -> FusedDecodeLayer | None:
        """The fused path of a Llama-family layer (``self_attn``: qkv_proj, o_proj, rotary, attn, layer_idx;
        ``mlp``: gate_up_proj, down_proj), or None where it cannot apply."""
        linears = [_linear_args(m) for m in (self_attn.qkv_proj, self_attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(lin is None for lin in linears):
            return None
        if self_attn.o_proj.tp.world_size != 1 or self_attn.qkv_proj.tp.world_size != 1:
            return None  # row-parallel layers all-reduce between the kernels
        if input_layernorm.eps != post_attention_layernorm.eps:
            return None
        op = use_kernels(self_attn.qkv_proj.quant_weight.segments[0].packed)
        if op is None or not hasattr(op, "decode_layer"):
            return None
        weights = [m.quant_weight for m in (self_attn.qkv_proj, self_attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        dense_from = min((w.dense_min_rows for w in weights if w.dense is not None), default=None)
        return cls(op.decode_layer, self_attn, (input_layernorm, post_attention_layernorm), linears,
                   self_attn.rotary, self_attn.attn, dense_from)

    def applies(self, hidden: torch.Tensor, residual: torch.Tensor | None, ctx) -> bool:
        """Whether ``run`` takes this step: decodes only, on the paged decode kernel's path, below the float
        copies' threshold. A model checks it once per step: every layer's output passes it again."""
        md = ctx.metadata
        if (switched_off() or not isinstance(md, TorchPagedMetadata) or md.decode_seq_lens is None
                or md.num_decodes != hidden.shape[0] or hidden.dim() != 2 or not hidden.is_contiguous()
                or hidden.dtype != self._norm1.weight.dtype or (residual is not None and not residual.is_contiguous())):
            return False
        # at or above the threshold the modules' path multiplies the float copies
        return self.dense_from is None or hidden.shape[0] < self.dense_from

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, ctx):
        return self.run(positions, hidden, residual, ctx) if self.applies(hidden, residual, ctx) else None

    def run(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, ctx):
        """The layer as one op, for a step ``applies`` accepted: ``(hidden, residual)`` like the layer's forward."""
        first = residual is None
        res = hidden if first else residual
        a, md = self._attn, ctx.metadata
        out = self._op(hidden, res, first, positions, self._norm1.weight, self._norm2.weight, self._norm1.eps,
                       *self._linears, self._rotary.cos_cache, self._rotary.sin_cache, ctx.kv_caches[self._layer_idx],
                       md.decode_block_tables, md.decode_seq_lens, md.slot_mapping, a.num_heads, a.num_kv_heads,
                       a.head_dim, a.scale)
        return out, res
