"""Batch-invariant execution (``--batch-invariant``): every per-token result independent of the rest of the batch.

By default a token's logits depend, at rounding level, on what else runs in its step: oneDNN/MKL pick the matmul
blocking (and so the reduction order) from the number of rows M, attention takes different paths for fresh
prefills, cached-context chunks and decodes, and chunked prefill splits a prompt by the step's token budget.
In batch-invariant mode, set up once at load by ``make_batch_invariant_(model)``:

- every linear layer and the LM head multiply with ``torch.ops.flotilla.batch_invariant_linear``
  (flotilla/csrc/batch_invariant.cpp: one float32 FMA chain per output element, k = 0..K-1 in order, whatever
  M, the row's position, the thread count or the instruction set), on weights packed once at load. Without the
  kernel library every row is multiplied alone (an ``F.linear`` call of shape (1, K) whatever the batch);
- a row-parallel layer's partial sums are all-gathered and added in rank order (``ordered_all_reduce``) rather
  than by the backend's all-reduce, whose order can depend on the message size;
- attention treats every query token as a decode of its own sequence length (position + 1), see
  ``flotilla/layers/attention/tokenwise.py``;
- RMSNorm and SwiGLU run row by row when their fused kernels are unavailable (the fused kernels already work
  one row at a time; RoPE and the residual adds are elementwise, exact in any batch).

The cost is measured in benchmarks/RESULTS.md. Nothing here changes the default mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flotilla.ops import cpu_kernels, use_kernels


def make_batch_invariant_(model: nn.Module) -> int:
    """Switch every linear layer, LM head, RMSNorm and SwiGLU of ``model`` to batch-invariant execution; with
    the kernel library, pack each linear weight for ``batch_invariant_linear`` (a second copy of the weights: the
    originals stay for the tied embedding and the eager path). Returns how many weights were packed."""
    from flotilla.layers.activation import SiluAndMul
    from flotilla.layers.embedding import ParallelLMHead
    from flotilla.layers.layernorm import RMSNorm
    from flotilla.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
    linear_types = (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear, ParallelLMHead)
    count = 0
    for module in model.modules():
        if isinstance(module, linear_types):
            if getattr(module, "qweight", None) is not None:
                raise ValueError("batch-invariant execution cannot run int8-quantized layers")
            module.batch_invariant = True
            w = module.weight
            ops = cpu_kernels() if w.device.type == "cpu" else None
            if ops is not None:
                module.bi_packed = ops.batch_invariant_pack(w.data)  # (ceil(out / 64), in, 64)
                count += 1
        elif isinstance(module, (RMSNorm, SiluAndMul)):
            module.batch_invariant = True
    return count


def invariant_linear(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ layer.weight^T (+ bias)`` with each row's result independent of the other rows.
    x (..., in) -> (..., out)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    if x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = layer.weight  # (out, in)
    packed = getattr(layer, "bi_packed", None)
    ops = use_kernels(x2) if packed is not None and packed.dtype == x2.dtype else None
    if ops is not None:
        y = ops.batch_invariant_linear(x2, packed, weight.shape[0], bias)  # (M, out)
    else:
        y = per_row(lambda row: F.linear(row, weight, bias), x2)
    return y.view(*lead, weight.shape[0])


def per_row(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to each row of x (M, ...) as its own (1, ...) tensor in fresh memory, so every row runs the
    same computation (shape and alignment) whatever the batch; the results stacked back (M, ...)."""
    if x.shape[0] == 1:
        return fn(x.clone())
    return torch.cat([fn(x[i:i + 1].clone()) for i in range(x.shape[0])]) if x.shape[0] else fn(x)


def ordered_all_reduce(group, y: torch.Tensor) -> torch.Tensor:
    """The sum of ``y`` over the ranks of ``group``, added in rank order in float32 and rounded once (every rank
    gets the same bits, for any shape of y). A plain all-reduce may order the sum by the message size."""
    if group.world_size == 1:
        return y
    parts = group.all_gather(y.unsqueeze(0), dim=0)  # (ranks, ...)
    total = parts[0].float()
    for part in parts[1:]:
        total = total + part.float()
    return total.to(y.dtype)
