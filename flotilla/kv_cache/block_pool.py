"""The physical KV cache blocks, their reference counts, the LRU free queue and the prefix-cache index.

Pure Python bookkeeping (no torch): a block is an id into the workers' KV tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from flotilla.kv_cache.block_hash import BlockHash


class KVCacheBlock:
    """One physical block: ``block_id`` indexes the KV tensors, ``ref_cnt`` counts the block tables (requests)
    holding it, ``block_hash`` is its content hash while it is registered in the prefix cache, else None."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hash={h})"


class BlockPool:
    """All ``num_blocks`` blocks of the cache.

    Contract:
    - A block is in the free queue exactly when its ``ref_cnt`` is 0. The free queue is LRU: new blocks are
      taken from the front, freed blocks go to the back; removing a block from the middle (a prefix hit on a
      free block) is O(1).
    - A free block may still be cached (hold a ``block_hash``); it keeps its contents until it is reused by
      ``get_new_blocks``, which evicts its hash. ``cached_block_hash_to_block[h].block_hash == h`` always.
    - With ``enable_caching=False`` no block is ever registered.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # block_id -> block, in LRU order (front = evicted first).
        self.free_block_queue: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0 (cached or not): all of them can be handed out."""
        return len(self.free_block_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by some request (0.0 .. 1.0)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` blocks from the front of the free queue (ref_cnt becomes 1), evicting the
        prefix-cache entries of cached ones. Raises ValueError if not enough blocks are free."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot get {num_blocks} blocks: only {self.num_free_blocks} free")
        out = []
        for _ in range(num_blocks):
            _, block = self.free_block_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add one reference to each block (a prefix hit), taking free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_block_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 go to the back of the free queue in the
        given order (pass a request's blocks tail-first so its last blocks are evicted first)."""
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of {block!r}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue[block.block_id] = block

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        """The block registered under ``block_hash``, or None."""
        return self.cached_block_hash_to_block.get(block_hash)

    def cache_full_blocks(self, blocks: list[KVCacheBlock], block_hashes: list[BlockHash],
                          num_cached_blocks: int, num_full_blocks: int) -> None:
        """Register ``blocks[num_cached_blocks:num_full_blocks]`` under ``block_hashes[i]``.

        Blocks already registered are skipped; so is a block whose hash already maps to another block (the
        same content computed twice): the existing entry wins and the duplicate stays uncached.
        """
        if not self.enable_caching:
            return
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            if block.block_hash is not None:
                continue
            block_hash = block_hashes[i]
            if block_hash in self.cached_block_hash_to_block:
                continue
            block.block_hash = block_hash
            self.cached_block_hash_to_block[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (returns False) while any block is in use, as in vLLM."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self.cached_block_hash_to_block.clear()
        for block in self.blocks:
            block.block_hash = None
        return True

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_block_hash_to_block.get(block.block_hash) is block:
            del self.cached_block_hash_to_block[block.block_hash]
        block.block_hash = None
