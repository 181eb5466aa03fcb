"""End-to-end tests of AsyncLLM (streaming, concurrency, aborts) over a real tiny model on CPU.

The engine core runs in its own process, so these tests observe it only through the frontend's public
surface: ``latest_stats`` (the core's scheduler snapshot after every step, and after aborts while idle),
``num_queued_requests``, ``num_unfinished_requests``, ``num_scheduled_requests_total``,
``output_processor`` and the outputs' ``metrics``. Everything the core does is asynchronous, so checks
poll with generous timeouts instead of sleeping.

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

PROMPTS = ["Hello, my name is", "The capital of France is", "a b c d e f g h i j k l m n o p q r s t",
           "Once upon a time", "1 2 3", "Streaming tokens one by one"]
VOCAB = 49152
TIMEOUT = 120.0  # per asyncio.run: a hang fails the test, a slow shared machine does not


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def run(coro, timeout: float = TIMEOUT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def idle_state(engine: AsyncLLM) -> dict:
    stats = engine.latest_stats
    return {"unfinished": engine.num_unfinished_requests, "queued": engine.num_queued_requests,
            "children": len(engine.output_processor.child_to_parent), "running": stats.num_running,
            "waiting": stats.num_waiting, "kv_cache_usage": stats.kv_cache_usage}


IDLE = {"unfinished": 0, "queued": 0, "children": 0, "running": 0, "waiting": 0, "kv_cache_usage": 0.0}


def wait_idle(engine: AsyncLLM, timeout: float = 60.0) -> None:
    """Poll until the frontend holds no request and the core reports nothing running or waiting and every
    KV block free again."""
    deadline = time.monotonic() + timeout
    while idle_state(engine) != IDLE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert idle_state(engine) == IDLE
    assert not engine.is_dead


async def until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition()`` on the event loop until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def forgotten(engine: AsyncLLM, request_id: str) -> bool:
    """The frontend has dropped the request and every one of its samples."""
    samples = [request_id] + [f"{i}_{request_id}" for i in range(8)]
    return (request_id not in engine.output_processor.requests
            and not any(s in engine.output_processor.child_to_parent for s in samples))


async def core_drops_to(engine: AsyncLLM, keep_ids: list[str], timeout: float = 60.0) -> bool:
    """Poll until the core runs or queues no more sequences than the unfinished requests among ``keep_ids``
    (n == 1 each). Returns True when that happened while one of them was still unfinished, i.e. the other
    (aborted) requests left the core long before they could have finished on their own."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [r for r in keep_ids if r in engine.output_processor.requests]
        stats = engine.latest_stats
        if stats.num_running + stats.num_waiting <= len(alive):
            return bool(alive)
        if not alive:
            return False
        assert time.monotonic() < deadline, f"core still holds {stats}"
        await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def async_engine(tiny_llama):
    path, _ = tiny_llama
    engine = AsyncLLM.from_engine_args(EngineArgs(model=path, max_model_len=256, num_kv_blocks=128))
    yield engine
    engine.shutdown()
    assert not engine._thread.is_alive()
    assert engine._client.proc.poll() is not None  # the core process is gone


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
    outs = run(collect(allm, PROMPTS[0], greedy(12), "cum-1"))
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


def test_metrics_are_ordered_and_stable(allm):
    outs = run(collect(allm, PROMPTS[5], greedy(6), "metrics-1"))
    first = outs[0].metrics
    assert set(first) >= {"arrival_time", "first_scheduled_time", "first_token_time"}
    assert all(o.metrics == first for o in outs)  # set once, never moved
    # time.monotonic() is one system-wide clock, so the core's scheduling time compares with the frontend's.
    assert first["arrival_time"] <= first["first_scheduled_time"] <= first["first_token_time"]
    assert first["first_token_time"] <= time.monotonic()


def test_delta_stream_concatenates_to_the_full_text(allm, tiny_llama_engine):
    ref = reference(tiny_llama_engine, PROMPTS[1], greedy(16)).outputs[0]
    outs = run(collect(allm, PROMPTS[1], greedy(16), "delta-1", OutputKind.DELTA))
    assert len(outs) >= 2 and outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert "".join(o.outputs[0].text for o in outs) == ref.text
    assert [t for o in outs for t in o.outputs[0].token_ids] == ref.token_ids
    assert all(o.outputs[0].token_ids for o in outs)
    assert outs[-1].outputs[0].finish_reason == "length"


def test_delta_stream_with_stop_string(allm, tiny_llama_engine):
    head = reference(tiny_llama_engine, PROMPTS[3], greedy(16, ignore_eos=True)).outputs[0].text
    stop = next(head[i:i + 3] for i in range(len(head) // 2, len(head) - 3) if head[i:i + 3].strip())
    params = greedy(200, ignore_eos=True, stop=stop)  # only the stop string ends it early
    expected = reference(tiny_llama_engine, PROMPTS[3], params).outputs[0]
    keep_params = greedy(200, ignore_eos=True)
    keep_ref = reference(tiny_llama_engine, PROMPTS[4], keep_params).outputs[0]

    async def main():
        keeper = asyncio.create_task(collect(allm, PROMPTS[4], keep_params, "keeper"))
        outs = await collect(allm, PROMPTS[3], params, "delta-stop", OutputKind.DELTA)
        # The frontend found the stop string: the core must stop the sequence too, not run it to 200.
        stopped_early = await core_drops_to(allm, ["keeper"])
        return outs, stopped_early, await keeper

    outs, stopped_early, kept = run(main())
    assert "".join(o.outputs[0].text for o in outs) == expected.text
    assert stop not in expected.text and len(expected.token_ids) < 200
    assert [t for o in outs for t in o.outputs[0].token_ids] == expected.token_ids
    assert outs[-1].finished and outs[-1].outputs[0].stop_reason == stop
    assert outs[-1].outputs[0].finish_reason == "stop"
    assert stopped_early, "the stopped sequence kept running in the core"
    assert kept[-1].outputs[0].token_ids == keep_ref.token_ids


def test_every_sampling_field_crosses_to_the_core(allm, tiny_llama_engine):
    """A request using every SamplingParams field gives exactly the offline engine's result."""
    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, top_k=40, min_p=0.01, presence_penalty=0.5,
                            frequency_penalty=0.3, repetition_penalty=1.2, seed=1234, max_tokens=12,
                            min_tokens=4, stop=["zzzz", "qqqq"], stop_token_ids=[3], ignore_eos=True,
                            include_stop_str_in_output=True, logprobs=2, skip_special_tokens=False)
    ref = reference(tiny_llama_engine, PROMPTS[2], params)
    outs = run(collect(allm, PROMPTS[2], params, "all-fields"))
    final = outs[-1]
    assert final.finished and [c.index for c in final.outputs] == [0, 1]
    for got, want in zip(final.outputs, ref.outputs):
        assert got.token_ids == want.token_ids and got.text == want.text
        assert (got.finish_reason, got.stop_reason) == (want.finish_reason, want.stop_reason)
        assert len(got.logprobs) == len(got.token_ids)
        for pos_got, pos_want in zip(got.logprobs, want.logprobs):
            assert pos_got.keys() == pos_want.keys()
            for tok in pos_got:
                assert pos_got[tok].logprob == pytest.approx(pos_want[tok].logprob, abs=1e-4)
                assert pos_got[tok].rank == pos_want[tok].rank
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-3)


# ---------------------------------------------------------------------------------------------- concurrency
def test_concurrent_requests_equal_their_solo_runs(allm, tiny_llama_engine):
    params = [greedy(6 + 3 * i) for i in range(len(PROMPTS))]
    refs = [reference(tiny_llama_engine, p, sp).outputs[0] for p, sp in zip(PROMPTS, params)]
    kinds = [OutputKind.CUMULATIVE, OutputKind.DELTA] * 3

    async def main():
        return await asyncio.gather(*(collect(allm, p, sp, f"conc-{i}", kind)
                                      for i, (p, sp, kind) in enumerate(zip(PROMPTS, params, kinds))))

    results = run(main())
    for outs, kind, ref in zip(results, kinds, refs):
        assert outs[-1].finished
        if kind == OutputKind.DELTA:
            tokens = [t for o in outs for t in o.outputs[0].token_ids]
            text = "".join(o.outputs[0].text for o in outs)
        else:
            tokens, text = outs[-1].outputs[0].token_ids, outs[-1].outputs[0].text
        assert tokens == ref.token_ids and text == ref.text


# ---------------------------------------------------------------------------------------------- aborts
def test_abort_mid_stream_frees_the_core_and_spares_the_others(allm, tiny_llama_engine):
    # The others are long (200 tokens) and the victims longer (230): if the aborts did not reach the core,
    # it would hold the victims for as long as any other runs.
    others = [(PROMPTS[1], greedy(200, ignore_eos=True)), (PROMPTS[2], greedy(200, ignore_eos=True))]
    other_ids = [f"other-{i}" for i in range(len(others))]
    refs = [reference(tiny_llama_engine, p, sp).outputs[0] for p, sp in others]
    seen: dict[str, list] = {"victim": [], "victim-n2": []}

    async def victim(rid: str, params: SamplingParams):
        async for out in allm.generate(PROMPTS[0], params, rid):
            seen[rid].append(out)
            if len(seen[rid]) == 3:
                assert not forgotten(allm, rid)
                allm.abort(rid)
                assert forgotten(allm, rid)  # the frontend lets go at once

    async def main():
        tasks = [asyncio.create_task(collect(allm, p, sp, rid)) for (p, sp), rid in zip(others, other_ids)]
        await asyncio.gather(victim("victim", greedy(230, ignore_eos=True)),
                             victim("victim-n2", SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=230,
                                                                ignore_eos=True)))
        freed_early = await core_drops_to(allm, other_ids)
        return freed_early, await asyncio.gather(*tasks)

    freed_early, results = run(main())
    for rid in seen:
        assert len(seen[rid]) == 3  # the stream ends at its next iteration after the abort
        assert not seen[rid][-1].finished
    assert freed_early, "the aborted requests stayed in the core while the others ran"
    for outs, ref in zip(results, refs):
        assert outs[-1].finished
        assert outs[-1].outputs[0].token_ids == ref.token_ids


def test_leaving_the_async_for_aborts(allm, tiny_llama_engine):
    stay_params = greedy(200, ignore_eos=True)
    ref = reference(tiny_llama_engine, PROMPTS[4], stay_params).outputs[0]
    long_params = greedy(220, ignore_eos=True)  # longer than "stays": only an abort ends them before it

    async def leave_early():
        n = 0
        async for _ in allm.generate(PROMPTS[0], long_params, "gone-break"):
            n += 1
            if n == 2:
                break
        # The abandoned generator is closed by the event loop shortly after (asyncgen finalizer).
        await until(lambda: forgotten(allm, "gone-break"), "the abandoned generator to abort")

    async def cancelled_client():
        got = asyncio.Event()

        async def consume():
            async for _ in allm.generate(PROMPTS[1], long_params, "gone-cancel"):
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert forgotten(allm, "gone-cancel")  # let go as the task unwinds

    async def closed_generator():
        gen = allm.generate(PROMPTS[2], long_params, "gone-aclose")
        await gen.__anext__()
        await gen.aclose()
        assert forgotten(allm, "gone-aclose")

    async def main():
        stays = asyncio.create_task(collect(allm, PROMPTS[4], stay_params, "stays"))
        await asyncio.gather(leave_early(), cancelled_client(), closed_generator())
        freed_early = await core_drops_to(allm, ["stays"])
        return freed_early, await stays

    freed_early, stays = run(main())
    assert freed_early, "the abandoned requests stayed in the core while another ran"
    assert stays[-1].finished and stays[-1].outputs[0].token_ids == ref.token_ids


def test_aborted_queued_requests_are_never_prefilled(tiny_llama, tiny_llama_engine):
    path, _ = tiny_llama
    engine = AsyncLLM.from_engine_args(EngineArgs(model=path, max_model_len=256, num_kv_blocks=64, max_num_seqs=1))
    long_params = greedy(240, ignore_eos=True)  # keeps the only running slot busy for 240 steps
    ref = reference(tiny_llama_engine, PROMPTS[0], long_params).outputs[0]
    try:
        async def main():
            queued_outputs = []

            async def queued(rid: str):
                async for out in engine.generate(PROMPTS[1], greedy(10), rid):
                    queued_outputs.append(out)

            # All added in the same event-loop tick, "running" first: the others must wait for the slot.
            run_task = asyncio.create_task(collect(engine, PROMPTS[0], long_params, "running"))
            aborted_task = asyncio.create_task(queued("queued-abort"))
            cancelled_task = asyncio.create_task(queued("queued-cancel"))
            await until(lambda: (engine.latest_stats.num_running, engine.latest_stats.num_waiting) == (1, 2)
                        and engine.num_scheduled_requests_total == 1 and engine.num_queued_requests == 2,
                        "the core to run one request and queue two")
            queries = engine.latest_stats.prefix_cache_queries  # the running request's admission lookup
            engine.abort("queued-abort")  # engine-level abort
            cancelled_task.cancel()  # the client went away
            await asyncio.wait_for(aborted_task, 30)
            with pytest.raises(asyncio.CancelledError):
                await cancelled_task
            assert engine.num_queued_requests == 0
            assert forgotten(engine, "queued-abort") and forgotten(engine, "queued-cancel")
            # The core drops them from its queue while "running" still has most of its 240 steps to go.
            dropped_early = await core_drops_to(engine, ["running"])
            outs = await run_task
            return queries, queued_outputs, dropped_early, outs

        queries, queued_outputs, dropped_early, outs = run(main())
        assert queued_outputs == []
        assert dropped_early, "the aborted queued requests stayed in the core's queue"
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == ref.token_ids
        assert outs[-1].metrics["first_scheduled_time"] is not None
        wait_idle(engine)
        # Once the slot freed, nothing else was admitted: no prefix-cache lookup, nothing left the queue.
        assert engine.latest_stats.prefix_cache_queries == queries
        assert engine.num_scheduled_requests_total == 1
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------------------------------- bad requests
def test_bad_request_raises_while_others_keep_going(allm, tiny_llama_engine):
    refs = [reference(tiny_llama_engine, p, greedy(20)).outputs[0] for p in PROMPTS[:2]]
    scheduled_before = allm.num_scheduled_requests_total

    async def main():
        return await asyncio.gather(
            collect(allm, PROMPTS[0], greedy(20), "ok-0"),
            collect(allm, [1, 2, VOCAB], greedy(20), "bad-vocab"),
            collect(allm, PROMPTS[1], SamplingParams(max_tokens=20, top_p=0.0), "bad-top-p"),
            collect(allm, [5] * 250, greedy(20), "bad-length"),
            collect(allm, PROMPTS[1], greedy(20), "ok-1"),
            return_exceptions=True)

    ok0, bad_vocab, bad_top_p, bad_length, ok1 = run(main())
    assert isinstance(bad_vocab, InvalidRequestError) and str(VOCAB) in str(bad_vocab)
    assert isinstance(bad_top_p, InvalidRequestError) and bad_top_p.param == "top_p"
    assert isinstance(bad_length, InvalidRequestError) and bad_length.param == "max_tokens"
    assert ok0[-1].outputs[0].token_ids == refs[0].token_ids
    assert ok1[-1].outputs[0].token_ids == refs[1].token_ids
    assert allm.num_scheduled_requests_total == scheduled_before + 2  # the bad ones never reached the core
    assert not allm.is_dead


def test_duplicate_request_id_in_flight(allm):
    async def main():
        first = allm.generate(PROMPTS[0], greedy(40, ignore_eos=True), "same-id")
        out = await first.__anext__()
        with pytest.raises(InvalidRequestError) as info:
            await collect(allm, PROMPTS[1], greedy(4), "same-id")
        assert info.value.param == "request_id"
        rest = [o async for o in first]
        return [out] + rest

    outs = run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 40
    assert outs[-1].prompt == PROMPTS[0]


# ---------------------------------------------------------------------------------------------- n > 1
def test_n2_streaming(allm, tiny_llama_engine):
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=10)
    ref = reference(tiny_llama_engine, PROMPTS[5], params)

    async def main():
        return await asyncio.gather(collect(allm, PROMPTS[5], params, "n2-cum"),
                                    collect(allm, PROMPTS[5], params, "n2-delta", OutputKind.DELTA))

    cum, delta = run(main())
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
