"""Dequantization of GGUF tensors in torch, vectorized over all blocks of a tensor (no per-block Python).

Contract: for the block types in ``TORCH_TYPES`` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
Q4_K, Q5_K, Q6_K) ``dequantize(raw, qtype)`` returns float32 values bit-identical to
``gguf.quants.dequantize`` (the ``gguf`` package's numpy reference): the same formulas with the same
float32 operations in the same order, each a separately rounded IEEE single-precision ``*``, ``+`` or
``-`` (no fused multiply-add), and fp16 scales widened exactly. Finite and infinite values match bit for
bit; NaN stays NaN (its payload may differ). Other types (the IQ*, TQ*, MXFP4 ... families) go through
``gguf.quants.dequantize`` itself.

Work is bounded: blocks are processed in chunks of about ``_CHUNK_ELEMENTS`` values, each written (and
converted) into one preallocated result of the requested dtype, so temporaries never exceed a few chunks.
Element-wise torch ops use torch's intra-op threads (``torch.set_num_threads``). Chunks are large because each
op over a chunk is one OpenMP parallel region, and where other processes keep the cores busy every region
waits for a descheduled thread: 4M-value chunks loaded Qwen2.5-Coder-0.5B 1.3-1.5x faster than 1M-value ones
on a contended 2-core machine, and as fast on an idle one.

Block layouts follow ggml (``ggml-common.h``); ``QK_K`` = 256 values per K-quant super-block. Multi-byte
fields are read in the host's byte order, which must be little-endian like the file (x86, ARM).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

QK_K = 256
_CHUNK_ELEMENTS = 1 << 22  # values per chunk: 16 MiB of float32; temporaries are a small multiple of that


def _packed(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, k) bytes (a column slice of the blocks) -> (n, k / itemsize) of ``dtype``, from a contiguous
    copy (a slice that is already contiguous, e.g. of one block, may start at an unaligned byte)."""
    flat = b.reshape(-1)                                      # a copy unless already contiguous
    if flat.storage_offset() % dtype.itemsize:
        flat = flat.clone()
    return flat.view(dtype).view(b.shape[0], -1)


def _as(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``b`` (n, k) bytes as (n, k / itemsize) ``dtype``: a view where its offset and row stride allow one
    (the fields of most block types are aligned), else via ``_packed``."""
    size = dtype.itemsize
    if b.storage_offset() % size == 0 and b.stride(0) % size == 0 and b.stride(-1) == 1:
        return b.view(dtype)
    return _packed(b, dtype)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 little-endian fp16 -> (n, 1) float32 (exact)."""
    return _as(b, torch.float16).float()


def _u32(b: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 1) int32 with the same bits."""
    if b.storage_offset() % 4 == 0 and b.stride(0) % 4 == 0:
        return b.view(torch.int32)
    halves = _as(b, torch.int16).int()                        # (n, 2): low, high half (sign-extended)
    return (halves[:, :1] & 0xFFFF) | (halves[:, 1:] << 16)


_NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)   # (8,)


def _bits(word: torch.Tensor) -> torch.Tensor:
    """(n, 1) int32 -> (n, 32) uint8: its bit j (0 or 1) in byte j. Each 4-bit group is spread over the four
    bytes of an int32 word: x * 0x204081 puts bit i at bit 8i (the shifted copies do not overlap)."""
    groups = (word >> _NIBBLE_SHIFTS) & 0x0F                  # (n, 8)
    return ((groups * 0x204081) & 0x01010101).view(torch.uint8)  # (n, 8) int32 -> (n, 32)


# Bit fields are unpacked a 32-bit word at a time (four bytes per element-wise op, all operands contiguous):
# torch's element-wise ops are slow on broadcasts whose innermost dimension is only a few bytes wide.

def _fields(b: torch.Tensor, groups: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """Split every byte of ``b`` (n, groups * g) into bit fields: (n, groups, len(shifts), g) uint8 where
    ``[i, j, k, l] = (b[i, j * g + l] >> shifts[k]) & mask`` (ggml's packing order)."""
    n = b.shape[0]
    words = _as(b, torch.int32).view(n, groups, -1)                    # (n, groups, g / 4)
    mask4 = mask * 0x01010101                                           # the mask in each byte
    parts = [(words >> s if s else words) & mask4 for s in shifts]      # each (n, groups, g / 4)
    return torch.stack(parts, dim=2).view(torch.uint8)                  # (n, groups, len(shifts), g)


def _nibbles(b: torch.Tensor, groups: int) -> torch.Tensor:
    """(n, groups * g) bytes -> (n, groups * 2 * g) uint8: per group, its g low nibbles then its g high ones."""
    return _fields(b, groups, (0, 4), 0x0F).view(b.shape[0], -1)


# --- 32-value blocks ----------------------------------------------------------------------------------
# Each function writes the (n, block) float32 values of (n, type_size) blocks into ``out``. Integer quants
# are multiplied as integers: torch.mul promotes them to float32 exactly, so ``q * d`` is one rounding.

def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 18): d f16, qs[16] -> (n, 32) = d * (q - 8)."""
    q = _nibbles(blocks[:, 2:], 1).view(torch.int8) - 8                 # (n, 32) int8
    torch.mul(q, _f16(blocks[:, :2]), out=out)


def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 20): d f16, m f16, qs[16] -> (n, 32) = d * q + m."""
    torch.mul(_nibbles(blocks[:, 4:], 1), _f16(blocks[:, :2]), out=out)
    out.add_(_f16(blocks[:, 2:4]))


def _q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 22): d f16, qh u32, qs[16] -> (n, 32) = d * (q - 16), q = low nibble | fifth bit << 4."""
    low = _nibbles(blocks[:, 6:], 1).view(torch.int8)                   # (n, 32)
    clear = (_bits(_u32(blocks[:, 2:6])) ^ 1) << 4                      # (n, 32): 16 where the bit is 0
    q = low - clear.view(torch.int8)                                    # q - 16, in -16..15
    torch.mul(q, _f16(blocks[:, :2]), out=out)


def _q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 24): d f16, m f16, qh u32, qs[16] -> (n, 32) = d * q + m."""
    q = _nibbles(blocks[:, 8:], 1) | (_bits(_u32(blocks[:, 4:8])) << 4)  # (n, 32) uint8
    torch.mul(q, _f16(blocks[:, :2]), out=out)
    out.add_(_f16(blocks[:, 2:4]))


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 34): d f16, qs int8[32] -> (n, 32) = q * d."""
    torch.mul(blocks[:, 2:].view(torch.int8), _f16(blocks[:, :2]), out=out)


# --- 256-value K-quant super-blocks -------------------------------------------------------------------

def _q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 84): scales[16] (4-bit scale | 4-bit min), qs[64], d f16, dmin f16 -> (n, 256)."""
    n = blocks.shape[0]
    scales = blocks[:, :16]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)        # (n, 16 sub-blocks, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _fields(blocks[:, 16:80], 2, (0, 2, 4, 6), 3)        # (n, 2, 4, 32)
    torch.mul(q.view(n, 16, 16), dl, out=out.view(n, 16, 16)).sub_(ml)


def _q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 110): hmask[32], qs[64], scales[12] (6-bit, signed by -32), d f16 -> (n, 256)."""
    n = blocks.shape[0]
    d = _f16(blocks[:, 108:110])                              # (n, 1)
    low = _fields(blocks[:, 96:104], 1, (0, 4), 0x0F).view(n, 16)
    high = _fields(blocks[:, 104:108], 1, (0, 2, 4, 6), 3).view(n, 16)
    sc = (low | (high << 4)).float() - 32                     # (n, 16), integers: exact
    dl = (d * sc).view(n, 16, 1)
    ql = _fields(blocks[:, 32:96], 2, (0, 2, 4, 6), 3)       # (n, 2, 4, 32)
    qh = _fields(blocks[:, :32], 1, tuple(range(8)), 1)      # (n, 1, 8, 32)
    # the offset 4 applies where the hmask bit is 0
    q = ql.view(n, 16, 16).view(torch.int8) - ((qh ^ 1) << 2).view(n, 16, 16).view(torch.int8)  # -4..3
    torch.mul(q, dl, out=out.view(n, 16, 16))


def _k4_scales(blocks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-block factors of Q4_K/Q5_K: (n, 8, 1) d * scale and (n, 8, 1) dmin * min, from the twelve
    bytes 4..15 holding eight 6-bit scales and eight 6-bit mins."""
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    s = blocks[:, 4:16].reshape(n, 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]                   # (n, 4) each
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)   # (n, 8)
    mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1)   # (n, 8)
    return (d * sc.float()).view(n, 8, 1), (dmin * mn.float()).view(n, 8, 1)


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 144): d f16, dmin f16, scales[12], qs[128] -> (n, 256) = d*sc * q - dmin*m per 32 values."""
    n = blocks.shape[0]
    dl, ml = _k4_scales(blocks, n)
    q = _nibbles(blocks[:, 16:], 4)                           # (n, 256)
    torch.mul(q.view(n, 8, 32), dl, out=out.view(n, 8, 32)).sub_(ml)


def _q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 176): d f16, dmin f16, scales[12], qh[32], qs[128] -> (n, 256)."""
    n = blocks.shape[0]
    dl, ml = _k4_scales(blocks, n)
    ql = _nibbles(blocks[:, 48:], 4).view(n, 8, 32)
    qh = _fields(blocks[:, 16:48], 1, tuple(range(8)), 1).view(n, 8, 32)
    torch.mul(ql | (qh << 4), dl, out=out.view(n, 8, 32)).sub_(ml)


def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """(n, 210): ql[128], qh[64], scales int8[16], d f16 -> (n, 256) = d*scale * (q - 32) per 16 values."""
    n = blocks.shape[0]
    d = _f16(blocks[:, 208:210])                              # (n, 1)
    dl = (d * blocks[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    ql = _nibbles(blocks[:, :128], 2)                         # (n, 256): (2 halves, 2 nibbles, 64)
    qh = _fields(blocks[:, 128:192], 2, (0, 2, 4, 6), 3)     # (n, 2, 4, 32)
    q = (ql | (qh.view(n, QK_K) << 4)).view(torch.int8) - 32  # (n, 256) in -32..31
    torch.mul(q.view(n, 16, 16), dl, out=out.view(n, 16, 16))


def _f32(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_as(b, torch.float32))                          # (n, 4) bytes -> (n, 1)


def _f16_values(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_as(b, torch.float16))                          # (n, 2) bytes -> (n, 1), exact


def _bf16(b: torch.Tensor, out: torch.Tensor) -> None:
    bits = out.view(torch.int32)                              # (n, 2) -> (n, 1): the bf16 bits are the
    bits.copy_(_as(b, torch.int16))                           # float32's high half
    bits.bitwise_left_shift_(16)


_BLOCK_FNS: dict[T, Callable[[torch.Tensor, torch.Tensor], None]] = {
    T.F32: _f32, T.F16: _f16_values, T.BF16: _bf16,
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}

TORCH_TYPES = frozenset(_BLOCK_FNS)


def n_bytes(qtype: T, n_elements: int) -> int:
    """Bytes that ``n_elements`` values of ``qtype`` occupy; ValueError if they are not whole blocks."""
    block, size = GGML_QUANT_SIZES[qtype]
    if n_elements % block:
        raise ValueError(f"{n_elements} values are not a whole number of {qtype.name} blocks of {block}")
    return n_elements // block * size


def dequantize(raw: torch.Tensor, qtype: T, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values (1-D, a new tensor of ``dtype``) of ``raw``, the uint8 bytes (1-D) of one tensor of type
    ``qtype``.

    The float32 values are bit-identical to ``gguf.quants.dequantize`` (module docstring); another
    ``dtype`` gets them converted (``Tensor.to`` rounding) chunk by chunk, so no float32 copy of the whole
    tensor is made. Raises ValueError when ``raw`` is not a whole number of blocks and
    NotImplementedError for a type neither path can dequantize.
    """
    block, size = GGML_QUANT_SIZES[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() % size:
        raise ValueError(f"{raw.numel()} bytes of {raw.dtype} are not whole {qtype.name} blocks of {size} bytes")
    fn = _BLOCK_FNS.get(qtype)
    if fn is None:
        values = gguf_dequantize(raw.numpy(), qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(dtype)
    blocks = raw.view(-1, size)                               # (n_blocks, type_size)
    out = torch.empty(blocks.shape[0], block, dtype=dtype)    # (n_blocks, block_size)
    step = max(1, _CHUNK_ELEMENTS // block)
    # float32 is written in place; another dtype through one float32 chunk, converted as it is copied
    scratch = None if dtype == torch.float32 else torch.empty(min(step, blocks.shape[0]), block)
    for start in range(0, blocks.shape[0], step):
        chunk, dest = blocks[start:start + step], out[start:start + step]
        if scratch is None:
            fn(chunk, dest)
        else:
            fn(chunk, scratch[:chunk.shape[0]])
            dest.copy_(scratch[:chunk.shape[0]])
    return out.view(-1)
