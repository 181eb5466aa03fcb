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
Element-wise torch ops use torch's intra-op threads (``torch.set_num_threads``).

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
_CHUNK_ELEMENTS = 1 << 18  # values per chunk: 1 MiB of float32, the temporaries a small multiple of that


def _packed(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, k) bytes (a column slice of the blocks) -> (n, k / itemsize) of ``dtype``, from a contiguous
    copy (a slice that is already contiguous, e.g. of one block, may start at an unaligned byte)."""
    flat = b.reshape(-1)                                      # a copy unless already contiguous
    if flat.storage_offset() % dtype.itemsize:
        flat = flat.clone()
    return flat.view(dtype).view(b.shape[0], -1)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 little-endian fp16 -> (n, 1) float32 (exact)."""
    return _packed(b, torch.float16).float()


# Bit fields are unpacked a 32-bit word at a time (four bytes per element-wise op, all operands contiguous):
# torch's element-wise ops are slow on broadcasts whose innermost dimension is only a few bytes wide.

def _fields(b: torch.Tensor, groups: int, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """Split every byte of ``b`` (n, groups * g) into bit fields: (n, groups, len(shifts), g) uint8 where
    ``[i, j, k, l] = (b[i, j * g + l] >> shifts[k]) & mask`` (ggml's packing order)."""
    n = b.shape[0]
    words = _packed(b, torch.int32).view(n, groups, -1)                # (n, groups, g / 4)
    mask4 = mask * 0x01010101                                           # the mask in each byte
    parts = [(words >> s if s else words) & mask4 for s in shifts]      # each (n, groups, g / 4)
    return torch.stack(parts, dim=2).view(torch.uint8)                  # (n, groups, len(shifts), g)


def _nibbles(b: torch.Tensor, groups: int) -> torch.Tensor:
    """(n, groups * g) bytes -> (n, groups * 2 * g) uint8: per group, its g low nibbles then its g high ones."""
    return _fields(b, groups, (0, 4), 0x0F).view(b.shape[0], -1)


# byte value -> 8 bytes holding its bits 0..7, each as 0 or 16 (a fifth bit already in place), as an int64
_SPREAD_BIT4 = torch.tensor([sum(((v >> k) & 1) << (8 * k + 4) for k in range(8)) for v in range(256)],
                            dtype=torch.int64)


def _bit4_of_u32(b: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) uint8: bit j of it as 0 or 16 at position j."""
    return _SPREAD_BIT4[b.long()].view(torch.uint8)                     # (n, 4) int64 -> (n, 32)


# --- 32-value blocks ----------------------------------------------------------------------------------

def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 18): d f16, qs[16] -> (n, 32) = d * (q - 8)."""
    d = _f16(blocks[:, :2])                                   # (n, 1)
    q = _nibbles(blocks[:, 2:], 1).float() - 8                # (n, 32), small integers: exact
    return d * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 20): d f16, m f16, qs[16] -> (n, 32) = d * q + m."""
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])          # (n, 1) each
    return (d * _nibbles(blocks[:, 4:], 1).float()).add_(m)


def _q5(blocks: torch.Tensor, qh_at: int) -> torch.Tensor:
    """The 5-bit values of a Q5_0/Q5_1 block: (n, 32) uint8, low nibble | fifth bit << 4."""
    return _nibbles(blocks[:, qh_at + 4:], 1) | _bit4_of_u32(blocks[:, qh_at:qh_at + 4])


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 22): d f16, qh u32, qs[16] -> (n, 32) = d * (q - 16)."""
    return _f16(blocks[:, :2]) * (_q5(blocks, 2).float() - 16)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 24): d f16, m f16, qh u32, qs[16] -> (n, 32) = d * q + m."""
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return (d * _q5(blocks, 4).float()).add_(m)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 34): d f16, qs int8[32] -> (n, 32) = q * d."""
    return blocks[:, 2:].view(torch.int8).float() * _f16(blocks[:, :2])


# --- 256-value K-quant super-blocks -------------------------------------------------------------------

def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 84): scales[16] (4-bit scale | 4-bit min), qs[64], d f16, dmin f16 -> (n, 256)."""
    n = blocks.shape[0]
    scales = blocks[:, :16]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)        # (n, 16 sub-blocks, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _fields(blocks[:, 16:80], 2, (0, 2, 4, 6), 3)        # (n, 2, 4, 32)
    return (dl * q.view(n, 16, 16).float()).sub_(ml).view(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
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
    q = ql.view(n, 16, 16).float() - ((qh ^ 1) << 2).view(n, 16, 16).float()
    return (dl * q).view(n, QK_K)


def _k4_scales(blocks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-block factors of Q4_K/Q5_K: (n, 8, 1) d * scale and (n, 8, 1) dmin * min, from the twelve
    bytes 4..15 holding eight 6-bit scales and eight 6-bit mins."""
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    s = blocks[:, 4:16].reshape(n, 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]                   # (n, 4) each
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)   # (n, 8)
    mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1)   # (n, 8)
    return (d * sc.float()).view(n, 8, 1), (dmin * mn.float()).view(n, 8, 1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 144): d f16, dmin f16, scales[12], qs[128] -> (n, 256) = d*sc * q - dmin*m per 32 values."""
    n = blocks.shape[0]
    dl, ml = _k4_scales(blocks, n)
    q = _nibbles(blocks[:, 16:], 4)                           # (n, 256)
    return (dl * q.view(n, 8, 32).float()).sub_(ml).view(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 176): d f16, dmin f16, scales[12], qh[32], qs[128] -> (n, 256)."""
    n = blocks.shape[0]
    dl, ml = _k4_scales(blocks, n)
    ql = _nibbles(blocks[:, 48:], 4).view(n, 8, 32)
    qh = _fields(blocks[:, 16:48], 1, tuple(range(8)), 1).view(n, 8, 32)
    return (dl * (ql | (qh << 4)).float()).sub_(ml).view(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 210): ql[128], qh[64], scales int8[16], d f16 -> (n, 256) = d*scale * (q - 32) per 16 values."""
    n = blocks.shape[0]
    d = _f16(blocks[:, 208:210])                              # (n, 1)
    dl = (d * blocks[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    ql = _nibbles(blocks[:, :128], 2)                         # (n, 256): (2 halves, 2 nibbles, 64)
    qh = _fields(blocks[:, 128:192], 2, (0, 2, 4, 6), 3)     # (n, 2, 4, 32)
    q = ql | (qh.view(n, QK_K) << 4)
    return (dl * (q.view(n, 16, 16).float() - 32)).view(n, QK_K)


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float32)                              # (n, 4) bytes -> (n, 1)


def _f16_values(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float16).float()                      # (n, 2) bytes -> (n, 1)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return (b.view(torch.int16).int() << 16).view(torch.float32)  # (n, 2) -> (n, 1): the float32's high half


_BLOCK_FNS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
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
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = fn(blocks[start:start + step])
    return out.view(-1)
