"""Per-request state does not outlive its request (issue 15: a batch job runs millions of requests through one
engine, so anything kept per finished request is a leak that grows with the input).

Structural, not RSS timing: after a round of finished and aborted requests of every kind (greedy, seeded
``n`` > 1, stop strings, logprobs and prompt logprobs, aborted while queued and while running) the maps of every
layer that holds per-request state are empty, or, for the model runner (which learns of finished requests
with the next step), hold none of that round once one more request has run.
"""

from __future__ import annotations

from flotilla import SamplingParams
from flotilla.engine.output_processor import OutputKind


def _maps(engine) -> dict[str, int]:
    """The size of every per-request map of the engine's front end, scheduler and KV cache manager."""
    sch = engine.core.scheduler
    kv = sch.kv_cache_manager
    return {"output_processor.requests": len(engine.output_processor.requests),
            "output_processor.child_to_parent": len(engine.output_processor.child_to_parent),
            "scheduler.requests": len(sch.requests), "scheduler.running": len(sch.running),
            "scheduler.waiting": len(sch.waiting), "scheduler._num_tokens_sent": len(sch._num_tokens_sent),
            "kv.req_to_blocks": len(kv.req_to_blocks), "kv.num_cached_blocks": len(kv.num_cached_blocks)}


def _runner_ids(engine) -> set[str]:
    runner = engine.core.executor.worker.runner
    return set(runner.requests) | set(runner._generators)


def _round(llm) -> set[str]:
    """Finish and abort requests of every kind; returns the engine request ids they used."""
    engine = llm.engine
    prompts = [f"request {i} says hello to the batch" for i in range(24)]
    kinds = [SamplingParams(temperature=0, max_tokens=6),
             SamplingParams(temperature=0.8, n=2, seed=7, max_tokens=5),  # seeded: a generator per sample
             SamplingParams(temperature=0, max_tokens=8, stop=["e", "a"]),  # stop strings end it in the front end
             SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=1)]
    first = int(engine.next_request_id())
    outs = llm.generate(prompts, [kinds[i % len(kinds)] for i in range(len(prompts))])
    assert all(o.finished for o in outs)
    # Aborted while waiting (before any step) and while running (after a step).
    ids = [engine.next_request_id() for _ in range(6)]
    for rid in ids:
        engine.add_request(rid, "an aborted request", SamplingParams(temperature=0, max_tokens=50),
                           OutputKind.DELTA)
    engine.abort_request(ids[:3])
    engine.step()
    engine.abort_request(ids[3:])
    last = int(ids[-1])
    return {str(i) for i in range(first, last + 1)} | {f"{s}_{i}" for i in range(first, last + 1) for s in (0, 1)}


def test_finished_and_aborted_requests_leave_no_state(tiny_llama_engine):
    llm = tiny_llama_engine
    for _ in range(2):  # the second round would find the first's leftovers
        used = _round(llm)
        assert not llm.engine.has_unfinished_requests()
        assert {k: v for k, v in _maps(llm.engine).items() if v} == {}
    # The runner drops a finished request when the next step's scheduler output names it.
    llm.generate("one more", SamplingParams(temperature=0, max_tokens=2))
    assert not (_runner_ids(llm.engine) & used)
    assert {k: v for k, v in _maps(llm.engine).items() if v} == {}
