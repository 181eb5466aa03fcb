"""EmbeddingBatcher: concurrent inputs gathered into batches (flotilla.engine.embed_batcher), with a scripted
``run_batch`` whose first batch is held on a gate, so what queues behind it is deterministic. Also
``next_batch_size``, the budget both the batcher and ``LLM.embed`` use."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from flotilla.engine.embed_batcher import EmbeddingBatcher
from flotilla.engine.embedding import next_batch_size
from flotilla.errors import EngineDeadError
from flotilla.pooling_params import PoolingParams

P = PoolingParams()
TIMEOUT = 30.0


class Script:
    """``run_batch`` that records each batch; holds inside a batch while ``gate`` is closed; raises for a
    batch containing the token id ``fail_on``."""

    def __init__(self, fail_on: int | None = None):
        self.batches: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, token_ids, params):
        self.batches.append([list(t) for t in token_ids])
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        if self.fail_on is not None and any(self.fail_on in t for t in token_ids):
            raise RuntimeError("scripted failure")
        return [sum(t) for t in token_ids]


async def wait_for(predicate) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_next_batch_size_respects_both_budgets():
    assert next_batch_size([], 4, 100) == 0
    assert next_batch_size([10] * 10, 4, 1000) == 4  # max_num_seqs
    assert next_batch_size([10, 10, 50], 8, 100) == 2  # 3 x 50 padded tokens > 100
    assert next_batch_size([300, 1], 8, 100) == 1  # one input always runs, even past the budget
    assert next_batch_size([5, 5, 5, 5], 8, 20) == 4


def test_inputs_waiting_behind_a_batch_run_together_in_one_forward_pass():
    script = Script()
    batcher = EmbeddingBatcher(script, max_num_seqs=16, max_num_batched_tokens=1000)

    async def go():
        first = asyncio.ensure_future(batcher.submit([1], P))
        await wait_for(script.entered.is_set)  # the worker holds batch 1
        rest = [asyncio.ensure_future(batcher.submit([i, i], P)) for i in range(2, 8)]
        await wait_for(lambda: batcher.num_waiting == 6)
        script.gate.set()
        return await first, await asyncio.gather(*rest)

    try:
        first, rest = asyncio.run(go())
    finally:
        batcher.close()
    assert first == 1 and rest == [2 * i for i in range(2, 8)]  # each caller gets its own result
    assert script.batches == [[[1]], [[i, i] for i in range(2, 8)]]
    assert batcher.batches_run == 2 and batcher.inputs_run == 7


def test_batches_are_cut_at_max_num_seqs_and_the_token_budget_in_arrival_order():
    script = Script()
    batcher = EmbeddingBatcher(script, max_num_seqs=3, max_num_batched_tokens=8)

    async def go():
        first = asyncio.ensure_future(batcher.submit([0], P))
        await wait_for(script.entered.is_set)
        sizes = [1, 1, 1, 1, 4, 4, 1]
        rest = [asyncio.ensure_future(batcher.submit([1] * n, P)) for n in sizes]
        await wait_for(lambda: batcher.num_waiting == len(sizes))
        script.gate.set()
        await asyncio.gather(first, *rest)

    try:
        asyncio.run(go())
    finally:
        batcher.close()
    lengths = [[len(t) for t in batch] for batch in script.batches]
    # 3 seqs at most; [1, 4] would pad to 8 (fits), [1, 4, 4] to 12 (does not)
    assert lengths == [[1], [1, 1, 1], [1, 4], [4, 1]]


def test_a_cancelled_input_is_dropped_before_its_batch_forms():
    script = Script()
    batcher = EmbeddingBatcher(script, max_num_seqs=16, max_num_batched_tokens=1000)

    async def go():
        first = asyncio.ensure_future(batcher.submit([1], P))
        await wait_for(script.entered.is_set)
        gone = asyncio.ensure_future(batcher.submit([2], P))
        kept = asyncio.ensure_future(batcher.submit([3], P))
        await wait_for(lambda: batcher.num_waiting == 2)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        script.gate.set()
        return await first, await kept

    try:
        assert asyncio.run(go()) == (1, 3)
    finally:
        batcher.close()
    assert script.batches == [[[1]], [[3]]]


def test_a_failing_batch_fails_its_inputs_only_and_the_batcher_goes_on():
    script = Script(fail_on=99)
    batcher = EmbeddingBatcher(script, max_num_seqs=16, max_num_batched_tokens=1000)

    async def go():
        bad = asyncio.ensure_future(batcher.submit([99], P))
        await wait_for(script.entered.is_set)
        script.gate.set()
        with pytest.raises(RuntimeError, match="scripted"):
            await bad
        return await batcher.submit([5], P)

    try:
        assert asyncio.run(go()) == 5
    finally:
        batcher.close()
    assert not batcher.dead_error


def test_close_fails_waiting_inputs_and_later_submits():
    script = Script()
    batcher = EmbeddingBatcher(script, max_num_seqs=16, max_num_batched_tokens=1000)

    async def go():
        first = asyncio.ensure_future(batcher.submit([1], P))
        await wait_for(script.entered.is_set)
        waiting = asyncio.ensure_future(batcher.submit([2], P))
        await wait_for(lambda: batcher.num_waiting == 1)
        closer = threading.Thread(target=batcher.close)
        closer.start()  # close() joins the worker, which finishes the batch it holds once the gate opens
        await wait_for(waiting.done)
        script.gate.set()
        closer.join(TIMEOUT)
        with pytest.raises(EngineDeadError):
            await waiting
        assert await first == 1  # the batch already running completes
        with pytest.raises(EngineDeadError):
            await batcher.submit([3], P)

    asyncio.run(go())
    assert script.batches == [[[1]]]
