"""The private torch ops of ``flotilla.layers.torch_compat``, checked against float references.

These fail when torch changes an op flotilla relies on (gone, renamed, other arguments or other results),
and check the public fallback each op has when it is missing.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from flotilla.layers import torch_compat
from flotilla.layers.quantization import quantize_int8

ROWS = (1, 5, 64, 130)  # decode-sized and prefill-sized batches


def _reference_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (q * scales)^T in float64: the exact product of the values the kernel is given."""
    return x.double() @ (q.double() * scales.double()[:, None]).T


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-3), (torch.float16, 2e-3)])
def test_weight_int8pack_mm_matches_the_float_reference(dtype, tol):
    assert callable(getattr(torch, "_weight_int8pack_mm", None)), \
        f"torch {torch.__version__} has no torch._weight_int8pack_mm: int8 layers now dequantize on every call"
    g = torch.Generator().manual_seed(0)
    q, scales = quantize_int8(torch.randn(40, 96, generator=g).to(dtype))  # (out, in) int8, (out,)
    for n in ROWS:
        x = torch.randn(n, 96, generator=g).to(dtype)  # (n, in)
        y = torch_compat.int8_weight_mm(x, q, scales)  # (n, out)
        assert y.shape == (n, 40) and y.dtype == dtype
        ref = _reference_int8(x, q, scales)
        # Float accumulation, then one rounding to bf16/fp16 (about 2^-8 / 2^-11 of the largest output).
        assert (y.double() - ref).abs().max() <= tol * ref.abs().max(), (n, (y.double() - ref).abs().max())


def test_int8_fallback_without_the_private_op(monkeypatch, caplog):
    g = torch.Generator().manual_seed(1)
    q, scales = quantize_int8(torch.randn(24, 64, generator=g).to(torch.bfloat16))
    x = torch.randn(7, 64, generator=g).to(torch.bfloat16)
    private = torch_compat.int8_weight_mm(x, q, scales)
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    torch_compat._warn_missing.cache_clear()
    with caplog.at_level(logging.WARNING, logger=torch_compat.__name__):
        fallback = torch_compat.int8_weight_mm(x, q, scales)
    assert "torch._weight_int8pack_mm" in caplog.text
    ref = _reference_int8(x, q, scales)
    assert (fallback.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert (fallback.double() - private.double()).abs().max() <= 1e-2 * ref.abs().max()


def _prepack_or_skip(w: torch.Tensor) -> torch.Tensor:
    assert torch_compat.onednn_prepack_available(), \
        f"torch {torch.__version__} lost torch.ops.mkldnn._reorder_linear_weight or _linear_pointwise"
    packed = torch_compat.onednn_prepack(w, 64)
    if packed is None:
        try:  # why: only a CPU without oneDNN's bf16 support may refuse
            torch.ops.mkldnn._reorder_linear_weight(w, 64)
        except RuntimeError as e:
            if "needs the cpu support" in str(e):
                pytest.skip(f"this CPU cannot run oneDNN's bf16 path: {e}")
            raise
        pytest.fail("onednn_prepack returned None although the op works")
    return packed


@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_prepacked_linear_is_bit_identical_to_f_linear(with_bias):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 80, generator=g).to(torch.bfloat16)  # (out, in)
    bias = torch.randn(48, generator=g).to(torch.bfloat16) if with_bias else None
    packed = _prepack_or_skip(w)
    for n in ROWS:
        x = torch.randn(n, 80, generator=g).to(torch.bfloat16)  # (n, in)
        y = torch_compat.onednn_linear(x, packed, bias)  # (n, out)
        assert y.shape == (n, 48) and y.dtype == torch.bfloat16
        assert torch.equal(y, F.linear(x, w, bias)), n
        ref = x.double() @ w.double().T + (bias.double() if with_bias else 0)
        assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max(), n


def test_prepack_falls_back_without_the_private_ops(monkeypatch, caplog):
    monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace())
    torch_compat._warn_missing.cache_clear()
    with caplog.at_level(logging.WARNING, logger=torch_compat.__name__):
        assert torch_compat.onednn_prepack(torch.randn(8, 16).to(torch.bfloat16), 64) is None
    assert "_reorder_linear_weight" in caplog.text
