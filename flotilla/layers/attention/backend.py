"""The attention-backend interface: how attention reads and writes the paged KV cache.

The model runner describes a step backend-neutrally (``CommonAttentionMetadata``); the backend turns
that into its own metadata once per step (masks, gather indices shared by every layer) and runs
attention layer by layer. Models never see which backend runs: a GPU backend plugs in here.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass
class CommonAttentionMetadata:
    """One step's batch layout, independent of the backend.

    Tokens are laid out request by request; requests with exactly one query token ("decodes") come first.
    ``query_lens[i]`` new tokens of request i are computed on top of ``context_lens[i]`` cached ones
    (``seq_lens = context_lens + query_lens``). ``block_tables`` (num_reqs, max_blocks) maps each request's
    logical blocks to physical ones (padding: 0). ``slot_mapping`` (num_tokens,) is the cache slot each new
    token's K/V is written to.
    """

    query_lens: torch.Tensor  # (num_reqs,) int64
    context_lens: torch.Tensor  # (num_reqs,) int64
    block_tables: torch.Tensor  # (num_reqs, max_blocks) int64
    slot_mapping: torch.Tensor  # (num_tokens,) int64
    num_decodes: int
    block_size: int
    max_query_len: int
    max_seq_len: int

    @property
    def seq_lens(self) -> torch.Tensor:
        return self.context_lens + self.query_lens


class AttentionBackend(abc.ABC):
    """Paged attention: write new K/V into the cache, attend over each request's cached sequence."""

    @staticmethod
    @abc.abstractmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple:
        """Shape of one layer's cache tensor."""

    @abc.abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata):
        """Per-step metadata shared by all layers."""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata, scale: float) -> torch.Tensor:
        """q (num_tokens, heads, head_dim); k, v (num_tokens, kv_heads, head_dim) -> (num_tokens, heads * head_dim).

        Must write every new token's K/V into ``kv_cache`` before any request reads it (a request may
        read blocks another request of the same step writes, e.g. a shared prompt prefix).
        """


@dataclass
class AttentionContext:
    """What a forward pass needs to reach the cache, passed explicitly down the model (no globals):
    the backend, its per-step metadata, and the caches of the layers this rank runs.

    ``kv_caches[i]`` is the cache of decoder layer ``i`` (the global layer index, as in checkpoint names).
    With pipeline parallelism a rank only holds caches for its own layers (the model's
    ``local_layer_indices``): pass a dict ``{layer_index: cache}`` or a full-length list with None for the
    other stages' layers.
    """

    backend: AttentionBackend
    metadata: object
    kv_caches: Sequence[torch.Tensor | None] | Mapping[int, torch.Tensor]
