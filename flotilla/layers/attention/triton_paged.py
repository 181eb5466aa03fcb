"""Paged attention in Triton (the GPU backend): K/V blocks are read in place, never gathered.

One kernel serves every step: decodes, speculative verification, chunked prefill and fresh prefill. The step's
tokens are cut into *tiles* of at most ``tile_tokens`` consecutive tokens of one request (1 when every request
decodes); a program attends one tile for one KV head, so its query rows are the tile's tokens times the query
heads that share that KV head (grouped-query attention), padded to a power of two of at least 16 (``tl.dot``'s
smallest). It walks the request's keys up to the tile's last position, ``KEY_TILE`` keys per iteration (each
key's block looked up in the block table, so the tile does not depend on the block size), with a float32 online
softmax and a causal mask by absolute position (a token at position p sees keys 0..p). A decode-only step with
too few (request, KV head) programs to fill the GPU splits each request's keys into shares (flash-decoding:
``num_splits``), attended by programs of their own and combined by a second kernel.

Cache layout per layer: (2, kv_heads, num_blocks, block_size, head_dim), the PyTorch backend's, so a block of
one KV head is one contiguous (block_size, head_dim) tile. New K/V are written first by a second kernel that
skips slots < 0 (the padding rows of a CUDA graph's batch), so a request can read what its own step wrote.

Contract (``forward``): q (T, heads, head_dim), k and v (T, kv_heads, head_dim) with unit stride in head_dim
-> (T, heads * head_dim) in q's dtype. Any block size and head_dim (padded to a power of two inside the
kernel).

Tested on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``) against ``TorchPagedAttentionBackend``;
the compiled kernels run on CUDA.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flotilla import envs
from flotilla.layers.attention.backend import AttentionBackend, CommonAttentionMetadata

PREFILL_TILE_TOKENS = 16  # tokens per tile when a step has more than one token for some request
MIN_ROWS = 16  # tl.dot needs at least 16 rows
KEY_TILE = {True: 32, False: 64}  # keys per iteration, for decode-only steps and for the others


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, the CPU tests)."""
    return envs.triton_interpreted()


@dataclass
class TritonPagedMetadata:
    """One step's tiles, shared by every layer. ``tiles`` rows are per tile: request index (into
    ``block_tables``), first token row, number of tokens (0: a padding tile, skipped), position of the first
    token. The fields are tensors on the device and never read on the host in ``forward`` (CUDA-graph safe)."""

    slot_mapping: torch.Tensor  # (T,) int64, < 0: not written
    block_tables: torch.Tensor  # (R, max_blocks) int64
    tiles: torch.Tensor  # (4, num_tiles) int32: request, first token, tokens, first position
    tile_tokens: int  # the most tokens of a tile (a compile-time constant of the kernel)


def tiles_of(query_lens: torch.Tensor, context_lens: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """(4, num_tiles) int32 on the host: each request's tokens cut into tiles of at most ``tile_tokens``
    (request, first token row, tokens, first position), requests in order."""
    qlens, ctx = query_lens.to(torch.int64), context_lens.to(torch.int64)
    ntiles = (qlens + tile_tokens - 1) // tile_tokens  # (R,)
    req = torch.repeat_interleave(torch.arange(qlens.numel()), ntiles)  # (NT,)
    first_tile = torch.cumsum(ntiles, 0) - ntiles  # (R,)
    first_token = torch.cumsum(qlens, 0) - qlens  # (R,)
    offset = (torch.arange(req.numel()) - first_tile[req]) * tile_tokens  # (NT,) token offset in its request
    count = torch.clamp(qlens[req] - offset, max=tile_tokens)
    return torch.stack([req, first_token[req] + offset, count, ctx[req] + offset]).to(torch.int32)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_ch, stride_cb, stride_cs,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """Grid (T, kv_heads): token t's K and V of one head into its cache slot (skipped when the slot is < 0)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = offs_d < HEAD_DIM
        dst = h * stride_ch + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + offs_d
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + offs_d, mask=d_ok)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + offs_d, mask=d_ok)
        tl.store(k_cache_ptr + dst, k, mask=d_ok)
        tl.store(v_cache_ptr + dst, v, mask=d_ok)


@triton.jit
def _paged_attention_kernel(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                            block_tables_ptr, tile_req_ptr, tile_start_ptr, tile_len_ptr, tile_pos_ptr, scale,
                            stride_qt, stride_qh, stride_ot, stride_oh, stride_ch, stride_cb, stride_cs, stride_bt,
                            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            KEY_TILE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                            NUM_SPLITS: tl.constexpr, F32_DOT: tl.constexpr):
    """Grid (num_tiles, kv_heads, NUM_SPLITS). Row m of the program is token m // GROUP of the tile, query head
    kv_head * GROUP + m % GROUP. q/out rows (BLOCK_M, HEAD_DIM_PAD); keys and values (KEY_TILE, HEAD_DIM_PAD)
    per iteration, gathered in place from their blocks. With NUM_SPLITS > 1 (flash-decoding) program z takes the
    z-th share of the key tiles and writes its unnormalized accumulator, running max and sum to the part buffers
    (num_tiles, kv_heads, NUM_SPLITS, BLOCK_M[, HEAD_DIM_PAD]) for ``_combine_splits_kernel``; an empty share
    writes (0, -inf, 0). ``F32_DOT`` multiplies in float32 (the interpreter's half-precision ``tl.dot`` is
    wrong)."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n_tok = tl.load(tile_len_ptr + tile)
    if n_tok > 0:
        req = tl.load(tile_req_ptr + tile).to(tl.int64)
        start = tl.load(tile_start_ptr + tile).to(tl.int64)
        pos0 = tl.load(tile_pos_ptr + tile)
        offs_m = tl.arange(0, BLOCK_M)
        tok = offs_m // GROUP  # (BLOCK_M,) token of the tile
        head = kvh * GROUP + offs_m % GROUP  # (BLOCK_M,) query head
        row_ok = tok < n_tok
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = offs_d < HEAD_DIM
        q_rows = (start + tok) * stride_qt + head * stride_qh  # (BLOCK_M,)
        q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if F32_DOT:
            q = q.to(tl.float32)
        q_pos = pos0 + tok  # (BLOCK_M,) rows past the tile's tokens see every key read: finite, discarded
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM_PAD), tl.float32)
        offs_n = tl.arange(0, KEY_TILE)
        kv_len = pos0 + n_tok  # keys 0 .. kv_len - 1
        n_kv_tiles = (kv_len + KEY_TILE - 1) // KEY_TILE
        share = (n_kv_tiles + NUM_SPLITS - 1) // NUM_SPLITS
        for j in range(split * share, tl.minimum(split * share + share, n_kv_tiles)):
            k_pos = j * KEY_TILE + offs_n  # (KEY_TILE,)
            k_ok = k_pos < kv_len
            blk = tl.load(block_tables_ptr + req * stride_bt + k_pos // BLOCK_SIZE, mask=k_ok, other=0)
            rows = kvh * stride_ch + blk.to(tl.int64) * stride_cb + (k_pos % BLOCK_SIZE) * stride_cs  # (KEY_TILE,)
            kv_offs = rows[:, None] + offs_d[None, :]  # (KEY_TILE, HEAD_DIM_PAD)
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            if F32_DOT:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_M, KEY_TILE) float32
            s = tl.where((k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every row
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if NUM_SPLITS == 1:
            out = acc / l_i[:, None]
            o_rows = (start + tok) * stride_ot + head * stride_oh
            tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])
        else:
            part = ((tile * tl.num_programs(1) + kvh) * NUM_SPLITS + split) * BLOCK_M + offs_m  # (BLOCK_M,)
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc)
            tl.store(part_m_ptr + part, m_i)
            tl.store(part_l_ptr + part, l_i)


@triton.jit
def _combine_splits_kernel(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, tile_start_ptr, tile_len_ptr,
                           stride_ot, stride_oh, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                           HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Grid (num_tiles, kv_heads): the softmax-weighted sum of a tile's NUM_SPLITS partial results
    (``_paged_attention_kernel``'s part buffers) into out."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    n_tok = tl.load(tile_len_ptr + tile)
    if n_tok > 0:
        start = tl.load(tile_start_ptr + tile).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        tok = offs_m // GROUP
        head = kvh * GROUP + offs_m % GROUP
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        first = (tile * tl.num_programs(1) + kvh) * NUM_SPLITS * BLOCK_M
        parts = first + tl.arange(0, NUM_SPLITS)[:, None] * BLOCK_M + offs_m[None, :]  # (NUM_SPLITS, BLOCK_M)
        m_max = tl.max(tl.load(part_m_ptr + parts), 0)  # (BLOCK_M,) finite: share 0 holds key 0
        l_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM_PAD), tl.float32)
        for z in tl.static_range(NUM_SPLITS):
            rows = first + z * BLOCK_M + offs_m  # (BLOCK_M,)
            w = tl.exp(tl.load(part_m_ptr + rows) - m_max)  # 0 for an empty share
            l_sum += w * tl.load(part_l_ptr + rows)
            acc += w[:, None] * tl.load(part_acc_ptr + rows[:, None] * HEAD_DIM_PAD + offs_d[None, :])
        o_rows = (start + tok) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], (acc / l_sum[:, None]).to(out_ptr.dtype.element_ty),
                 mask=(tok < n_tok)[:, None] & (offs_d < HEAD_DIM)[None, :])


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v (T, kv_heads, head_dim) into caches (kv_heads, num_blocks, block_size, head_dim) at
    ``slot_mapping`` (T,) (slot = block * block_size + offset; < 0: skipped)."""
    t, kv_heads, head_dim = k.shape
    if t == 0:
        return
    _write_kv_kernel[(t, kv_heads)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[2], HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """The device's multiprocessors, asked once (not on every layer of every step); 8 off CUDA."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def num_splits(num_programs: int, device: torch.device) -> int:
    """Key shares per (tile, KV head) program for a decode-only step: enough programs to fill the GPU twice
    over (a power of two, at most 16); 1 when the step has that many programs already. Off CUDA (the
    interpreter) as for a GPU of 8 multiprocessors."""
    return max(1, min(16, triton.next_power_of_2(-(-2 * _multiprocessors(device) // max(1, num_programs)))))


def paged_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    md: TritonPagedMetadata, scale: float, splits: int | None = None) -> None:
    """out (T, heads, head_dim) = attention of q (T, heads, head_dim) over the cached keys of each token's
    request up to its own position (see the module docstring). ``splits``: key shares per program (a power of
    two; None: ``num_splits`` for decode-only steps, else 1). The choice depends only on shapes, so a captured
    CUDA graph replays it."""
    _, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[0]
    group = num_heads // kv_heads
    num_tiles = md.tiles.shape[1]
    if num_tiles == 0:
        return
    decode = md.tile_tokens == 1
    if splits is None:
        splits = num_splits(num_tiles * kv_heads, q.device) if decode else 1
    block_m = max(MIN_ROWS, triton.next_power_of_2(md.tile_tokens * group))
    dim_pad = triton.next_power_of_2(head_dim)
    parts = (num_tiles, kv_heads, splits, block_m)
    part_acc = torch.empty(*parts, dim_pad, dtype=torch.float32, device=q.device) if splits > 1 else out
    part_m = torch.empty(parts, dtype=torch.float32, device=q.device) if splits > 1 else out
    part_l = torch.empty(parts, dtype=torch.float32, device=q.device) if splits > 1 else out
    _paged_attention_kernel[(num_tiles, kv_heads, splits)](
        out, part_acc, part_m, part_l, q, k_cache, v_cache, md.block_tables, md.tiles[0], md.tiles[1], md.tiles[2],
        md.tiles[3], scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), md.block_tables.stride(0),
        GROUP=group, BLOCK_M=block_m, BLOCK_SIZE=k_cache.shape[2], KEY_TILE=KEY_TILE[decode],
        HEAD_DIM=head_dim, HEAD_DIM_PAD=dim_pad, NUM_SPLITS=splits, F32_DOT=interpreted())
    if splits > 1:
        _combine_splits_kernel[(num_tiles, kv_heads)](
            out, part_acc, part_m, part_l, md.tiles[1], md.tiles[2], out.stride(0), out.stride(1),
            GROUP=group, BLOCK_M=block_m, HEAD_DIM=head_dim, HEAD_DIM_PAD=dim_pad, NUM_SPLITS=splits)


class TritonPagedAttentionBackend(AttentionBackend):
    """The GPU attention backend (see the module docstring); ``supports_cuda_graphs``: its ``forward`` reads
    the step only from device tensors, so a decode step can be captured once and replayed."""

    supports_cuda_graphs = True

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple:
        return (2, num_kv_heads, num_blocks, block_size, head_dim)

    def build_metadata(self, common: CommonAttentionMetadata) -> TritonPagedMetadata:
        tile_tokens = 1 if common.max_query_len == 1 else PREFILL_TILE_TOKENS
        device = common.block_tables.device
        tiles = tiles_of(common.query_lens, common.context_lens, tile_tokens).to(device, non_blocking=True)
        return TritonPagedMetadata(common.slot_mapping, common.block_tables, tiles, tile_tokens)

    def forward(self, q, k, v, kv_cache, metadata: TritonPagedMetadata, scale: float) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # (kv_heads, num_blocks, block_size, head_dim)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        write_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
        paged_attention(out, q, k_cache, v_cache, metadata, scale)
        return out.view(num_tokens, num_heads * head_dim)
