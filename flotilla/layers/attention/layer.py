"""The Attention layer models use: it holds head counts and delegates to the step's backend."""

from __future__ import annotations

import torch
from torch import nn

from flotilla.layers.attention.backend import AttentionBackend


class Attention(nn.Module):
    """Multi-head / grouped-query attention over the paged KV cache.

    forward(q (T, h*d), k (T, kvh*d), v (T, kvh*d), kv_cache, metadata, backend) -> (T, h*d).
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.scale = num_heads, head_dim, num_kv_heads, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata, backend: AttentionBackend) -> torch.Tensor:
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        return backend.forward(q, k, v, kv_cache, metadata, self.scale)
