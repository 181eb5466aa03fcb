"""End-to-end tests of AsyncLLM (streaming, concurrency, aborts) over a real tiny model on CPU.

Plain test functions drive the engine with ``asyncio.run`` (no pytest-asyncio). The greedy references come
from the offline ``LLM`` over the same weights.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from flotilla import SamplingParams
from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.async_llm import AsyncLLM
from flotilla.engine.output_processor import OutputKind
from flotilla.errors import InvalidRequestError
from flotilla.request import RequestStatus

PROMPTS = ["Hello, my name is", "The capital of France is", "a b c d e f g h i j k l m n o p q r s t",
           "Once upon a time", "1 2 3", "Streaming tokens one by one"]
VOCAB = 49152


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def wait_idle(engine: AsyncLLM, timeout: float = 20.0) -> None:
    """Wait until the engine holds no request, then check every KV block is free again."""
    deadline = time.monotonic() + timeout
    while True:
        with engine._lock:  # a consistent snapshot: the engine thread steps under this lock
            idle = not engine.engine.has_unfinished_requests()
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    with engine._lock:
        core = engine.engine
        assert not core.has_unfinished_requests()
        assert not core.scheduler.requests and not core.output_processor.child_to_parent
        kv = core.scheduler.kv_cache_manager
        assert kv.usage == 0 and kv.num_free_blocks == kv.num_blocks and not kv.req_to_blocks
        assert not engine._queues


def holds(engine: AsyncLLM, request_id: str) -> bool:
    """Whether the engine still knows the request (or any of its samples) or holds KV blocks for it."""
    with engine._lock:
        core = engine.engine
        ids = [request_id] + [f"{i}_{request_id}" for i in range(8)]
        return (request_id in core.output_processor.requests
                or any(i in core.scheduler.requests for i in ids)
                or any(core.scheduler.kv_cache_manager.get_block_ids(i) for i in ids))


@pytest.fixture(scope="module")
def async_engine(tiny_llama):
    path, _ = tiny_llama
    engine = AsyncLLM.from_engine_args(EngineArgs(model=path, max_model_len=256, num_kv_blocks=128))
    yield engine
    engine.shutdown()
    assert not engine._thread.is_alive()


@pytest.fixture
def allm(async_engine):
    wait_idle(async_engine)
    yield async_engine
    assert not async_engine.is_dead
    wait_idle(async_engine)


_REFS: dict = {}


def reference(llm, prompt, params: SamplingParams):
    """The offline LLM's result for one prompt alone (cached per prompt and params)."""
    key = (repr(prompt), repr(params))
    if key not in _REFS:
        (_REFS[key],) = llm.generate(prompt, params)
    return _REFS[key]


async def collect(engine: AsyncLLM, prompt, params, request_id, kind=OutputKind.CUMULATIVE) -> list:
    return [out async for out in engine.generate(prompt, params, request_id, output_kind=kind)]


# ---------------------------------------------------------------------------------------------- streaming
def test_cumulative_stream_grows_and_ends_finished(allm, tiny_llama_engine):
    ref = reference(tiny_llama_engine, PROMPTS[0], greedy(12)).outputs[0]
    outs = asyncio.run(collect(allm, PROMPTS[0], greedy(12), "cum-1"))
    assert len(outs) >= 2
    assert all(o.request_id == "cum-1" and o.prompt == PROMPTS[0] for o in outs)
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    for a, b in zip(outs, outs[1:]):
        ta, tb = a.outputs[0], b.outputs[0]
        assert len(ta.token_ids) < len(tb.token_ids) and tb.token_ids[:len(ta.token_ids)] == ta.token_ids
        assert tb.text.startswith(ta.text)
        assert ta.finish_reason is None
    final = outs[-1].outputs[0]
    assert final.token_ids == ref.token_ids and final.text == ref.text
    assert final.finish_reason == "length"


def test_delta_stream_concatenates_to_the_full_text(allm, tiny_llama_engine):
    ref = reference(tiny_llama_engine, PROMPTS[1], greedy(16)).outputs[0]
    outs = asyncio.run(collect(allm, PROMPTS[1], greedy(16), "delta-1", OutputKind.DELTA))
    assert len(outs) >= 2 and outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert "".join(o.outputs[0].text for o in outs) == ref.text
    assert [t for o in outs for t in o.outputs[0].token_ids] == ref.token_ids
    assert all(o.outputs[0].token_ids for o in outs)
    assert outs[-1].outputs[0].finish_reason == "length"


def test_delta_stream_with_stop_string(allm, tiny_llama_engine):
    ref = reference(tiny_llama_engine, PROMPTS[3], greedy(16)).outputs[0]
    stop = next(ref.text[i:i + 3] for i in range(len(ref.text) // 2, len(ref.text) - 3)
                if ref.text[i:i + 3].strip())
    expected = reference(tiny_llama_engine, PROMPTS[3], greedy(16, stop=stop)).outputs[0]
    outs = asyncio.run(collect(allm, PROMPTS[3], greedy(16, stop=stop), "delta-stop", OutputKind.DELTA))
    assert "".join(o.outputs[0].text for o in outs) == expected.text
    assert stop not in expected.text
    assert outs[-1].finished and outs[-1].outputs[0].stop_reason == stop


# ---------------------------------------------------------------------------------------------- concurrency
def test_concurrent_requests_equal_their_solo_runs(allm, tiny_llama_engine):
    params = [greedy(6 + 3 * i) for i in range(len(PROMPTS))]
    refs = [reference(tiny_llama_engine, p, sp).outputs[0] for p, sp in zip(PROMPTS, params)]

    async def main():
        kinds = [OutputKind.CUMULATIVE, OutputKind.DELTA] * 3
        return await asyncio.gather(*(collect(allm, p, sp, f"conc-{i}", kind)
                                      for i, (p, sp, kind) in enumerate(zip(PROMPTS, params, kinds)))), kinds

    results, kinds = asyncio.run(main())
    for outs, kind, ref in zip(results, kinds, refs):
        assert outs[-1].finished
        if kind == OutputKind.DELTA:
            tokens = [t for o in outs for t in o.outputs[0].token_ids]
            text = "".join(o.outputs[0].text for o in outs)
        else:
            tokens, text = outs[-1].outputs[0].token_ids, outs[-1].outputs[0].text
        assert tokens == ref.token_ids and text == ref.text


# ---------------------------------------------------------------------------------------------- aborts
def test_abort_mid_stream_frees_blocks_and_spares_the_others(allm, tiny_llama_engine):
    others = [(PROMPTS[1], greedy(30)), (PROMPTS[2], greedy(25))]
    refs = [reference(tiny_llama_engine, p, sp).outputs[0] for p, sp in others]
    seen: dict[str, list] = {"victim": [], "victim-n2": []}

    async def victim(rid: str, params: SamplingParams):
        async for out in allm.generate(PROMPTS[0], params, rid):
            seen[rid].append(out)
            if len(seen[rid]) == 3:
                assert holds(allm, rid)
                allm.abort(rid)
                assert not holds(allm, rid)  # freed at once, not at the end of the stream

    async def main():
        return await asyncio.gather(
            victim("victim", greedy(200)),
            victim("victim-n2", SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=200)),
            *(collect(allm, p, sp, f"other-{i}") for i, (p, sp) in enumerate(others)))

    results = asyncio.run(asyncio.wait_for(main(), 60))
    for rid in seen:
        assert len(seen[rid]) == 3  # the stream ends at its next iteration after the abort
        assert not seen[rid][-1].finished
    for outs, ref in zip(results[2:], refs):
        assert outs[-1].finished
        assert outs[-1].outputs[0].token_ids == ref.token_ids


def request_of(engine: AsyncLLM, request_id: str):
    with engine._lock:
        return engine.engine.scheduler.requests[request_id]


def test_leaving_the_async_for_aborts(allm, tiny_llama_engine):
    ref = reference(tiny_llama_engine, PROMPTS[4], greedy(30)).outputs[0]
    long_params = greedy(240, ignore_eos=True)

    async def leave_early():
        n = 0
        async for _ in allm.generate(PROMPTS[0], long_params, "gone-break"):
            n += 1
            if n == 2:
                request = request_of(allm, "gone-break")
                break
        # The abandoned generator is closed by the event loop shortly after (asyncgen finalizer).
        for _ in range(1000):
            if not holds(allm, "gone-break"):
                break
            await asyncio.sleep(0.01)
        return request

    async def cancelled_client():
        got = asyncio.Event()

        async def consume():
            async for _ in allm.generate(PROMPTS[1], long_params, "gone-cancel"):
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        request = request_of(allm, "gone-cancel")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not holds(allm, "gone-cancel")  # freed as the task unwinds
        return request

    async def closed_generator():
        gen = allm.generate(PROMPTS[2], greedy(200), "gone-aclose")
        await gen.__anext__()
        request = request_of(allm, "gone-aclose")
        await gen.aclose()
        assert not holds(allm, "gone-aclose")
        return request

    async def main():
        return await asyncio.gather(leave_early(), cancelled_client(), closed_generator(),
                                    collect(allm, PROMPTS[4], greedy(30), "stays"))

    *requests, stays = asyncio.run(asyncio.wait_for(main(), 120))
    for request in requests:
        assert request.status == RequestStatus.FINISHED_ABORTED
        assert request.num_output_tokens < request.sampling_params.max_tokens
    assert stays[-1].finished and stays[-1].outputs[0].token_ids == ref.token_ids


def test_aborted_queued_request_is_never_prefilled(tiny_llama, tiny_llama_engine):
    path, _ = tiny_llama
    engine = AsyncLLM.from_engine_args(EngineArgs(model=path, max_model_len=256, num_kv_blocks=64, max_num_seqs=1))
    long_params = greedy(240, ignore_eos=True)  # keeps the only running slot busy for 240 steps
    ref = reference(tiny_llama_engine, PROMPTS[0], long_params).outputs[0]
    try:
        async def main():
            queued_outputs = []

            async def queued():
                async for out in engine.generate(PROMPTS[1], greedy(10), "queued"):
                    queued_outputs.append(out)

            # Both are added in the same event-loop tick, "running" first: "queued" must wait for the slot.
            run_task = asyncio.create_task(collect(engine, PROMPTS[0], long_params, "running"))
            queued_task = asyncio.create_task(queued())
            while "queued" not in engine._queues:
                await asyncio.sleep(0.001)
            with engine._lock:
                request = engine.engine.scheduler.requests["queued"]
                status = request.status
                running_left = not engine.engine.scheduler.requests["running"].is_finished()
            assert status == RequestStatus.WAITING and running_left
            engine.abort("queued")
            await asyncio.wait_for(queued_task, 10)
            outs = await run_task
            return request, queued_outputs, outs

        request, queued_outputs, outs = asyncio.run(asyncio.wait_for(main(), 120))
        assert queued_outputs == []
        assert request.status == RequestStatus.FINISHED_ABORTED
        assert request.num_computed_tokens == 0 and request.num_cached_tokens == -1  # never scheduled
        assert request.output_token_ids == []
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == ref.token_ids
        # Only the running request was ever looked up for admission.
        assert engine.engine.scheduler.kv_cache_manager.prefix_cache_stats.requests == 1
        wait_idle(engine)
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------------------------------- bad requests
def test_bad_request_raises_while_others_keep_going(allm, tiny_llama_engine):
    refs = [reference(tiny_llama_engine, p, greedy(20)).outputs[0] for p in PROMPTS[:2]]

    async def main():
        return await asyncio.gather(
            collect(allm, PROMPTS[0], greedy(20), "ok-0"),
            collect(allm, [1, 2, VOCAB], greedy(20), "bad-vocab"),
            collect(allm, PROMPTS[1], SamplingParams(max_tokens=20, top_p=0.0), "bad-top-p"),
            collect(allm, [5] * 250, greedy(20), "bad-length"),
            collect(allm, PROMPTS[1], greedy(20), "ok-1"),
            return_exceptions=True)

    ok0, bad_vocab, bad_top_p, bad_length, ok1 = asyncio.run(main())
    assert isinstance(bad_vocab, InvalidRequestError) and str(VOCAB) in str(bad_vocab)
    assert isinstance(bad_top_p, InvalidRequestError) and bad_top_p.param == "top_p"
    assert isinstance(bad_length, InvalidRequestError) and bad_length.param == "max_tokens"
    assert ok0[-1].outputs[0].token_ids == refs[0].token_ids
    assert ok1[-1].outputs[0].token_ids == refs[1].token_ids
    assert not allm.is_dead


def test_duplicate_request_id_in_flight(allm):
    async def main():
        first = allm.generate(PROMPTS[0], greedy(40), "same-id")
        out = await first.__anext__()
        with pytest.raises(InvalidRequestError) as info:
            await collect(allm, PROMPTS[1], greedy(4), "same-id")
        assert info.value.param == "request_id"
        rest = [o async for o in first]
        return [out] + rest

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 40


# ---------------------------------------------------------------------------------------------- n > 1
def test_n2_streaming(allm, tiny_llama_engine):
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=10)
    ref = reference(tiny_llama_engine, PROMPTS[5], params)

    async def main():
        return await asyncio.gather(collect(allm, PROMPTS[5], params, "n2-cum"),
                                    collect(allm, PROMPTS[5], params, "n2-delta", OutputKind.DELTA))

    cum, delta = asyncio.run(main())
    assert cum[-1].finished and not any(o.finished for o in cum[:-1])
    final = cum[-1].outputs
    assert [c.index for c in final] == [0, 1]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 10 for c in final)
    assert [c.token_ids for c in final] == [c.token_ids for c in ref.outputs]
    assert final[0].token_ids != final[1].token_ids
    for a, b in zip(cum, cum[1:]):
        for ca, cb in zip(a.outputs, b.outputs):
            assert cb.token_ids[:len(ca.token_ids)] == ca.token_ids and cb.text.startswith(ca.text)

    assert delta[-1].finished
    for c in ref.outputs:
        parts = [x for o in delta for x in o.outputs if x.index == c.index]
        assert [t for x in parts for t in x.token_ids] == c.token_ids
        assert "".join(x.text for x in parts) == c.text
        assert parts[-1].finish_reason == "length"
