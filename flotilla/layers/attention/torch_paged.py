"""Paged attention in plain PyTorch (CPU, or any device): gather each request's blocks, then attend.

Decodes (one query token) run in the fused CPU kernel that reads the cache blocks in place (flotilla/ops.py),
as do steps of short chunks on cached context (speculative verification), token by token; without the kernel
decodes run as two batched matmuls over (kv_heads, num_decodes) with a float32 softmax in between. A prefill
with no cached context attends causally over its own K/V (one SDPA call per request: it skips the masked half);
prefill chunks on cached context run as one batched SDPA over queries padded to the longest chunk, with a causal
mask offset by each request's cached context. No Python loop over tokens on the hot path.

In batch-invariant mode (``TorchPagedAttentionBackend(batch_invariant=True)``) every token attends as a decode of
its own sequence instead (attention/tokenwise.py), so its result does not depend on the path it would take.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flotilla.layers.attention.backend import AttentionBackend, CommonAttentionMetadata
from flotilla.layers.attention.tokenwise import TokenwiseMetadata, build_tokenwise_metadata, tokenwise_attention
from flotilla.ops import use_kernels


DECODE_GROUP_MIN = 16  # decodes per length group (fewer groups when the batch is small)
SHORT_CHUNK_MAX = 16  # steps of chunks up to this long on cached context run as decodes (fused kernel only)
DECODE_GROUPS_MAX = 4


@dataclass
class DecodeGroup:
    """Decodes of similar length attended together, so short sequences are not padded to the longest."""

    index: torch.Tensor | None  # (n,) positions among the step's decodes; None = all of them, in order
    block_tables: torch.Tensor  # (n, nblk) blocks up to the group's longest sequence
    bias: torch.Tensor  # (n, 1, L) float32, 0 = attend, -inf = masked


@dataclass
class TorchPagedMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,)
    num_decodes: int
    decode_groups: list[DecodeGroup]  # eager path only (empty when the fused kernel attends the decodes)
    decode_block_tables: torch.Tensor | None  # (num_decodes, max_blocks), fused kernel path
    decode_seq_lens: torch.Tensor | None  # (num_decodes,) int64, fused kernel path
    prefill_fresh: list  # (start row among the prefill tokens, length) of each prefill with no cached context
    # Prefills on cached context (P' of them), attended together over their gathered blocks:
    prefill_block_tables: torch.Tensor | None  # (P', max_blocks)
    prefill_gather: torch.Tensor | None  # (P', Qmax) row index into the prefill tokens
    prefill_valid: torch.Tensor | None  # (P' * Qmax,) bool, rows that are real tokens
    prefill_rows: torch.Tensor | None  # (valid rows,) where each real row goes among the prefill tokens
    prefill_mask: torch.Tensor | None  # (P', 1, Qmax, L) bool, True = attend
    prefill_seq_len: int  # L for the cached-context prefills (max blocks * block_size, trimmed)
    gather_rows: dict = field(default_factory=dict)  # (which, kv_heads, num_blocks) -> flat cache rows, per step


class TorchPagedAttentionBackend(AttentionBackend):
    """The CPU attention backend. Cache layout per layer: (2, kv_heads, num_blocks, block_size, head_dim), so
    gathering a request's blocks yields each head's keys contiguous along the sequence. ``batch_invariant``
    attends every token alone (see the module docstring)."""

    def __init__(self, batch_invariant: bool = False):
        self.batch_invariant = batch_invariant

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple:
        return (2, num_kv_heads, num_blocks, block_size, head_dim)

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchPagedMetadata | TokenwiseMetadata:
        if self.batch_invariant:
            return build_tokenwise_metadata(common)
        d = common.num_decodes
        bs = common.block_size
        device = common.block_tables.device
        if d < common.query_lens.numel() and use_kernels(common.block_tables) is not None:
            rows = self._short_chunks_as_decodes(common)
            if rows is not None:
                return TorchPagedMetadata(common.slot_mapping, int(rows[1].numel()), [], *rows, [], None, None, None,
                                          None, None, 0)
        seq_lens = common.seq_lens.to(device)
        fused = d and use_kernels(common.block_tables) is not None
        groups = self._build_decode_groups(common.seq_lens[:d], common.block_tables[:d], bs, device) \
            if d and not fused else []
        tables, lens = (common.block_tables[:d], seq_lens[:d].contiguous()) if fused else (None, None)
        pre = self._build_prefill(common)
        return TorchPagedMetadata(common.slot_mapping, d, groups, tables, lens, *pre)

    @staticmethod
    def _short_chunks_as_decodes(common: CommonAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A step whose every request computes at most SHORT_CHUNK_MAX tokens on cached context (speculative
        verification: 1 + k tokens; a draft model's catch-up) attends each token as a decode of its own prefix
        in the fused kernel, which reads the blocks in place: (block tables (T, max_blocks), sequence lengths
        (T,) int64), row t of request i seeing context_lens[i] + j + 1 positions for its j-th token (the step's
        keys and values are written first). None for other steps. Decode layers then run as one op too
        (layers/fused_decode.py), and a verified token's attention is computed as its decode would be."""
        d, qlens = common.num_decodes, common.query_lens
        if int(qlens.max()) > SHORT_CHUNK_MAX or not bool((common.context_lens[d:] > 0).all()):
            return None
        req = torch.repeat_interleave(torch.arange(qlens.numel()), qlens)  # (T,) request of each token
        first = torch.cumsum(qlens, 0) - qlens  # (B,) each request's first token
        lens = common.context_lens[req] + (torch.arange(req.numel()) - first[req]) + 1  # (T,)
        device = common.block_tables.device
        return common.block_tables[req.to(device)], lens.to(device=device, dtype=torch.int64).contiguous()

    @staticmethod
    def _build_decode_groups(seq_lens: torch.Tensor, block_tables: torch.Tensor, bs: int, device) -> list:
        """Split the decodes, sorted by length, into up to DECODE_GROUPS_MAX groups of equal size: each is
        gathered and attended only up to its own longest sequence."""
        d = seq_lens.numel()
        num_groups = max(1, min(DECODE_GROUPS_MAX, d // DECODE_GROUP_MIN))
        if num_groups == 1:
            parts = [None]
        else:
            order = torch.argsort(seq_lens, stable=True)
            parts = list(torch.tensor_split(order, num_groups))
        groups = []
        for index in parts:
            lens = seq_lens if index is None else seq_lens[index]
            tables = block_tables if index is None else block_tables[index]
            nblk = -(-int(lens.max()) // bs)
            keys = torch.arange(nblk * bs, device=device)
            visible = keys[None, :] < lens.to(device)[:, None]  # (n, L)
            bias = torch.zeros(visible.shape, dtype=torch.float32, device=device).masked_fill_(
                ~visible, float("-inf"))[:, None, :]  # (n, 1, L) additive bias
            groups.append(DecodeGroup(None if index is None else index.to(device), tables[:, :nblk], bias))
        return groups

    @staticmethod
    def _build_prefill(common: CommonAttentionMetadata):
        """Fresh prefills (no cached context) attend causally on their own K/V, one SDPA call each; requests
        with cached context (a later chunk, a prefix-cache hit) gather their blocks, padded to the longest
        query with an explicit mask."""
        d, bs = common.num_decodes, common.block_size
        p = common.query_lens.numel() - d
        if p == 0:
            return [], None, None, None, None, None, 0
        device = common.block_tables.device
        qlens_l, ctx_l = common.query_lens[d:].tolist(), common.context_lens[d:].tolist()
        starts_l = [0] * p
        for i in range(1, p):
            starts_l[i] = starts_l[i - 1] + qlens_l[i - 1]
        fresh = [(starts_l[i], qlens_l[i]) for i in range(p) if ctx_l[i] == 0]
        cached = [i for i in range(p) if ctx_l[i] > 0]
        if not cached:
            return fresh, None, None, None, None, None, 0
        sel = torch.tensor(cached, dtype=torch.long)
        qlens, ctx = common.query_lens[d:][sel].to(device), common.context_lens[d:][sel].to(device)
        starts = torch.tensor([starts_l[i] for i in cached], dtype=torch.long, device=device)  # (P',)
        max_q = int(qlens.max())
        nblk = -(-int((ctx + qlens).max()) // bs)
        qi = torch.arange(max_q, device=device)
        valid = qi[None, :] < qlens[:, None]  # (P', Qmax)
        gather = torch.where(valid, starts[:, None] + qi[None, :], torch.zeros_like(valid, dtype=torch.long))
        keys = torch.arange(nblk * bs, device=device)
        qpos = ctx[:, None] + qi[None, :]  # (P', Qmax) absolute position of each query
        mask = keys[None, None, :] <= qpos[:, :, None]  # (P', Qmax, L)
        mask = mask | ~valid[:, :, None]  # padded rows attend everywhere (discarded) to avoid NaN
        valid = valid.reshape(-1)
        tables = common.block_tables[d:][sel.to(device), :nblk]
        return fresh, tables, gather, valid, gather.reshape(-1)[valid], mask[:, None], nblk * bs

    def forward(self, q, k, v, kv_cache, metadata: TorchPagedMetadata | TokenwiseMetadata,
                scale: float) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        kv_heads = k.shape[1]
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # (kv_heads, num_blocks, block_size, head_dim)
        ops = use_kernels(q)
        if ops is not None and k.stride(1) == head_dim and v.stride(1) == head_dim:
            ops.write_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        else:
            k_cache.view(kv_heads, -1, head_dim).index_copy_(1, metadata.slot_mapping, k.transpose(0, 1))
            v_cache.view(kv_heads, -1, head_dim).index_copy_(1, metadata.slot_mapping, v.transpose(0, 1))
        if isinstance(metadata, TokenwiseMetadata):
            return tokenwise_attention(ops, q, k_cache, v_cache, metadata, scale)
        out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
        d = metadata.num_decodes
        if d and metadata.decode_seq_lens is not None:
            # Fused kernel: reads each sequence's blocks in place (no gather copy); writes out[:d].
            ops.paged_decode_attention(out[:d], q[:d], k_cache, v_cache, metadata.decode_block_tables,
                                       metadata.decode_seq_lens, scale)
        elif d:
            out[:d] = self._decode(q[:d], k_cache, v_cache, metadata, scale)
        if d < num_tokens:
            out[d:] = self._prefill(q[d:], k[d:], v[d:], k_cache, v_cache, metadata, scale)
        return out

    @staticmethod
    def _gather(cache: torch.Tensor, block_tables: torch.Tensor, md: TorchPagedMetadata, which: str) -> torch.Tensor:
        """(kv_heads, num_blocks, block_size, head_dim) -> (kv_heads, n, nblk * block_size, head_dim), contiguous.

        One ``index_select`` over dim 0 of the (kv_heads * num_blocks) flattened cache: several times faster on
        CPU than selecting along dim 1. The row indices are computed once per step and shared by all layers."""
        kv_heads, num_blocks, block_size, head_dim = cache.shape
        n, nblk = block_tables.shape
        key = (which, kv_heads, num_blocks)
        rows = md.gather_rows.get(key)
        if rows is None:
            heads = torch.arange(kv_heads, device=cache.device).mul_(num_blocks)  # (kv_heads,)
            rows = (heads[:, None] + block_tables.reshape(1, -1)).reshape(-1)  # (kv_heads * n * nblk,)
            md.gather_rows[key] = rows
        blocks = cache.view(kv_heads * num_blocks, block_size, head_dim).index_select(0, rows)
        return blocks.view(kv_heads, n, nblk * block_size, head_dim)

    def _decode(self, q, k_cache, v_cache, md: TorchPagedMetadata, scale):
        if len(md.decode_groups) == 1:
            return self._decode_group(q, k_cache, v_cache, md, 0, scale)
        out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        for i, group in enumerate(md.decode_groups):
            out.index_copy_(0, group.index, self._decode_group(q.index_select(0, group.index), k_cache, v_cache,
                                                               md, i, scale))
        return out

    def _decode_group(self, q, k_cache, v_cache, md: TorchPagedMetadata, i: int, scale):
        # Batched matmuls over (kv_heads, n): CPU SDPA with one query row per sequence is several times slower.
        group = md.decode_groups[i]
        n, num_heads, head_dim = q.shape
        kv_heads = k_cache.shape[0]
        keys = self._gather(k_cache, group.block_tables, md, f"decode{i}")  # (kv_heads, n, L, head_dim)
        values = self._gather(v_cache, group.block_tables, md, f"decode{i}")
        qg = q.view(n, kv_heads, num_heads // kv_heads, head_dim).transpose(0, 1)  # (kv_heads, n, g, head_dim)
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float()  # (kv_heads, n, g, L)
        scores.mul_(scale).add_(group.bias)  # bias (n, 1, L): 0 or -inf
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # (kv_heads, n, g, head_dim)
        return out.transpose(0, 1).reshape(n, num_heads * head_dim)

    def _prefill(self, q, k, v, k_cache, v_cache, md: TorchPagedMetadata, scale):
        # q (Tp, heads, hd); k, v (Tp, kv_heads, hd) -> (Tp, heads * hd)
        out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        for start, n in md.prefill_fresh:
            # Contiguous 4-D inputs with is_causal: CPU SDPA is 2-3x slower on 3-D or transposed views.
            qi, ki, vi = (x[start:start + n].transpose(0, 1).contiguous()[None] for x in (q, k, v))
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
            out[start:start + n] = o[0].transpose(0, 1).reshape(n, -1)  # (n, heads * hd)
        if md.prefill_gather is None:
            return out
        p, max_q = md.prefill_gather.shape
        qp = q[md.prefill_gather].transpose(1, 2)  # (P', heads, Qmax, head_dim)
        keys = self._gather(k_cache, md.prefill_block_tables, md, "prefill").transpose(0, 1)  # (P', kvh, L, hd)
        values = self._gather(v_cache, md.prefill_block_tables, md, "prefill").transpose(0, 1)
        res = F.scaled_dot_product_attention(qp, keys, values, attn_mask=md.prefill_mask, scale=scale,
                                             enable_gqa=True)  # (P', heads, Qmax, head_dim)
        res = res.transpose(1, 2).reshape(p * max_q, -1)
        out[md.prefill_rows] = res[md.prefill_valid]
        return out
