"""KVCacheManager: per-request block tables over a BlockPool, with sha256 prefix caching (vLLM v1 semantics).

Pure Python, no torch. The scheduler asks it for prefix hits (``get_computed_blocks``) and for room for the
tokens it schedules (``allocate_slots``); the workers only ever see block ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from flotilla.kv_cache.block_hash import extend_block_hashes
from flotilla.kv_cache.block_pool import BlockPool, KVCacheBlock
from flotilla.request import Request


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups counted in tokens: ``queries`` tokens looked up, ``hits`` tokens found."""

    queries: int = 0
    hits: int = 0
    requests: int = 0

    def reset(self) -> None:
        self.queries = 0
        self.hits = 0
        self.requests = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Block tables of the running requests over one BlockPool of ``num_blocks`` blocks of ``block_size``.

    Contract:
    - ``get_computed_blocks(request)`` returns the longest chain of cached full blocks matching the request's
      tokens (at most ``num_tokens - 1`` tokens, so at least one token is computed and sampled from) and
      their token count. It does not take references; pass the blocks to ``allocate_slots``.
    - ``allocate_slots(request, n, hits)`` makes the request's table cover
      ``request.num_computed_tokens + len(hits) * block_size + n`` tokens and returns the ids of the blocks it
      appended (hits first), or None without changing anything when not enough blocks are free. Free but
      cached blocks count as free, except the hits this call is taking. Every block that will be full once
      the step's tokens are computed is registered in the prefix cache at once, so a later request (even in
      the same step) can hit on it: the workers must write a layer's KV for all tokens of the step before
      computing its attention.
    - A block shared by several requests has one reference per table; ``free(request)`` (idempotent) drops
      the request's references tail-first, and a block returns to the free queue with its last reference.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of ``request`` in full blocks, capped to leave one token to compute."""
        if not self.enable_caching:
            return [], 0
        extend_block_hashes(request, self.block_size)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_stats.requests += 1
        self.prefix_cache_stats.queries += request.num_tokens
        self.prefix_cache_stats.hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None) -> list[int] | None:
        """Grow the request's table for ``num_new_tokens`` more tokens after its computed ones (and hits).

        Returns the ids of the appended blocks (hits first, then fresh blocks), or None when the pool cannot
        provide them (nothing is changed then).
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        hits = list(new_computed_blocks or [])
        table = self.req_to_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        num_total = num_computed + num_new_tokens
        num_needed = max(0, _cdiv(num_total, self.block_size) - len(table) - len(hits))
        num_hits_evictable = sum(1 for b in hits if b.ref_cnt == 0)
        if num_needed > self.block_pool.num_free_blocks - num_hits_evictable:
            return None
        # Touch first so the hits cannot be evicted by get_new_blocks below.
        self.block_pool.touch(hits)
        new_blocks = self.block_pool.get_new_blocks(num_needed)
        table.extend(hits)
        table.extend(new_blocks)
        self.req_to_blocks[request.request_id] = table
        if request.request_id not in self.num_cached_blocks:
            self.num_cached_blocks[request.request_id] = len(hits)
        if self.enable_caching:
            self._cache_full_blocks(request, table, min(num_total, request.num_tokens))
        return [b.block_id for b in hits] + [b.block_id for b in new_blocks]

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first, so its last blocks are evicted first); idempotent."""
        table = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if table:
            self.block_pool.free_blocks(reversed(table))

    def get_blocks(self, req_id: str) -> list[KVCacheBlock]:
        """The request's block table (a copy); empty if it holds none."""
        return list(self.req_to_blocks.get(req_id, ()))

    def get_block_ids(self, req_id: str) -> list[int]:
        """The ids of the request's block table, in order; empty if it holds none."""
        return [b.block_id for b in self.req_to_blocks.get(req_id, ())]

    def reset_prefix_cache(self) -> bool:
        """Forget all cached hashes; refused (False) while any block is in use. Stats are kept (cumulative)."""
        return self.block_pool.reset_prefix_cache()

    def _cache_full_blocks(self, request: Request, table: list[KVCacheBlock], num_known_tokens: int) -> None:
        num_full = num_known_tokens // self.block_size
        num_cached = self.num_cached_blocks[request.request_id]
        if num_full <= num_cached:
            return
        extend_block_hashes(request, self.block_size)
        self.block_pool.cache_full_blocks(table, request.block_hashes, num_cached, num_full)
        self.num_cached_blocks[request.request_id] = num_full
