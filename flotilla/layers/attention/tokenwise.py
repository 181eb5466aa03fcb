"""Batch-invariant paged attention: every query token attends as a decode of its own sequence.

The default backend attends a fresh prefill with one causal SDPA call, a chunk on cached context (a later chunk
of a prompt, a prefix-cache hit, a recomputed preempted request) with a padded batched SDPA, and decodes with the
fused kernel or length-grouped matmuls: the same token gets a different reduction order on each path. Here the
new K/V of the step are written to the cache first, then the token at position p attends over cache positions
0..p of its own request as one query of sequence length p + 1, whatever path, chunk or batch it came in:

- with the kernel library: one ``paged_decode_attention`` call over all the step's tokens (each (token, KV head)
  is computed alone, in an order fixed by the sequence length and head sizes);
- without it: a loop over tokens, each one float32 softmax(q K^T * scale) V over its own gathered K/V (slow, but
  every token runs computations of the same shapes whatever the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flotilla.layers.attention.backend import CommonAttentionMetadata


@dataclass
class TokenwiseMetadata:
    """Each new token as its own decode query."""

    slot_mapping: torch.Tensor  # (T,) cache slot of each new token's K/V
    block_tables: torch.Tensor  # (T, max_blocks) the block table of each token's request
    seq_lens: torch.Tensor  # (T,) int64, the token's position + 1
    block_size: int


def build_tokenwise_metadata(common: CommonAttentionMetadata) -> TokenwiseMetadata:
    device = common.block_tables.device
    query_lens = common.query_lens.to(device)  # (R,)
    req_of_token = torch.repeat_interleave(torch.arange(query_lens.numel(), device=device), query_lens)  # (T,)
    starts = torch.cumsum(query_lens, 0) - query_lens  # (R,) first token of each request
    offsets = torch.arange(req_of_token.numel(), device=device) - starts[req_of_token]  # (T,) index in its chunk
    positions = common.context_lens.to(device)[req_of_token] + offsets  # (T,)
    return TokenwiseMetadata(common.slot_mapping, common.block_tables[req_of_token].contiguous(),
                             (positions + 1).contiguous(), common.block_size)


def tokenwise_attention(ops, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        md: TokenwiseMetadata, scale: float) -> torch.Tensor:
    """q (T, heads, head_dim); caches (kv_heads, num_blocks, block_size, head_dim) already holding this step's
    K/V -> (T, heads * head_dim). ``ops`` is the kernel library or None (eager)."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if ops is not None and head_dim <= 256 and q.stride(2) == 1 and q.stride(1) == head_dim:
        ops.paged_decode_attention(out, q, k_cache, v_cache, md.block_tables, md.seq_lens, scale)
        return out
    kv_heads, _, block_size, _ = k_cache.shape
    group = num_heads // kv_heads
    for i, seq_len in enumerate(md.seq_lens.tolist()):
        blocks = md.block_tables[i, :-(-seq_len // block_size)]
        keys = k_cache[:, blocks].reshape(kv_heads, -1, head_dim)[:, :seq_len].float()  # (kvh, L, hd)
        values = v_cache[:, blocks].reshape(kv_heads, -1, head_dim)[:, :seq_len].float()
        qi = q[i].reshape(kv_heads, group, head_dim).float()  # (kvh, g, hd)
        scores = torch.matmul(qi, keys.transpose(1, 2)).mul_(scale)  # (kvh, g, L)
        probs = torch.softmax(scores, dim=-1)
        out[i] = torch.matmul(probs, values).reshape(-1).to(q.dtype)  # (kvh * g * hd,)
    return out
