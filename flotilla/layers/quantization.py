"""Weight-only quantization of the linear layers (``--quantization int8`` and ``int4``) and the ``linear`` they
all go through.

``int4`` quantizes each linear weight (and the LM head) group-wise by round-to-nearest, without calibration
(no AWQ/GPTQ): groups of 32 input values, asymmetric, an fp16 scale and an fp16 minimum per group
(``w ~ d * q + m``, q in 0..15), which is exactly GGUF's Q4_1 block. So an int4 weight is a ``QuantizedWeight``
(layers/quant_weight.py) run by the same kernels as a GGUF file kept quantized: 5 bits per weight, activations
quantized to int8 per block of 32. Groups of 32 rather than AWQ/GPTQ's usual 128: a group per activation block
keeps the kernel's one float scale step per block, and the error of round-to-nearest (no calibration to make
up for it) is smaller on small groups. A layer whose input size is not a multiple of 32 stays unquantized.

After the weights are loaded, ``quantize_model_`` replaces each linear layer's weight (out, in) by int8 values
and one scale per output row (symmetric: ``scale = max|w_row| / 127``), and the LM head gets an int8 copy
(its float weight stays when it is tied to the embedding table). ``linear(x, layer)`` then multiplies with
torch's CPU weight-pack kernel (``torch_compat.int8_weight_mm``): it reads a quarter of float32's (half of
bfloat16's) weight bytes, so it helps where decode is bound by memory bandwidth (small batches); at large
batches the bfloat16 matmul is faster (benchmarks/RESULTS.md). Activations stay bfloat16 or float16: the
kernel's float32 path is slow on CPU, so ``EngineArgs`` refuses int8 with float32.

Unquantized bfloat16 weights on the CPU are instead prepacked once into oneDNN's blocked layout
(``prepack_model_``): ``F.linear`` reorders the weight on every call, which costs 15-25% at decode batch sizes
and about half the time at batch 1 (the results are bit-identical). Both use private torch ops, all of them
isolated in ``flotilla.layers.torch_compat``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from flotilla.layers import torch_compat
from flotilla.layers.batch_invariant import invariant_linear
from flotilla.layers.quant_weight import QuantizedWeight, QuantTensor, Segment, pack

logger = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("int8", "int4")
INT4_GROUP = 32
_Q4_1 = 3  # GGML type id


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 values (out, in) and per-row scales (out,) in the weight's dtype."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0  # (out,)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.to(weight.dtype)


def quantize_int4(weight: torch.Tensor) -> QuantTensor:
    """(out, in) float, ``in`` a multiple of 32 -> the GGUF Q4_1 blocks of the rounded-to-nearest weight:
    per group of 32, d = (max - min) / 15 and m = min in fp16, q = round((w - m) / d) in 0..15 (computed with
    the fp16-rounded d and m, the values the kernel multiplies with)."""
    rows, cols = weight.shape
    w = weight.float().view(rows, cols // INT4_GROUP, INT4_GROUP)            # (out, groups, 32)
    lo, hi = w.amin(-1), w.amax(-1)
    d, m = ((hi - lo) / 15).half(), lo.half()                                # (out, groups)
    step = d.float().unsqueeze(-1)
    q = torch.where(step > 0, (w - m.float().unsqueeze(-1)) / step, 0.0).round_().clamp_(0, 15).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)                                    # ggml order: j | (j + 16) << 4
    blocks = torch.cat([d.unsqueeze(-1).view(torch.uint8), m.unsqueeze(-1).view(torch.uint8), qs], dim=-1)
    return QuantTensor(_Q4_1, blocks.view(rows, -1).contiguous(), cols, _no_dequantizer)


def _no_dequantizer(raw, qtype, dtype):
    raise RuntimeError("int4 weights are read from their packed layout only")


def linear(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with the layer's quantized weight when it has one (a ``QuantizedWeight``, or int8),
    else its float weight (batch-invariantly once ``make_batch_invariant_`` marked the layer).
    x (..., in) -> (..., out)."""
    if getattr(layer, "batch_invariant", False):
        return invariant_linear(x, layer, bias)
    qw = getattr(layer, "quant_weight", None)
    if qw is not None:
        return qw.matmul(x, bias)
    qweight = getattr(layer, "qweight", None)
    if qweight is None:
        packed = getattr(layer, "packed_weight", None)
        if packed is not None and x.dtype == packed.dtype:
            lead = x.shape[:-1]
            y = torch_compat.onednn_linear(x.reshape(-1, x.shape[-1]), packed, bias)
            return y.view(*lead, y.shape[-1])
        return F.linear(x, layer.weight, bias)
    lead = x.shape[:-1]
    y = torch_compat.int8_weight_mm(x.reshape(-1, x.shape[-1]), qweight, layer.qscales)
    y = y.view(*lead, qweight.shape[0])
    return y if bias is None else y + bias


def quantize_model_(model: nn.Module, method: str) -> int:
    """Quantize every linear layer and the LM head of ``model`` in place; returns how many were quantized."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {method!r}")
    from flotilla.layers.embedding import ParallelLMHead
    from flotilla.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
    tied = {id(m.weight) for m in model.modules() if type(m).__name__ == "VocabParallelEmbedding"}
    count = 0
    for module in model.modules():
        if not isinstance(module, (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
            continue
        w = module.weight.data
        if method == "int4":
            if w.shape[1] % INT4_GROUP:
                logger.warning("int4: %s has %d inputs, not whole groups of %d: left unquantized",
                               type(module).__name__, w.shape[1], INT4_GROUP)
                continue
            module.quant_weight = QuantizedWeight(w.shape[0], w.shape[1], [
                Segment(0, w.shape[0], qtype=_Q4_1, packed=pack(quantize_int4(w)))], w.dtype)
        else:
            q, scales = quantize_int8(w)
            module.register_buffer("qweight", q, persistent=False)
            module.register_buffer("qscales", scales, persistent=False)
        if id(module.weight) not in tied:  # free the float copy unless the embedding table shares it
            module.weight = nn.Parameter(torch.empty(0, dtype=module.weight.dtype), requires_grad=False)
        count += 1
    return count


PREPACK_BATCH_HINT = 64  # oneDNN picks the blocked layout for this many rows; any row count works


def prepack_supported(dtype: torch.dtype, device: torch.device) -> bool:
    # float16 would need avx512_fp16 or avx_ne_convert, which oneDNN checks at pack time.
    return device.type == "cpu" and dtype == torch.bfloat16 and torch_compat.onednn_prepack_available()


def prepack_model_(model: nn.Module) -> int:
    """Give every unquantized CPU linear layer and LM head of ``model`` a oneDNN-prepacked copy of its weight
    (``packed_weight``), which ``linear`` then multiplies with; returns how many were packed. The float weight
    stays (the tied embedding reads it, and so can weight inspection)."""
    from flotilla.layers.embedding import ParallelLMHead
    from flotilla.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
    count = 0
    for module in model.modules():
        if not isinstance(module, (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
            continue
        w = module.weight
        quantized = getattr(module, "qweight", None) is not None or getattr(module, "quant_weight", None) is not None
        if quantized or w.dim() != 2 or not prepack_supported(w.dtype, w.device):
            continue
        packed = torch_compat.onednn_prepack(w.data, PREPACK_BATCH_HINT)
        if packed is None:  # this CPU lacks what oneDNN needs for the layout: keep F.linear
            return count
        module.packed_weight = packed
        count += 1
    return count
