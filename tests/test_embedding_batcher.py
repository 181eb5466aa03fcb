"""Embedding inputs through the repository's dynamic batcher (flotilla.repository.embedding_model), with a
scripted ``run_batch`` whose batches are held on a gate, so what queues behind a running batch is
deterministic. Also ``next_batch_size``, the budget of the offline ``LLM.embed`` path."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from flotilla.engine.embedding import next_batch_size
from flotilla.errors import EngineDeadError
from flotilla.pooling_params import PoolingParams
from flotilla.repository.embedding_model import (EMBEDDING, INPUT_IDS, DynamicEmbeddingBatcher,
                                                 embedding_model_config)
from flotilla.repository.tensors import ModelIO

P = PoolingParams()
TIMEOUT = 30.0


class Script:
    """``run_batch`` that records each batch (token ids and params); holds inside a batch while ``gate`` is
    closed; raises for a batch containing the token id ``fail_on``; the row of an input is [sum of its ids]."""

    def __init__(self, fail_on: int | None = None):
        self.batches: list[list[list[int]]] = []
        self.params: list[list[PoolingParams]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, token_ids, params):
        self.batches.append([list(t) for t in token_ids])
        self.params.append(list(params))
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        if self.fail_on is not None and any(self.fail_on in t for t in token_ids):
            raise RuntimeError("scripted failure")
        return [np.array([sum(t)], dtype=np.float32) for t in token_ids]


async def wait_for(predicate) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def submit(batcher, ids, params=P) -> float:
    row = await batcher.submit(ids, params)
    assert row.shape == (1,) and row.dtype == np.float32
    return float(row[0])


def test_next_batch_size_respects_both_budgets():
    assert next_batch_size([], 4, 100) == 0
    assert next_batch_size([10] * 10, 4, 1000) == 4  # max_num_seqs
    assert next_batch_size([10, 10, 50], 8, 100) == 2  # 3 x 50 padded tokens > 100
    assert next_batch_size([300, 1], 8, 100) == 1  # one input always runs, even past the budget
    assert next_batch_size([5, 5, 5, 5], 8, 20) == 4


def test_the_config_is_a_ragged_int64_input_and_an_fp32_embedding_with_dynamic_batching():
    config = embedding_model_config("e", 384, 32, max_queue_delay_us=500, preferred_batch_sizes=[8, 16],
                                    max_queue_size=100)
    assert config.max_batch_size == 32
    assert [(i.name, list(i.dims), i.allow_ragged_batch) for i in config.input] == [(INPUT_IDS, [-1], True)]
    assert [(o.name, list(o.dims)) for o in config.output] == [(EMBEDDING, [384])]
    db = config.dynamic_batching
    assert (db.max_queue_delay_microseconds, list(db.preferred_batch_size), db.default_queue_policy.max_queue_size
            ) == (500, [8, 16], 100)
    io = ModelIO.from_config(config)  # token lists of different lengths share one batch key
    keys = {io.check_request({INPUT_IDS: np.ones((1, n), np.int64)}).key for n in (1, 7, 50)}
    assert len(keys) == 1


def test_inputs_waiting_behind_a_batch_run_together_in_one_forward_pass():
    script = Script()
    batcher = DynamicEmbeddingBatcher(script, max_num_seqs=16, max_num_batched_tokens=1000)

    async def go():
        first = asyncio.ensure_future(submit(batcher, [1]))
        await wait_for(script.entered.is_set)  # the instance holds batch 1
        assert batcher.num_running == 1
        rest = [asyncio.ensure_future(submit(batcher, [i, i])) for i in range(2, 8)]
        await wait_for(lambda: batcher.num_waiting == 6)
        script.gate.set()
        return await first, await asyncio.gather(*rest)

    try:
        first, rest = asyncio.run(go())
    finally:
        batcher.close()
    assert first == 1 and rest == [2 * i for i in range(2, 8)]  # each caller gets its own result
    assert script.batches == [[[1]], [[i, i] for i in range(2, 8)]]
    stats = batcher.batcher.stats()
    assert stats.batch_sizes == {1: 1, 6: 1} and stats.success_count == 7
    assert batcher.num_waiting == batcher.num_running == 0


def test_batches_are_cut_at_max_num_seqs_and_the_token_budget_in_arrival_order_and_params_reach_the_model():
    script = Script()
    batcher = DynamicEmbeddingBatcher(script, max_num_seqs=3, max_num_batched_tokens=8)

    async def go():
        first = asyncio.ensure_future(submit(batcher, [0]))
        await wait_for(script.entered.is_set)
        sizes = [1, 1, 1, 1, 4, 4, 1]
        params = [PoolingParams(dimensions=n) for n in sizes]
        rest = [asyncio.ensure_future(submit(batcher, [1] * n, p)) for n, p in zip(sizes, params)]
        await wait_for(lambda: batcher.num_waiting == len(sizes))
        script.gate.set()
        return await asyncio.gather(first, *rest)

    try:
        results = asyncio.run(go())
    finally:
        batcher.close()
    assert results == [0, 1, 1, 1, 1, 4, 4, 1]
    lengths = [[len(t) for t in batch] for batch in script.batches]
    # cut at max_num_seqs (3) and at max_num_batched_tokens (8) padded tokens: [1, 4, 4] would be 3 x 4 = 12
    assert lengths == [[1], [1, 1, 1], [1, 4], [4, 1]]
    assert [[p.dimensions for p in ps] for ps in script.params[1:]] == lengths[1:]


def test_a_cancelled_input_is_dropped_before_its_batch_forms():
    script = Script()
    batcher = DynamicEmbeddingBatcher(script, max_num_seqs=16, max_num_batched_tokens=1000)

    async def go():
        first = asyncio.ensure_future(submit(batcher, [1]))
        await wait_for(script.entered.is_set)
        gone = asyncio.ensure_future(submit(batcher, [2]))
        kept = asyncio.ensure_future(submit(batcher, [3]))
        await wait_for(lambda: batcher.num_waiting == 2)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        await wait_for(lambda: batcher.num_waiting == 1)
        script.gate.set()
        return await first, await kept

    try:
        assert asyncio.run(go()) == (1, 3)
    finally:
        batcher.close()
    assert script.batches == [[[1]], [[3]]]


def test_a_failing_batch_fails_its_inputs_only_and_the_batcher_goes_on():
    script = Script(fail_on=99)
    batcher = DynamicEmbeddingBatcher(script, max_num_seqs=16, max_num_batched_tokens=1000)

    async def go():
        bad = asyncio.ensure_future(submit(batcher, [99]))
        await wait_for(script.entered.is_set)
        queued = [asyncio.ensure_future(submit(batcher, [i])) for i in (5, 6)]
        await wait_for(lambda: batcher.num_waiting == 2)
        script.gate.set()
        with pytest.raises(RuntimeError, match="scripted failure"):
            await bad
        return await asyncio.gather(*queued), await submit(batcher, [7])

    try:
        assert asyncio.run(go()) == ([5, 6], 7)
    finally:
        batcher.close()
    assert batcher.batcher.stats().fail_count == 1


def test_close_fails_waiting_inputs_and_later_submits():
    script = Script()
    batcher = DynamicEmbeddingBatcher(script, max_num_seqs=16, max_num_batched_tokens=1000)

    async def go():
        first = asyncio.ensure_future(submit(batcher, [1]))
        await wait_for(script.entered.is_set)
        waiting = asyncio.ensure_future(submit(batcher, [2]))
        await wait_for(lambda: batcher.num_waiting == 1)
        closer = threading.Thread(target=batcher.close)
        closer.start()  # close() waits for the running batch, which finishes once the gate opens
        await wait_for(waiting.done)
        script.gate.set()
        closer.join(TIMEOUT)
        assert not closer.is_alive()
        with pytest.raises(EngineDeadError):
            await waiting
        assert await first == 1  # the batch already running completes
        with pytest.raises(EngineDeadError):
            await batcher.submit([3], P)
        assert isinstance(batcher.dead_error, EngineDeadError)

    asyncio.run(go())
    assert script.batches == [[[1]]]


def test_submit_works_from_several_event_loops():
    """The batcher runs on its own loop: callers on different loops (threads) share its batches."""
    script = Script()
    script.gate.set()
    batcher = DynamicEmbeddingBatcher(script, max_num_seqs=16, max_num_batched_tokens=1000)
    results: dict[int, float] = {}

    def caller(i: int) -> None:
        results[i] = asyncio.run(submit(batcher, [i, 1]))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        batcher.close()
    assert results == {i: i + 1 for i in range(4)}
