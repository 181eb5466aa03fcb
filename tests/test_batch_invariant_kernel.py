"""The batch-invariant GEMM (flotilla/csrc/batch_invariant.cpp): accurate, and bit-identical for a row whatever the
batch around it and whichever instruction set runs.

Its contract is one float32 FMA chain per output element over a fixed order of k (bfloat16: pairs, odd element
first, denormals flushed, as AVX512-BF16's vdpbf16ps does), so the float64 reference bounds the error by K
float32 roundings of sum |x_k w_k| plus one rounding of the output.
"""

from __future__ import annotations

import pytest
import torch

from flotilla import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.fixture(scope="module")
def kernels():
    k = ops.cpu_kernels()
    if k is None:
        pytest.skip("the CPU kernel library is unavailable here (no C++ compiler, or FLOTILLA_CPU_KERNELS=0)")
    return k


def operands(m: int, k: int, n: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 64, 128), (7, 100, 65), (13, 576, 1000), (40, 17, 3)])
def test_matches_float64_reference(kernels, dtype, m, k, n):
    x, w, b = operands(m, k, n, dtype)
    packed = kernels.batch_invariant_pack(w)
    kp = k + k % 2 if dtype == torch.bfloat16 else k  # bfloat16 is packed in whole pairs
    assert packed.shape == (-(-n // 64), kp, 64) and packed.dtype == dtype
    for bias in (b, None):
        got = kernels.batch_invariant_linear(x, packed, n, bias).double()
        xd, wd = x.double(), w.double()
        ref = xd @ wd.T + (bias.double() if bias is not None else 0)
        bound = (k * 2.0 ** -24) * (xd.abs() @ wd.abs().T) + EPS[dtype] * ref.abs() + 1e-30
        assert ((got - ref).abs() <= bound).all(), float(((got - ref).abs() / bound).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_gets_the_same_bits_in_any_batch(kernels, dtype):
    x, w, b = operands(200, 96, 130, dtype, seed=1)
    packed = kernels.batch_invariant_pack(w)
    alone = torch.cat([kernels.batch_invariant_linear(x[i:i + 1], packed, 130, b) for i in range(200)])
    for m in (2, 5, 6, 7, 13, 96, 97, 200):
        got = kernels.batch_invariant_linear(x[:m], packed, 130, b)
        assert torch.equal(got, alone[:m]), m
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(2))
    assert torch.equal(kernels.batch_invariant_linear(x[perm], packed, 130, b), alone[perm])
    strided = torch.cat([x, x], dim=1)[:, :96]  # rows with a stride: same bits
    assert torch.equal(kernels.batch_invariant_linear(strided, packed, 130, b), alone)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instruction_set_gives_the_same_bits(kernels, dtype):
    x, w, b = operands(23, 77, 150, dtype, seed=3)
    packed = kernels.batch_invariant_pack(w)
    paths = {kernels.batch_invariant_path(cap): cap for cap in range(4)}  # path -> the lowest cap running it
    assert 0 in paths  # the scalar path always runs when capped to 0
    results = {path: kernels.batch_invariant_linear(x, packed, 150, b, cap) for path, cap in paths.items()}
    for path, y in results.items():
        assert torch.equal(y, results[0]), f"path {path} differs from the scalar path"


def test_bfloat16_flushes_denormals_on_every_path(kernels):
    """Products and sums below float32's normal range become 0 on every path (vdpbf16ps's DAZ/FTZ), so the paths
    still agree where that matters; other dtypes keep denormals."""
    x, w, _ = operands(9, 40, 70, torch.float32, seed=4)
    x, w = x * 1e-19, w * 1e-19  # products ~1e-38: at float32's smallest normal
    for dtype in (torch.bfloat16, torch.float32):
        packed = kernels.batch_invariant_pack(w.to(dtype))
        paths = {kernels.batch_invariant_path(cap): cap for cap in range(4)}
        results = [kernels.batch_invariant_linear(x.to(dtype), packed, 70, None, cap) for cap in paths.values()]
        assert all(torch.equal(y, results[0]) for y in results)
    assert (results[0] != 0).any() and (kernels.batch_invariant_linear(x.bfloat16(), kernels.batch_invariant_pack(
        w.bfloat16()), 70) == 0).float().mean() > 0.5


def test_bad_arguments_are_clear_errors(kernels):
    x, w, _ = operands(3, 32, 70, torch.float32)
    packed = kernels.batch_invariant_pack(w)
    with pytest.raises(RuntimeError, match="packed weight is BFloat16"):
        kernels.batch_invariant_linear(x, kernels.batch_invariant_pack(w.bfloat16()), 70)
    with pytest.raises(RuntimeError, match="features"):
        kernels.batch_invariant_linear(x[:, :31], packed, 70)
    with pytest.raises(RuntimeError, match="out_features"):
        kernels.batch_invariant_linear(x, packed, 200)
    with pytest.raises(RuntimeError, match="bias"):
        kernels.batch_invariant_linear(x, packed, 70, torch.zeros(69))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        kernels.batch_invariant_pack(w.double())
