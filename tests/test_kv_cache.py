"""Block hashing, the block pool and the KV cache manager (pure Python, no torch)."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest

from flotilla.kv_cache.block_hash import extend_block_hashes, hash_block_tokens
from flotilla.kv_cache.block_pool import BlockPool
from flotilla.kv_cache.kv_cache_manager import KVCacheManager
from flotilla.request import Request
from flotilla.sampling_params import SamplingParams

BS = 4


def make_request(req_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=8), arrival_time=0.0, cache_salt=salt)


def check_pool(manager: KVCacheManager) -> None:
    """Free queue == ref_cnt 0; ref_cnt == number of tables holding the block; cache index consistent."""
    pool = manager.block_pool
    holders = collections.Counter(b.block_id for t in manager.req_to_blocks.values() for b in t)
    for block in pool.blocks:
        assert (block.block_id in pool.free_block_queue) == (block.ref_cnt == 0), block
        assert block.ref_cnt == holders[block.block_id], block
    for block_hash, block in pool.cached_block_hash_to_block.items():
        assert block.block_hash == block_hash


# ------------------------------------------------------------------ hashing
def test_hash_is_sha256_bytes_and_deterministic():
    h = hash_block_tokens(None, [1, 2, 3, 4])
    assert isinstance(h, bytes) and len(h) == 32
    assert h == hash_block_tokens(None, (1, 2, 3, 4))
    assert h != hash_block_tokens(None, [1, 2, 3, 5])
    assert h != hash_block_tokens(None, [4, 3, 2, 1])


def test_hash_chain_parent_and_salt_separate():
    tokens = [7, 8, 9, 10]
    p1, p2 = hash_block_tokens(None, [1, 2, 3, 4]), hash_block_tokens(None, [1, 2, 3, 6])
    assert hash_block_tokens(p1, tokens) != hash_block_tokens(p2, tokens)
    assert hash_block_tokens(None, tokens) != hash_block_tokens(p1, tokens)
    assert hash_block_tokens(None, tokens, "a") != hash_block_tokens(None, tokens)
    assert hash_block_tokens(None, tokens, "a") != hash_block_tokens(None, tokens, "b")
    assert hash_block_tokens(None, tokens, "a") != hash_block_tokens(None, tokens, b"a")
    assert hash_block_tokens(None, tokens, "a") == hash_block_tokens(None, tokens, "a")
    # Large and negative ids pack fine (int64).
    assert hash_block_tokens(None, [2**40, -1]) != hash_block_tokens(None, [2**40, 1])


def test_hash_stable_across_processes():
    code = ("from flotilla.kv_cache.block_hash import hash_block_tokens as h;"
            "print(h(h(None, [1, 2], 'salt'), [3, 4]).hex())")
    outs = set()
    for seed in ("0", "1"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())
    assert outs == {hash_block_tokens(hash_block_tokens(None, [1, 2], "salt"), [3, 4]).hex()}


def test_extend_block_hashes_full_blocks_only_and_incremental():
    req = make_request("r", list(range(10)))
    new = extend_block_hashes(req, BS)
    assert len(new) == 2 and req.block_hashes == new
    assert req.block_hashes[0] == hash_block_tokens(None, [0, 1, 2, 3])
    assert req.block_hashes[1] == hash_block_tokens(req.block_hashes[0], [4, 5, 6, 7])
    assert extend_block_hashes(req, BS) == []
    req.append_output_token(100)
    req.append_output_token(101)
    new = extend_block_hashes(req, BS)
    assert new == [hash_block_tokens(req.block_hashes[1], [8, 9, 100, 101])]


def test_salt_changes_whole_chain():
    a, b = make_request("a", list(range(8))), make_request("b", list(range(8)), salt="tenant")
    extend_block_hashes(a, BS)
    extend_block_hashes(b, BS)
    assert b.block_hashes[0] == hash_block_tokens(None, [0, 1, 2, 3], "tenant")
    assert not set(a.block_hashes) & set(b.block_hashes)


# ------------------------------------------------------------------ block pool
def test_pool_lru_order_and_eviction():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(4)
    assert [b.block_id for b in blocks] == [0, 1, 2, 3] and pool.num_free_blocks == 0 and pool.usage == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1])
    pool.cache_full_blocks(blocks, [h, b"x" * 32, b"y" * 32, b"z" * 32], 0, 1)
    assert pool.get_cached_block(h) is blocks[0]
    pool.free_blocks([blocks[3], blocks[2], blocks[0], blocks[1]])  # freed order = eviction order
    assert list(pool.free_block_queue) == [3, 2, 0, 1] and pool.usage == 0.0
    # Touching a free cached block removes it from the middle of the queue.
    pool.touch([blocks[0]])
    assert list(pool.free_block_queue) == [3, 2, 1] and blocks[0].ref_cnt == 1
    pool.free_blocks([blocks[0]])
    assert list(pool.free_block_queue) == [3, 2, 1, 0]
    got = pool.get_new_blocks(3)
    assert [b.block_id for b in got] == [3, 2, 1] and pool.get_cached_block(h) is blocks[0]
    got = pool.get_new_blocks(1)  # reusing the cached block evicts its hash
    assert got[0] is blocks[0] and blocks[0].block_hash is None and pool.get_cached_block(h) is None


def test_pool_double_free_and_reset():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([block], [b"h" * 32], 0, 1)
    assert not pool.reset_prefix_cache()  # in use
    pool.free_blocks([block])
    with pytest.raises(ValueError):
        pool.free_blocks([block])
    assert pool.get_cached_block(b"h" * 32) is block
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(b"h" * 32) is None and block.block_hash is None


def test_pool_without_caching_registers_nothing():
    pool = BlockPool(2, enable_caching=False)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [b"a" * 32, b"b" * 32], 0, 2)
    assert not pool.cached_block_hash_to_block and all(b.block_hash is None for b in blocks)


# ------------------------------------------------------------------ manager
def test_allocate_free_returns_every_block():
    m = KVCacheManager(8, BS)
    req = make_request("r", list(range(10)))
    assert m.get_computed_blocks(req) == ([], 0)
    ids = m.allocate_slots(req, 10)
    assert ids == m.get_block_ids("r") and len(ids) == 3 and m.num_free_blocks == 5
    req.num_computed_tokens = 10
    req.append_output_token(50)
    assert m.allocate_slots(req, 1) == []  # 11 tokens still fit in 3 blocks
    req.num_computed_tokens = 11
    for t in (51, 52):
        req.append_output_token(t)
    assert len(m.allocate_slots(req, 2)) == 1  # 13 tokens: a 4th block
    check_pool(m)
    m.free(req)
    m.free(req)  # idempotent
    assert m.num_free_blocks == 8 and m.usage == 0.0 and m.get_block_ids("r") == []
    check_pool(m)


def test_prefix_hits_reuse_same_blocks_and_count_stats():
    m = KVCacheManager(16, BS)
    a = make_request("a", list(range(10)))
    m.allocate_slots(a, 10)  # blocks 0, 1 full (cached), block 2 partial
    assert len(m.block_pool.cached_block_hash_to_block) == 2
    m.prefix_cache_stats.reset()
    b = make_request("b", list(range(8)) + [99, 98, 97])
    hits, n = m.get_computed_blocks(b)
    assert n == 8 and [x.block_id for x in hits] == m.get_block_ids("a")[:2]
    assert (m.prefix_cache_stats.queries, m.prefix_cache_stats.hits) == (11, 8)
    ids = m.allocate_slots(b, 3, hits)
    assert ids[:2] == m.get_block_ids("a")[:2] and len(ids) == 3
    assert [x.ref_cnt for x in hits] == [2, 2]
    check_pool(m)
    # Same tokens in a different position (different parent) do not hit.
    c = make_request("c", [4, 5, 6, 7, 0, 1, 2, 3, 1])
    assert m.get_computed_blocks(c)[1] == 0
    # A different salt does not hit.
    d = make_request("d", list(range(10)), salt="other")
    assert m.get_computed_blocks(d)[1] == 0


def test_full_hit_leaves_one_token_to_compute():
    m = KVCacheManager(16, BS)
    a = make_request("a", list(range(8)))
    m.allocate_slots(a, 8)
    b = make_request("b", list(range(8)))
    hits, n = m.get_computed_blocks(b)
    assert n == 4 and len(hits) == 1  # the last block is dropped
    ids = m.allocate_slots(b, 4, hits)
    assert ids[0] == m.get_block_ids("a")[0] and ids[1] != m.get_block_ids("a")[1]
    check_pool(m)


def test_shared_prefix_refcounts_and_last_user_frees():
    m = KVCacheManager(16, BS)
    prompt = list(range(9))
    reqs = [make_request(f"s{i}", prompt) for i in range(3)]
    m.allocate_slots(reqs[0], 9)
    for r in reqs[1:]:
        hits, n = m.get_computed_blocks(r)
        assert n == 8
        m.allocate_slots(r, 1, hits)
    shared = m.get_blocks("s0")[:2]
    assert [b.ref_cnt for b in shared] == [3, 3]
    check_pool(m)
    m.free(reqs[0])
    m.free(reqs[1])
    assert [b.ref_cnt for b in shared] == [1, 1]
    assert all(b.block_id not in m.block_pool.free_block_queue for b in shared)
    m.free(reqs[2])
    assert m.num_free_blocks == 16
    check_pool(m)


def test_allocation_failure_changes_nothing_and_touched_hits_do_not_count_as_free():
    m = KVCacheManager(4, BS)
    a = make_request("a", list(range(8)))
    m.allocate_slots(a, 8)
    m.free(a)  # 4 free blocks, two of them cached
    b = make_request("b", list(range(8)) + list(range(100, 110)))  # 18 tokens = 5 blocks
    hits, n = m.get_computed_blocks(b)
    assert n == 8
    # 2 hits + 3 new blocks: only 2 non-hit free blocks exist.
    assert m.allocate_slots(b, 10, hits) is None
    assert m.num_free_blocks == 4 and [x.ref_cnt for x in hits] == [0, 0]
    assert m.get_block_ids("b") == []
    check_pool(m)
    # 2 hits + 2 new blocks fit exactly (the cached-free blocks count as free for a request that
    # does not hit on them).
    assert len(m.allocate_slots(b, 8, hits)) == 4
    assert m.num_free_blocks == 0
    check_pool(m)


def test_free_is_tail_first_so_last_blocks_evicted_first():
    m = KVCacheManager(6, BS)
    a = make_request("a", list(range(12)))
    m.allocate_slots(a, 12)
    ids = m.get_block_ids("a")
    m.free(a)
    assert list(m.block_pool.free_block_queue)[-3:] == ids[::-1]
    b = make_request("b", [50] * 16)
    m.allocate_slots(b, 16)  # takes the 3 never-used blocks, then evicts a's last block
    assert m.get_block_ids("b")[-1] == ids[-1]
    c = make_request("c", list(range(12)))
    assert m.get_computed_blocks(c)[1] == 8  # a's first two blocks survived


def test_blocks_registered_once_full_including_generated_tokens():
    m = KVCacheManager(8, BS)
    a = make_request("a", list(range(6)))
    m.allocate_slots(a, 6)
    assert len(m.block_pool.cached_block_hash_to_block) == 1
    a.num_computed_tokens = 6
    a.append_output_token(60)
    m.allocate_slots(a, 1)
    a.num_computed_tokens = 7
    a.append_output_token(61)
    m.allocate_slots(a, 1)  # 8 tokens computed after this step -> block 1 full
    assert len(m.block_pool.cached_block_hash_to_block) == 2
    b = make_request("b", list(range(6)) + [60, 61, 5])
    assert m.get_computed_blocks(b)[1] == 8
    check_pool(m)


def test_duplicate_content_stays_uncached():
    m = KVCacheManager(8, BS)
    a, b = make_request("a", list(range(8))), make_request("b", list(range(8)))
    m.allocate_slots(a, 8)
    m.allocate_slots(b, 8)  # computed independently (no lookup): same hashes
    assert len(m.block_pool.cached_block_hash_to_block) == 2
    m.free(b)
    m.free(a)
    check_pool(m)
    assert m.num_free_blocks == 8


def test_caching_disabled_and_reset():
    m = KVCacheManager(8, BS, enable_caching=False)
    a = make_request("a", list(range(9)))
    m.allocate_slots(a, 9)
    assert m.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert m.prefix_cache_stats.queries == 0
    m.free(a)
    m2 = KVCacheManager(8, BS)
    a2 = make_request("a", list(range(9)))
    m2.allocate_slots(a2, 9)
    assert not m2.reset_prefix_cache()
    m2.free(a2)
    assert m2.reset_prefix_cache()
    assert m2.get_computed_blocks(make_request("b", list(range(9))))[1] == 0
