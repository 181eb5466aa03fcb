"""The quantized-weight kernels (flotilla/csrc/quant_*.cpp) against the GGUF dequantization oracle.

- Packing: the packed layout dequantizes (C++ ``quant_dequantize`` and the eager ``dequantize_packed``) to
  exactly the float32 values of ``gguf_dequant.dequantize`` (itself bit-identical to the gguf package).
- ``quant_matmul``: every instruction-set path this CPU has (scalar, AVX2, AVX-512 VNNI; the ``isa`` cap)
  gives bit-identical results, and each lies within the activation-rounding bound of the float64 product
  with the dequantized weight: activations are rounded to int8 per block of 32 (step d = max|x| / 127) and
  their residual in steps of d' = d / 255, so |y - x @ W^T| <= sum over blocks of (d' / 2) * sum|w| (plus
  float32 accumulation, 1e-5 relative here). A row's result does not depend on the other rows (M = 1, 2, 5
  give the same bits): speculative verification relies on it.
Weights are random GGUF blocks (random bytes with finite fp16 scales: every bit pattern of the quants, Q8_0's
-128 included), 40 rows (two groups of 16 and a partial one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from flotilla import ops
from flotilla.layers.quant_weight import QuantTensor, QuantizedWeight, Segment, dequantize_packed, pack
from flotilla.models.loader.gguf_dequant import dequantize

from test_cpu_ops import kernels_or_skip
from test_gguf_dequant import assert_bit_identical, random_blocks

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
ROWS = 40


@pytest.fixture(scope="module")
def kernels():
    return kernels_or_skip()


def isa_levels() -> list[int]:
    return list(range(ops.isa_detected() + 1))


def cols_of(qtype: T) -> int:
    return 512 if GGML_QUANT_SIZES[qtype][0] == 256 else 96


def quant_tensor(qtype: T, rows: int, cols: int, seed: int) -> QuantTensor:
    block, _ = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, rows * cols // block, np.random.default_rng(seed))
    return QuantTensor(int(qtype), torch.from_numpy(raw).view(rows, -1), cols, dequantize)


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    """(m, k) float32 of varied magnitudes per block, with an all-zero block and a single spike."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, k // 32, 1, generator=g).mul(3).add(0.01).repeat_interleave(
        32, dim=1).view(m, k)
    x[0, :32] = 0.0
    x[-1, 40] = 50.0
    return x


def activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(M, N) float64: sum over blocks of (d' / 2) * sum|w|, d' = d / 255 the residual's step (its values are
    at most d / 2), plus 1e-5 of sum |x| |w| (float32 accumulation)."""
    m, k = x.shape
    d = x.double().view(m, k // 32, 32).abs().amax(-1) / 127 / 255      # (M, blocks)
    wabs = w.double().abs().view(w.shape[0], k // 32, 32).sum(-1)       # (N, blocks)
    return (d / 2) @ wabs.T * (1 + 1e-6) + 1e-5 * (x.double().abs() @ w.double().abs().T)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packed_weight_dequantizes_to_the_gguf_values(kernels, qtype):
    cols = cols_of(qtype)
    qt = quant_tensor(qtype, ROWS, cols, seed=int(qtype))
    packed = pack(qt)
    expected = dequantize(qt.data.reshape(-1), qtype).view(ROWS, cols)
    out = torch.empty(ROWS, cols)
    kernels.quant_dequantize(out, packed, int(qtype), cols, None)
    assert_bit_identical(out.view(-1), expected.view(-1))
    assert_bit_identical(dequantize_packed(packed, int(qtype), ROWS, cols).reshape(-1), expected.view(-1))
    ids = torch.tensor([39, 0, 17, 17, 5])
    rows = torch.empty(5, cols, dtype=torch.bfloat16)
    kernels.quant_dequantize(rows, packed, int(qtype), cols, ids)
    assert torch.equal(rows, expected[ids].to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="row_ids"):
        kernels.quant_dequantize(rows, packed, int(qtype), cols, torch.tensor([0, 1, 2, 3, 48]))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_paths_bit_identical_within_the_activation_bound(kernels, qtype):
    cols = cols_of(qtype)
    qt = quant_tensor(qtype, ROWS, cols, seed=10 + int(qtype))
    packed = pack(qt)
    w = dequantize(qt.data.reshape(-1), qtype).view(ROWS, cols)
    x = activations(5, cols, seed=int(qtype))
    results = {}
    for level in isa_levels():
        with ops.isa_cap(level):
            for m in (1, 2, 5):
                y = torch.empty(m, ROWS)
                kernels.quant_matmul(y, x[:m], packed, int(qtype), ROWS)
                results[level, m] = y
    first = results[0, 5]
    for (level, m), y in results.items():
        assert torch.equal(y, first[:m]), f"ISA level {ops.ISA_LEVELS[level]}, {m} rows differ from scalar"
    err = (first.double() - x.double() @ w.double().T).abs()
    bound = activation_bound(x, w)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    assert err.max() > 0  # the activations are really quantized (the bound is not vacuous)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matmul_half_precision_activations(kernels, dtype):
    """bfloat16/float16 in and out: the float32 result rounded once (x small enough for float16's range)."""
    qt = quant_tensor(T.Q4_K, ROWS, 512, seed=3)
    packed = pack(qt)
    x = (activations(3, 512, seed=4) / 1000).to(dtype)
    y = torch.empty(3, ROWS, dtype=dtype)
    kernels.quant_matmul(y, x, packed, int(T.Q4_K), ROWS)
    y32 = torch.empty(3, ROWS)
    kernels.quant_matmul(y32, x.float(), packed, int(T.Q4_K), ROWS)
    assert y32.abs().max() < 60000 and torch.equal(y, y32.to(dtype))


def test_matmul_writes_a_column_slice_and_checks_shapes(kernels):
    qt = quant_tensor(T.Q8_0, ROWS, 64, seed=5)
    packed = pack(qt)
    x = activations(2, 64, seed=6)
    wide = torch.full((2, ROWS + 8), 7.0)
    kernels.quant_matmul(wide[:, 4:4 + ROWS], x, packed, int(T.Q8_0), ROWS)
    y = torch.empty(2, ROWS)
    kernels.quant_matmul(y, x, packed, int(T.Q8_0), ROWS)
    assert torch.equal(wide[:, 4:4 + ROWS], y) and (wide[:, :4] == 7).all() and (wide[:, -4:] == 7).all()
    with pytest.raises(RuntimeError, match="packed"):
        kernels.quant_matmul(torch.empty(2, 64), x, packed, int(T.Q8_0), 64)  # 4 groups, not 3
    with pytest.raises(RuntimeError, match="GGML type"):
        kernels.quant_matmul(y, x, packed, 10, ROWS)


def test_quantized_weight_mixed_segments_and_eager_fallback(kernels):
    """A fused weight of a Q5_0 shard, dense rows and a Q8_0 shard (as a Q4_K_M q/k/v) multiplies like the
    dequantized weight, with the kernels and with them switched off (the eager reading of the layout)."""
    a, b = quant_tensor(T.Q5_0, 32, 64, seed=7), quant_tensor(T.Q8_0, 24, 64, seed=8)
    dense = torch.randn(8, 64)
    segments = [Segment(0, 32, qtype=int(T.Q5_0), packed=pack(a)), Segment(32, 40, dense=dense),
                Segment(40, 64, qtype=int(T.Q8_0), packed=pack(b))]
    qw = QuantizedWeight(64, 64, segments, torch.float32)
    w = torch.cat([a.dequantize(torch.float32), dense, b.dequantize(torch.float32)])
    assert torch.equal(qw.dequantize(), w)
    x = activations(3, 64, seed=9).view(1, 3, 64)
    y = qw.matmul(x)
    assert y.shape == (1, 3, 64)
    assert ((y[0].double() - x[0].double() @ w.double().T).abs() <= activation_bound(x[0], w)).all()
    ids = torch.tensor([63, 0, 35, 40])
    assert torch.equal(qw.embedding(ids), w[ids])
    with ops.switch_kernels(False):
        torch.testing.assert_close(qw.matmul(x), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-4)
        assert torch.equal(qw.embedding(ids), w[ids])


def test_quant_linear_one_op_with_bias(kernels):
    """``QuantizedWeight.matmul`` of one packed segment is one op (``quant_linear``): any leading shape, the
    bias added to the rounded product as eager code adds it."""
    qt = quant_tensor(T.Q4_0, 48, 64, seed=11)
    qw = QuantizedWeight(48, 64, [Segment(0, 48, qtype=int(T.Q4_0), packed=pack(qt))], torch.bfloat16)
    x = activations(6, 64, seed=12).to(torch.bfloat16).view(2, 3, 64)
    bias = torch.randn(48, dtype=torch.bfloat16)
    y = torch.empty(6, 48, dtype=torch.bfloat16)
    kernels.quant_matmul(y, x.view(6, 64), qw.segments[0].packed, int(T.Q4_0), 48)
    assert torch.equal(qw.matmul(x, bias), (y + bias).view(2, 3, 48))
    assert torch.equal(qw.matmul(x[:, :, :].transpose(0, 1)), y.view(2, 3, 48).transpose(0, 1))
