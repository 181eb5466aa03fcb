"""Paged attention in plain PyTorch (CPU, or any device): gather each request's blocks, then SDPA.

Decodes (one query token) run as one batched SDPA over (num_decodes, kv_heads, max_seq_len); prefill
chunks run as one batched SDPA over queries padded to the longest chunk, with a causal mask offset by each
request's cached context. No Python loop over requests or tokens on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flotilla.layers.attention.backend import AttentionBackend, CommonAttentionMetadata


@dataclass
class TorchPagedMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,)
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # (D, max_blocks)
    decode_mask: torch.Tensor | None  # (D, 1, 1, L) bool, True = attend
    prefill_block_tables: torch.Tensor | None  # (P, max_blocks)
    prefill_gather: torch.Tensor | None  # (P, Qmax) row index into the prefill tokens
    prefill_valid: torch.Tensor | None  # (P * Qmax,) bool, rows that are real tokens
    prefill_mask: torch.Tensor | None  # (P, 1, Qmax, L) bool
    prefill_is_fresh_single: bool  # one prefill request with no cached context: plain causal attention
    prefill_seq_len: int  # L for prefill (max blocks * block_size, trimmed)


class TorchPagedAttentionBackend(AttentionBackend):
    """The CPU attention backend. Cache layout per layer: (2, num_blocks, block_size, kv_heads, head_dim)."""

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchPagedMetadata:
        d = common.num_decodes
        bs = common.block_size
        device = common.block_tables.device
        seq_lens = common.seq_lens.to(device)
        dec_bt = dec_mask = None
        if d:
            max_len = int(common.seq_lens[:d].max())
            nblk = -(-max_len // bs)
            dec_bt = common.block_tables[:d, :nblk]
            keys = torch.arange(nblk * bs, device=device)
            dec_mask = (keys[None, :] < seq_lens[:d, None])[:, None, None, :]  # (D, 1, 1, L)
        pre = self._build_prefill(common)
        return TorchPagedMetadata(common.slot_mapping, d, dec_bt, dec_mask, *pre)

    @staticmethod
    def _build_prefill(common: CommonAttentionMetadata):
        d, bs = common.num_decodes, common.block_size
        p = common.query_lens.numel() - d
        if p == 0:
            return None, None, None, None, False, 0
        device = common.block_tables.device
        qlens, ctx = common.query_lens[d:].to(device), common.context_lens[d:].to(device)
        fresh_single = p == 1 and int(common.context_lens[d]) == 0
        max_q = int(common.query_lens[d:].max())
        nblk = -(-int((common.context_lens[d:] + common.query_lens[d:]).max()) // bs)
        starts = torch.cumsum(qlens, 0) - qlens  # (P,)
        qi = torch.arange(max_q, device=device)
        valid = qi[None, :] < qlens[:, None]  # (P, Qmax)
        gather = torch.where(valid, starts[:, None] + qi[None, :], torch.zeros_like(valid, dtype=torch.long))
        keys = torch.arange(nblk * bs, device=device)
        qpos = ctx[:, None] + qi[None, :]  # (P, Qmax) absolute position of each query
        mask = keys[None, None, :] <= qpos[:, :, None]  # (P, Qmax, L)
        mask = mask | ~valid[:, :, None]  # padded rows attend everywhere (discarded) to avoid NaN
        return (common.block_tables[d:, :nblk], gather, valid.reshape(-1), mask[:, None], fresh_single,
                nblk * bs)

    def forward(self, q, k, v, kv_cache, metadata: TorchPagedMetadata, scale: float) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        kv_heads = k.shape[1]
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # (num_blocks, block_size, kv_heads, head_dim)
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, k)
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, v)
        out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
        d = metadata.num_decodes
        if d:
            out[:d] = self._decode(q[:d], k_cache, v_cache, metadata, scale)
        if d < num_tokens:
            out[d:] = self._prefill(q[d:], k[d:], v[d:], k_cache, v_cache, metadata, scale)
        return out

    @staticmethod
    def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        n, nblk = block_tables.shape
        blocks = cache[block_tables]  # (n, nblk, block_size, kv_heads, head_dim)
        return blocks.reshape(n, nblk * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)

    def _decode(self, q, k_cache, v_cache, md: TorchPagedMetadata, scale):
        keys = self._gather(k_cache, md.decode_block_tables)  # (D, kv_heads, L, head_dim)
        values = self._gather(v_cache, md.decode_block_tables)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=md.decode_mask,
                                             scale=scale, enable_gqa=True)  # (D, heads, 1, head_dim)
        return out.reshape(q.shape[0], -1)

    def _prefill(self, q, k, v, k_cache, v_cache, md: TorchPagedMetadata, scale):
        if md.prefill_is_fresh_single:
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                 is_causal=True, scale=scale, enable_gqa=True)
            return out.transpose(0, 1).reshape(q.shape[0], -1)  # (T, heads * head_dim)
        p, max_q = md.prefill_gather.shape
        qp = q[md.prefill_gather].transpose(1, 2)  # (P, heads, Qmax, head_dim)
        keys = self._gather(k_cache, md.prefill_block_tables)  # (P, kv_heads, L, head_dim)
        values = self._gather(v_cache, md.prefill_block_tables)
        out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=md.prefill_mask, scale=scale,
                                             enable_gqa=True)  # (P, heads, Qmax, head_dim)
        out = out.transpose(1, 2).reshape(p * max_q, -1)
        return out[md.prefill_valid]
