"""flotilla's torch dequantization of GGUF tensors against the ``gguf`` package's ``gguf.quants.dequantize``.

The contract (``flotilla.models.loader.gguf_dequant``): float32 values bit-identical to gguf's for every type
flotilla dequantizes itself, and gguf's own values for the others. Checked on (a) random blocks, built with
``gguf.quants.quantize`` where gguf can quantize the type and as random bytes with finite fp16 scales for
every type (all bit patterns of the quants), split over several chunks; (b) real tensors of both embedded
models (SmolLM2 Q4_1/Q8_0/F32 and Qwen2.5-Coder Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0, F32), skipped when a model
is not installed.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from flotilla.models.loader import get_alias
from flotilla.models.loader import gguf_dequant
from flotilla.models.loader.gguf_dequant import TORCH_TYPES, dequantize
from flotilla.models.loader.gguf_file import open_gguf

BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
GGUF_QUANTIZES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16, T.F16]  # what gguf.quants.quantize can write

# byte offsets of the fp16 scales (d, dmin, m) inside one block of each type (ggml-common.h)
SCALE_OFFSETS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
                 T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
                 T.IQ4_NL: (0,), T.TQ2_0: (64,)}


def reference(raw: np.ndarray, qtype: T) -> torch.Tensor:
    """gguf's float32 values of the 1-D bytes ``raw``, flattened."""
    return torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, qtype), dtype=np.float32)).reshape(-1)


def assert_bit_identical(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    if not torch.equal(ours.view(torch.int32), theirs.view(torch.int32)):
        bad = (ours.view(torch.int32) != theirs.view(torch.int32)).nonzero()[:5].flatten().tolist()
        raise AssertionError(f"values differ at {bad}: ours {ours[bad].tolist()}, gguf {theirs[bad].tolist()}")


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``n_blocks`` blocks of random bytes whose fp16 scales are finite, of both signs, from 1e-4 to 1."""
    _, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for at in SCALE_OFFSETS[qtype]:
        scale = (rng.choice([-1, 1], n_blocks) * 10.0 ** rng.uniform(-4, 0, n_blocks)).astype(np.float16)
        blocks[:, at:at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 25 blocks of 32 values or 3 blocks of 256, so 76 blocks span several chunks and end in a
    chunk of one block (whose byte slices are contiguous but unaligned)."""
    monkeypatch.setattr(gguf_dequant, "_CHUNK_ELEMENTS", 3 * 256 + 40)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_identical(qtype, small_chunks):
    rng = np.random.default_rng(qtype.value)
    raw = random_blocks(qtype, 76, rng)
    ours = dequantize(torch.from_numpy(raw), qtype)
    assert_bit_identical(ours, reference(raw, qtype))
    assert ours.numel() == 76 * GGML_QUANT_SIZES[qtype][0]


@pytest.mark.parametrize("qtype", GGUF_QUANTIZES, ids=lambda t: t.name)
def test_quantized_by_gguf_bit_identical(qtype, small_chunks):
    rng = np.random.default_rng(100 + qtype.value)
    values = (rng.standard_normal((24, 512)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    values[3] = 0.0  # all-zero blocks (scale 0)
    values[5, :32] = 65504.0  # the fp16 maximum as a block's extreme
    raw = np.ascontiguousarray(gguf_quantize(values, qtype)).view(np.uint8).reshape(-1)
    ours = dequantize(torch.from_numpy(raw), qtype)
    assert_bit_identical(ours, reference(raw, qtype))
    assert ours.shape == (values.size,)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_all_non_nan_bit_patterns(qtype, small_chunks):
    """Every finite and infinite value (all of them for the 16-bit types, random ones for F32),
    subnormals included."""
    if qtype == T.F32:
        raw = np.random.default_rng(0).integers(0, 2**32, 50_000, dtype=np.uint32)
        raw = raw[~np.isnan(raw.view(np.float32))]
    else:
        raw = np.arange(2**16, dtype=np.uint16)
        as_float = raw.view(np.float16).astype(np.float32) if qtype == T.F16 else \
            (raw.astype(np.uint32) << 16).view(np.float32)
        raw = raw[~np.isnan(as_float)]
    raw = raw.view(np.uint8)
    ours = dequantize(torch.from_numpy(raw.copy()), qtype)
    assert_bit_identical(ours, reference(raw, qtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q5_0, T.F32], ids=lambda t: t.name)
def test_other_dtypes_are_the_float32_values_converted(qtype, dtype, small_chunks):
    rng = np.random.default_rng(7)
    if qtype == T.F32:
        raw = rng.standard_normal(999).astype(np.float32).view(np.uint8)
    else:
        raw = random_blocks(qtype, 9, rng)
    ours = dequantize(torch.from_numpy(raw), qtype, dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours.view(torch.int16), reference(raw, qtype).to(dtype).view(torch.int16))


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.TQ2_0], ids=lambda t: t.name)
def test_other_types_fall_back_to_gguf(qtype):
    assert qtype not in TORCH_TYPES
    raw = random_blocks(qtype, 11, np.random.default_rng(3))
    assert_bit_identical(dequantize(torch.from_numpy(raw), qtype), reference(raw, qtype))


@pytest.mark.parametrize("qtype", sorted(TORCH_TYPES, key=lambda t: t.value), ids=lambda t: t.name)
def test_bytes_at_an_odd_address(qtype, small_chunks):
    """Bytes that do not start at an aligned address (a slice of a larger buffer) give the same values."""
    raw = random_blocks(qtype, 9, np.random.default_rng(5)) if qtype in SCALE_OFFSETS else \
        np.random.default_rng(5).integers(0, 2**14, 64, dtype=np.uint16).view(np.uint8)  # finite, any width
    shifted = torch.zeros(raw.size + 1, dtype=torch.uint8)
    shifted[1:] = torch.from_numpy(raw)
    assert_bit_identical(dequantize(shifted[1:], qtype), reference(raw, qtype))


def test_partial_block_is_an_error():
    with pytest.raises(ValueError, match="Q4_K blocks of 144 bytes"):
        dequantize(torch.zeros(144 + 10, dtype=torch.uint8), T.Q4_K)


def test_result_is_a_copy_not_a_view_of_the_bytes():
    raw = np.random.default_rng(1).standard_normal(64).astype(np.float32).view(np.uint8)
    source = torch.from_numpy(raw)
    out = dequantize(source, T.F32)
    out.zero_()
    assert source.view(torch.float32).abs().sum() > 0


# --- real tensors of the embedded models -------------------------------------------------------------

def _model_file(alias: str) -> str:
    path = get_alias(alias).locate()  # never assembles: a test must not wait for that
    if path is None:
        pytest.skip(f"{alias} is not installed (./scripts/setup.sh)")
    return path


MAX_ROWS = 64  # rows read from each large tensor (whole blocks), so the reference stays fast


@pytest.mark.parametrize("alias, types", [
    ("smollm2-135m-instruct", {T.Q4_1, T.Q8_0, T.F32}),
    ("qwen2.5-coder-0.5b-instruct", {T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0, T.F32}),
])
def test_real_tensors_bit_identical(alias, types):
    """The three smallest tensors of each type in the file, whole, and the first rows of its largest."""
    reader = open_gguf(_model_file(alias))
    by_type = collections.defaultdict(list)
    for t in reader.tensors:
        by_type[t.tensor_type].append(t)
    assert set(by_type) == types
    for qtype, tensors in by_type.items():
        tensors.sort(key=lambda t: t.n_elements)
        for t in tensors[:3] + tensors[-1:]:
            rows = min(MAX_ROWS, t.n_elements // t.shape[0])
            raw = reader.raw(t)[: t.n_bytes // (t.n_elements // t.shape[0]) * rows]
            ours = dequantize(raw, qtype)
            assert ours.numel() == rows * t.shape[0], t.name
            assert_bit_identical(ours, reference(raw.numpy(), qtype))
