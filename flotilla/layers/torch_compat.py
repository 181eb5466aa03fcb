"""Every private torch API flotilla's layers use, in one place (written against torch 2.13).

torch has no public op for either job below; each function names the private op it calls, why, and what
happens when the op is gone (a warning once, and a public fallback that gives the same result, slower).
``tests/test_torch_compat.py`` checks each op against a float reference and fails when one changes.

- ``int8_weight_mm``: ``torch._weight_int8pack_mm`` (aten), weight-only int8 matmul on the CPU.
- ``onednn_prepack`` / ``onednn_linear``: ``torch.ops.mkldnn._reorder_linear_weight`` and
  ``torch.ops.mkldnn._linear_pointwise``, a linear layer over a weight prepacked once in oneDNN's layout.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_CPU_LACKS_SUPPORT = "needs the cpu support"  # oneDNN's message when this CPU cannot run the bf16 path


@functools.cache
def _warn_missing(api: str, fallback: str) -> None:
    logger.warning("torch %s has no %s (a private op flotilla uses): %s", torch.__version__, api, fallback)


def int8_weight_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight * scales[:, None]).T``: x (n, in) bfloat16/float16, qweight (out, in) int8, scales
    (out,) in x's dtype -> (n, out) in x's dtype.

    Private: ``torch._weight_int8pack_mm`` (torch's CPU kernel behind torchao's int8 weight-only
    quantization; torch has no public int8-weight matmul). It reads the int8 weight directly, a quarter of
    float32's bytes, which is the point of ``--quantization int8``.
    Missing: a warning once, then a public fallback (dequantize, ``F.linear``, scale): the same result,
    without the memory-bandwidth saving.
    """
    op = getattr(torch, "_weight_int8pack_mm", None)
    if op is not None:
        return op(x.contiguous(), qweight, scales)
    _warn_missing("torch._weight_int8pack_mm", "int8 layers dequantize on every call (slower)")
    return F.linear(x, qweight.to(x.dtype)) * scales


def onednn_prepack_available() -> bool:
    """Whether this torch has oneDNN and the private ops of ``onednn_prepack`` / ``onednn_linear``."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"):
        return True
    _warn_missing("torch.ops.mkldnn._reorder_linear_weight/_linear_pointwise", "bfloat16 linears use F.linear")
    return False


def onednn_prepack(weight: torch.Tensor, batch_hint: int) -> torch.Tensor | None:
    """``weight`` (out, in) bfloat16 reordered once into oneDNN's blocked layout for about ``batch_hint``
    rows (any row count works later), or None when this CPU or torch cannot (then use ``F.linear``).

    Private: ``torch.ops.mkldnn._reorder_linear_weight`` (what inductor's CPU freezing pass uses; no public
    op prepacks a dense weight). ``F.linear`` reorders the weight on every call, which costs 15-25% at
    decode batch sizes and about half the time at batch 1.
    Missing, or failing for another reason than this CPU lacking bf16 support: a warning, and None.
    """
    if not onednn_prepack_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
    except RuntimeError as e:
        if _CPU_LACKS_SUPPORT not in str(e):
            logger.warning("torch.ops.mkldnn._reorder_linear_weight failed (%s): bfloat16 linears use F.linear",
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with a weight from ``onednn_prepack``: x (n, in) -> (n, out); bit-identical to
    ``F.linear`` over the unpacked weight.

    Private: ``torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")`` (no post-op), the op inductor
    emits for a prepacked linear. Only called with a weight ``onednn_prepack`` returned, so the op exists.
    """
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
