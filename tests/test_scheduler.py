"""The token-budget scheduler against a fake model runner (pure Python, no torch, no model).

The fake runner rebuilds its view of every request only from the SchedulerOutput diffs, writes a simulated
KV cache (each slot holds a signature of the token prefix ending there) and, before sampling, checks that
every slot of the request's block table holds the right signature: a wrong prefix hit, a block reused while
in use or a wrong diff fails the test. Sampled tokens depend only on the token history.
"""

from __future__ import annotations

import collections
import random
import subprocess
import sys
from typing import Callable

import pytest

from flotilla.config import CacheConfig, SchedulerConfig
from flotilla.errors import InvalidRequestError
from flotilla.request import Request, RequestStatus
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.output import ModelRunnerOutput, SchedulerOutput
from flotilla.scheduler.scheduler import Scheduler

VOCAB = 50
_MOD = (1 << 61) - 1


def default_next_token(tokens: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 7 + len(tokens)) % VOCAB


def _signatures(tokens: list[int]) -> list[int]:
    out, sig = [], 0
    for t in tokens:
        sig = (sig * 1000003 + t + 1) % _MOD
        out.append(sig)
    return out


class FakeRunner:
    """Simulated workers: state from diffs only, a KV store of prefix signatures, deterministic sampling."""

    def __init__(self, num_blocks: int, block_size: int,
                 next_token: Callable[[list[int]], int] = default_next_token, logprobs: bool = False):
        self.block_size = block_size
        self.kv = [[None] * block_size for _ in range(num_blocks)]
        self.reqs: dict[str, dict] = {}
        self.next_token = next_token
        self.logprobs = logprobs

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in so.finished_req_ids:
            self.reqs.pop(req_id, None)
        for nr in so.scheduled_new_reqs:
            assert nr.req_id not in self.reqs
            self.reqs[nr.req_id] = dict(tokens=list(nr.all_token_ids), blocks=list(nr.block_ids),
                                        computed=nr.num_computed_tokens)
        for cr in so.scheduled_cached_reqs:
            st = self.reqs[cr.req_id]
            assert st["computed"] == cr.num_computed_tokens
            st["tokens"].extend(cr.new_token_ids)
            st["blocks"].extend(cr.new_block_ids)
        assert set(so.num_scheduled_tokens) == (
            {r.req_id for r in so.scheduled_new_reqs} | {r.req_id for r in so.scheduled_cached_reqs})
        bs = self.block_size
        for req_id, n in so.num_scheduled_tokens.items():  # write phase (all requests, as one layer would)
            st = self.reqs[req_id]
            c, sigs = st["computed"], _signatures(st["tokens"])
            assert n > 0 and c + n <= len(st["tokens"]) and len(st["blocks"]) * bs >= c + n
            for p in range(c, c + n):
                self.kv[st["blocks"][p // bs]][p % bs] = sigs[p]
            st["computed"] = c + n
        out = ModelRunnerOutput()
        for req_id in so.num_scheduled_tokens:  # read phase
            st = self.reqs[req_id]
            if st["computed"] < len(st["tokens"]):
                continue
            seen = [self.kv[st["blocks"][p // bs]][p % bs] for p in range(len(st["tokens"]))]
            assert seen == _signatures(st["tokens"]), f"corrupt KV for {req_id}"
            tok = self.next_token(st["tokens"])
            out.sampled_token_ids[req_id] = tok
            if self.logprobs:
                out.logprobs[req_id] = ([tok], [-0.5], [1])
        return out


def make_scheduler(num_blocks=64, block_size=4, budget=64, max_seqs=16, max_model_len=64,
                   chunked=True, caching=True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                                     max_model_len=max_model_len, enable_chunked_prefill=chunked),
                     CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching),
                     num_blocks)


def make_request(req_id, prompt, salt=None, **params) -> Request:
    params.setdefault("max_tokens", 8)
    return Request(req_id, prompt, SamplingParams(**params), arrival_time=0.0, cache_salt=salt)


def check_invariants(sched: Scheduler, so: SchedulerOutput) -> None:
    kv = sched.kv_cache_manager
    pool = kv.block_pool
    holders = collections.Counter(b.block_id for t in kv.req_to_blocks.values() for b in t)
    for block in pool.blocks:
        assert (block.block_id in pool.free_block_queue) == (block.ref_cnt == 0), block
        assert block.ref_cnt == holders[block.block_id], block
    for block_hash, block in pool.cached_block_hash_to_block.items():
        assert block.block_hash == block_hash
    cfg = sched.scheduler_config
    assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
    assert so.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs and len(so.num_scheduled_tokens) <= cfg.max_num_seqs
    running_ids = {r.request_id for r in sched.running}
    assert set(kv.req_to_blocks) <= running_ids
    assert set(so.num_scheduled_tokens) <= running_ids
    assert not running_ids & {r.request_id for r in sched.waiting}
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        assert len(kv.get_block_ids(r.request_id)) * sched.block_size >= r.num_computed_tokens
    for r in sched.waiting:
        assert r.num_computed_tokens == 0 and not kv.get_block_ids(r.request_id)


class Driver:
    """Runs schedule -> fake runner -> update_from_output, checking invariants and collecting outputs."""

    def __init__(self, sched: Scheduler, runner: FakeRunner | None = None):
        self.sched = sched
        bs, n = sched.block_size, sched.kv_cache_manager.num_blocks
        self.runner = runner or FakeRunner(n, bs)
        self.tokens: dict[str, list[int]] = collections.defaultdict(list)
        self.finish: dict[str, tuple] = {}
        self.outputs = []
        self.steps: list[SchedulerOutput] = []

    def step(self, between: Callable[[], None] | None = None) -> SchedulerOutput:
        so = self.sched.schedule()
        check_invariants(self.sched, so)
        self.steps.append(so)
        mro = self.runner.execute(so)
        if between:
            between()
        for out in self.sched.update_from_output(so, mro):
            self.outputs.append(out)
            self.tokens[out.req_id].extend(out.new_token_ids)
            if out.finish_reason:
                self.finish[out.req_id] = (out.finish_reason, out.stop_reason)
        return so

    def run(self, max_steps=5000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished_requests():
                return
            self.step()
        raise AssertionError("scheduler did not finish")

    def assert_drained(self) -> None:
        kv = self.sched.kv_cache_manager
        assert kv.num_free_blocks == kv.num_blocks and not kv.req_to_blocks and kv.usage == 0.0
        so = self.sched.schedule()  # flushes the last finished ids to the runner
        assert so.is_empty()
        self.runner.execute(so)
        assert not self.runner.reqs


def reference_tokens(prompt, max_tokens, next_token=default_next_token):
    toks = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = next_token(toks)
        toks.append(t)
        out.append(t)
    return out


# ------------------------------------------------------------------ basics and diffs
def test_single_request_generates_and_returns_blocks():
    d = Driver(make_scheduler())
    d.sched.add_request(make_request("a", [1, 2, 3, 4, 5], max_tokens=6))
    assert d.sched.has_unfinished_requests() and d.sched.num_waiting == 1
    d.run()
    assert d.tokens["a"] == reference_tokens([1, 2, 3, 4, 5], 6)
    assert d.finish["a"] == ("length", None)
    assert d.sched.get_num_unfinished_requests() == 0
    d.assert_drained()


def test_diffs_new_then_cached():
    d = Driver(make_scheduler(block_size=4))
    d.sched.add_request(make_request("a", [1, 2, 3], max_tokens=5))
    so = d.step()
    (nr,) = so.scheduled_new_reqs
    assert not so.scheduled_cached_reqs
    assert (nr.prompt_token_ids, nr.all_token_ids, nr.num_computed_tokens) == ([1, 2, 3], [1, 2, 3], 0)
    assert len(nr.block_ids) == 1 and so.num_scheduled_tokens == {"a": 3}
    t1 = d.tokens["a"][0]
    so = d.step()  # 4 tokens: still one block
    (cr,) = so.scheduled_cached_reqs
    assert (cr.new_token_ids, cr.new_block_ids, cr.num_computed_tokens) == ([t1], [], 3)
    so = d.step()  # 5th token needs a second block
    (cr,) = so.scheduled_cached_reqs
    assert cr.new_token_ids == [d.tokens["a"][1]] and len(cr.new_block_ids) == 1 and cr.num_computed_tokens == 4
    assert d.runner.reqs["a"]["blocks"] == d.sched.kv_cache_manager.get_block_ids("a")
    assert d.runner.reqs["a"]["tokens"] == d.sched.requests["a"].all_token_ids[:-1]  # last one not sent yet
    d.run()
    d.assert_drained()


def test_finished_ids_propagate_once():
    d = Driver(make_scheduler())
    d.sched.add_request(make_request("a", [1, 2], max_tokens=1))
    d.sched.add_request(make_request("b", [3, 4], max_tokens=3))
    d.step()
    assert d.finish["a"] == ("length", None)
    so = d.step()
    assert so.finished_req_ids == {"a"} and "a" not in d.runner.reqs
    so = d.step()
    assert so.finished_req_ids == set()
    d.run()
    d.assert_drained()


def test_logprobs_and_num_cached_tokens_in_outputs():
    sched = make_scheduler()
    d = Driver(sched, FakeRunner(64, 4, logprobs=True))
    sched.add_request(make_request("a", list(range(9)), max_tokens=2))
    d.run()
    sched.add_request(make_request("b", list(range(9)), max_tokens=2))
    d.run()
    outs = [o for o in d.outputs if o.req_id == "b"]
    assert all(len(o.new_logprobs) == 1 and o.new_logprobs[0][0] == o.new_token_ids for o in outs)
    assert all(o.num_cached_tokens == 8 for o in outs)
    assert [o.num_cached_tokens for o in d.outputs if o.req_id == "a"] == [0, 0]


def test_add_request_validation():
    sched = make_scheduler(max_model_len=16)
    sched.add_request(make_request("a", [1]))
    with pytest.raises(InvalidRequestError):
        sched.add_request(make_request("a", [1]))
    with pytest.raises(InvalidRequestError):
        sched.add_request(make_request("b", list(range(17))))
    with pytest.raises(InvalidRequestError):
        sched.add_request(make_request("c", []))


# ------------------------------------------------------------------ budget, chunking, max_num_seqs
def test_chunked_prefill_splits_prompt_within_budget():
    d = Driver(make_scheduler(budget=16, max_model_len=64))
    prompt = list(range(50))
    d.sched.add_request(make_request("a", prompt, max_tokens=3))
    sizes = []
    for _ in range(4):
        so = d.step()
        sizes.append(so.num_scheduled_tokens["a"])
        if len(sizes) < 4:
            assert not d.tokens["a"]
    assert sizes == [16, 16, 16, 2]
    assert [len(s.scheduled_new_reqs) for s in d.steps] == [1, 0, 0, 0]
    assert all(s.scheduled_cached_reqs[0].new_token_ids == [] for s in d.steps[1:])
    assert len(d.tokens["a"]) == 1
    d.run()
    assert d.tokens["a"] == reference_tokens(prompt, 3)
    d.assert_drained()


def test_decodes_first_then_prefill_chunks_share_budget():
    d = Driver(make_scheduler(budget=10, max_model_len=64))
    d.sched.add_request(make_request("a", [1, 2, 3], max_tokens=10))
    d.step()
    d.sched.add_request(make_request("b", list(range(30)), max_tokens=2))
    so = d.step()
    assert so.num_scheduled_tokens == {"a": 1, "b": 9}
    so = d.step()
    assert so.num_scheduled_tokens == {"a": 1, "b": 9}
    d.run()
    d.assert_drained()


def test_without_chunked_prefill_prompt_waits_for_budget():
    d = Driver(make_scheduler(budget=32, max_model_len=32, chunked=False))
    d.sched.add_request(make_request("a", list(range(20)), max_tokens=2))
    d.sched.add_request(make_request("b", list(range(100, 120)), max_tokens=2))
    so = d.step()
    assert so.num_scheduled_tokens == {"a": 20}
    so = d.step()
    assert so.num_scheduled_tokens == {"a": 1, "b": 20}
    d.run()
    d.assert_drained()


def test_max_num_seqs_bounds_running():
    d = Driver(make_scheduler(max_seqs=2))
    for i in range(5):
        d.sched.add_request(make_request(f"r{i}", [i + 1, 2, 3], max_tokens=3))
    so = d.step()
    assert set(so.num_scheduled_tokens) == {"r0", "r1"} and d.sched.num_running == 2
    assert d.sched.num_waiting == 3
    d.run()
    assert all(len(d.tokens[f"r{i}"]) == 3 for i in range(5))
    d.assert_drained()


# ------------------------------------------------------------------ prefix cache through the scheduler
def test_prefix_hits_across_requests_and_same_step_sharing():
    sched = make_scheduler(block_size=4)
    d = Driver(sched)
    prompt = list(range(10))
    sched.add_request(make_request("a", prompt, max_tokens=2))
    d.run()
    sched.add_request(make_request("b", prompt + [42], max_tokens=2))
    so = d.step()
    (nr,) = so.scheduled_new_reqs
    assert nr.num_computed_tokens == 8 and so.num_scheduled_tokens == {"b": 3}
    assert sched.requests["b"].num_cached_tokens == 8
    # n > 1 samples of one prompt added together share the prefix blocks in the same step.
    for i in range(3):
        sched.add_request(make_request(f"n{i}", list(range(200, 213)), max_tokens=2))
    so = d.step()
    tables = [sched.kv_cache_manager.get_blocks(f"n{i}") for i in range(3)]
    assert tables[0][:3] == tables[1][:3] == tables[2][:3]
    assert all(b.ref_cnt == 3 for b in tables[0][:3])
    assert [so.num_scheduled_tokens[f"n{i}"] for i in range(3)] == [13, 1, 1]
    stats = sched.make_stats()
    assert stats.prefix_cache_hits == 8 + 24 and stats.prefix_cache_queries == 10 + 11 + 39
    d.run()
    assert d.tokens["n0"] == d.tokens["n1"] == d.tokens["n2"] == reference_tokens(list(range(200, 213)), 2)
    d.assert_drained()


def test_prompt_logprobs_requests_read_no_prefix_hits_but_fill_the_cache():
    """A request wanting prompt logprobs computes its whole prompt (as vLLM); its blocks still serve others."""
    sched = make_scheduler(block_size=4)
    d = Driver(sched)
    prompt = list(range(10))
    sched.add_request(make_request("a", prompt, max_tokens=2))
    d.run()
    sched.add_request(make_request("scored", prompt + [42], max_tokens=2, prompt_logprobs=1))
    so = d.step()
    (nr,) = so.scheduled_new_reqs
    assert nr.num_computed_tokens == 0 and so.num_scheduled_tokens == {"scored": 11}
    d.run()
    sched.add_request(make_request("b", list(range(200, 213)), max_tokens=1, prompt_logprobs=0))
    d.run()
    sched.add_request(make_request("c", list(range(200, 213)), max_tokens=1))
    so = d.step()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 12
    d.run()
    d.assert_drained()


def test_max_tokens_zero_finishes_after_the_prompt_without_a_token():
    sched = make_scheduler(budget=4)
    d = Driver(sched, FakeRunner(64, 4, logprobs=True))
    sched.add_request(make_request("z", list(range(10)), max_tokens=0, logprobs=1))
    sched.add_request(make_request("x", list(range(5)), max_tokens=1))
    d.run()
    assert d.tokens["z"] == [] and d.finish["z"] == ("length", None)
    (out,) = [o for o in d.outputs if o.req_id == "z"]
    assert out.new_token_ids == [] and out.new_logprobs == []
    assert len(d.steps) >= 3 and d.tokens["x"] == reference_tokens(list(range(5)), 1)
    d.assert_drained()


def test_prefix_caching_disabled_and_salt():
    sched = make_scheduler(caching=False)
    d = Driver(sched)
    for name in ("a", "b"):
        sched.add_request(make_request(name, list(range(12)), max_tokens=1))
        d.run()
    assert sched.requests == {} and d.outputs[-1].num_cached_tokens == 0
    sched2 = make_scheduler()
    d2 = Driver(sched2)
    sched2.add_request(make_request("a", list(range(12)), salt="x", max_tokens=1))
    d2.run()
    sched2.add_request(make_request("b", list(range(12)), salt="y", max_tokens=1))
    sched2.add_request(make_request("c", list(range(12)), salt="x", max_tokens=1))
    d2.run()
    cached = {o.req_id: o.num_cached_tokens for o in d2.outputs}
    assert cached == {"a": 0, "b": 0, "c": 8}
    d2.assert_drained()


# ------------------------------------------------------------------ preemption
def _run_all(sched: Scheduler, prompts: dict[str, list[int]], max_tokens: int) -> Driver:
    d = Driver(sched)
    for req_id, prompt in prompts.items():
        sched.add_request(make_request(req_id, prompt, max_tokens=max_tokens))
    d.run()
    d.assert_drained()
    return d


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_under_tiny_pool_matches_unconstrained_run(caching):
    prompts = {f"r{i}": [i + 1] * 3 + list(range(10, 10 + i)) for i in range(6)}
    big = _run_all(make_scheduler(num_blocks=128, max_model_len=32, caching=caching), prompts, 14)
    small_sched = make_scheduler(num_blocks=8, block_size=4, max_model_len=32, caching=caching)
    small = _run_all(small_sched, prompts, 14)
    assert small.tokens == big.tokens
    assert small_sched.num_preemptions > 0 and small_sched.make_stats().num_preemptions > 0
    preempting = [s for s in small.steps if s.preempted_req_ids]
    assert preempting
    for s in preempting:
        assert s.preempted_req_ids <= s.finished_req_ids
        assert not s.scheduled_new_reqs  # no waiting request is admitted in a step with a preemption
        assert not set(s.num_scheduled_tokens) & s.preempted_req_ids
    # A resumed request comes back as a new request carrying its generated tokens.
    resumed = [nr for s in small.steps for nr in s.scheduled_new_reqs
               if len(nr.all_token_ids) > len(nr.prompt_token_ids)]
    assert resumed


def test_preempts_newest_and_requeues_at_front():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64, max_model_len=16)
    d = Driver(sched)
    sched.add_request(make_request("old", [1, 2, 3, 4], max_tokens=8))
    sched.add_request(make_request("new", [5, 6, 7, 8], max_tokens=8))
    sched.add_request(make_request("later", [9], max_tokens=1))
    d.step()  # both prompts (2 blocks), "later" too (1 block)
    while not any(s.preempted_req_ids for s in d.steps):
        d.step()
    so = d.steps[-1]
    assert so.preempted_req_ids == {"new"} and "old" in so.num_scheduled_tokens
    assert sched.waiting[0].request_id == "new" and sched.waiting[0].status == RequestStatus.PREEMPTED
    assert sched.waiting[0].num_preemptions == 1 and not so.scheduled_new_reqs
    d.run()
    assert d.tokens["new"] == reference_tokens([5, 6, 7, 8], 8)
    d.assert_drained()


def test_request_using_whole_cache_does_not_spin():
    # num_blocks * block_size == max_model_len: one request can fill the cache; others must wait, not spin.
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=16, budget=16)
    d = Driver(sched)
    sched.add_request(make_request("big", [1] * 8, max_tokens=8))
    sched.add_request(make_request("other", [2] * 8, max_tokens=8))
    d.run(max_steps=200)
    assert len(d.tokens["big"]) == 8 and len(d.tokens["other"]) == 8
    d.assert_drained()


def test_sequence_capped_by_cache_capacity():
    # max_model_len above the cache's capacity is capped, so the lone request ends instead of spinning.
    sched = make_scheduler(num_blocks=2, block_size=4, max_model_len=64)
    d = Driver(sched)
    sched.add_request(make_request("a", [1, 2, 3], max_tokens=None))
    d.run(max_steps=50)
    assert d.finish["a"] == ("length", None) and len(d.tokens["a"]) == 5
    d.assert_drained()


# ------------------------------------------------------------------ aborts
def test_abort_waiting_and_running_frees_blocks():
    d = Driver(make_scheduler(max_seqs=1))
    sched = d.sched
    sched.add_request(make_request("run", list(range(9)), max_tokens=20))
    sched.add_request(make_request("wait", [1, 2], max_tokens=5))
    d.step()
    assert sched.kv_cache_manager.num_free_blocks < 64
    sched.finish_requests(["wait", "nope"], RequestStatus.FINISHED_ABORTED)
    sched.finish_requests("run", RequestStatus.FINISHED_ABORTED)
    sched.finish_requests("run", RequestStatus.FINISHED_ABORTED)  # idempotent
    assert not sched.has_unfinished_requests()
    so = d.step()
    assert so.finished_req_ids == {"run", "wait"} and so.is_empty()
    d.assert_drained()
    with pytest.raises(ValueError):
        sched.finish_requests("x", RequestStatus.RUNNING)


def test_abort_between_schedule_and_update_is_skipped():
    d = Driver(make_scheduler())
    d.sched.add_request(make_request("a", [1, 2, 3], max_tokens=5))
    d.sched.add_request(make_request("b", [4, 5, 6], max_tokens=5))
    d.step()
    d.step(between=lambda: d.sched.finish_requests("a", RequestStatus.FINISHED_ABORTED))
    assert len(d.tokens["a"]) == 1 and len(d.tokens["b"]) == 2
    # Re-adding the same id before the stale output arrives must not corrupt the new request.
    so = d.sched.schedule()
    mro = d.runner.execute(so)
    d.sched.finish_requests("b", RequestStatus.FINISHED_STOPPED)
    d.sched.add_request(make_request("b", [9, 9], max_tokens=2))
    assert d.sched.update_from_output(so, mro) == []
    assert d.sched.requests["b"].output_token_ids == []
    d.run()
    d.assert_drained()


# ------------------------------------------------------------------ stop conditions
def _scripted(seq: list[int], prompt_len: int) -> Callable[[list[int]], int]:
    """next_token emitting seq[k] for the k-th generated token (the last one repeated)."""
    return lambda tokens: seq[min(len(tokens) - prompt_len, len(seq) - 1)]


def _run_scripted(seq, prompt_len=3, max_model_len=64, **params):
    sched = make_scheduler(max_model_len=max_model_len)
    d = Driver(sched, FakeRunner(64, 4, next_token=_scripted(seq, prompt_len)))
    sched.add_request(make_request("a", list(range(1, prompt_len + 1)), **params))
    d.run()
    d.assert_drained()
    return d.tokens["a"], d.finish["a"]


def test_stop_token_ids():
    assert _run_scripted([5, 6, 7, 8], stop_token_ids=[7]) == ([5, 6, 7], ("stop", 7))


def test_eos_respects_min_tokens_and_ignore_eos():
    eos = dict(eos_token_ids=(9,))
    assert _run_scripted([5, 9, 6, 9, 1], **eos) == ([5, 9], ("stop", None))
    assert _run_scripted([5, 9, 6, 9, 1], min_tokens=3, **eos) == ([5, 9, 6, 9], ("stop", None))
    assert _run_scripted([9, 9, 9], ignore_eos=True, max_tokens=4, **eos) == ([9, 9, 9, 9], ("length", None))
    # stop_token_ids are also gated by min_tokens and checked before EOS.
    assert _run_scripted([7, 7, 9], stop_token_ids=[7, 9], min_tokens=2, **eos) == ([7, 7], ("stop", 7))


def test_max_tokens_and_max_model_len():
    assert _run_scripted([1], max_tokens=4) == ([1, 1, 1, 1], ("length", None))
    assert _run_scripted([1], max_model_len=8, max_tokens=None) == ([1] * 5, ("length", None))


# ------------------------------------------------------------------ stats
def test_make_stats():
    sched = make_scheduler(max_seqs=1)
    sched.add_request(make_request("a", [1, 2, 3]))
    sched.add_request(make_request("b", [1, 2, 3]))
    sched.schedule()
    st = sched.make_stats()
    assert (st.num_running, st.num_waiting, st.num_preemptions) == (1, 1, 0)
    assert 0 < st.kv_cache_usage < 1 and st.prefix_cache_queries == 3 and st.prefix_cache_hits == 0


# ------------------------------------------------------------------ randomized stress
def _stress(seed: int, with_aborts: bool, num_blocks: int, specs=None):
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=num_blocks, block_size=4, budget=rng.choice([8, 16, 24]),
                           max_seqs=rng.choice([3, 5, 8]), max_model_len=48, chunked=True)
    d = Driver(sched)
    if specs is None:
        prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 16))] for _ in range(4)]
        specs = []
        for i in range(40):
            prompt = (rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 12))])[:30]
            prompt = prompt or [1]
            params = dict(max_tokens=rng.randrange(1, 48 - len(prompt) + 1),
                          stop_token_ids=[rng.randrange(VOCAB)] if rng.random() < 0.3 else [])
            specs.append((f"r{i}", prompt, rng.choice([None, None, "s"]), params, rng.randrange(0, 30)))
    aborted = set()
    pending = sorted(specs, key=lambda s: s[4])
    step = 0
    while pending or sched.has_unfinished_requests():
        while pending and pending[0][4] <= step:
            req_id, prompt, salt, params, _ = pending.pop(0)
            sched.add_request(make_request(req_id, prompt, salt, **params))
        between = None
        if with_aborts and rng.random() < 0.06 and sched.requests:
            victim = rng.choice(sorted(sched.requests))
            aborted.add(victim)
            abort = lambda v=victim: sched.finish_requests([v], RequestStatus.FINISHED_ABORTED)
            if rng.random() < 0.5:
                abort()
            else:
                between = abort
        d.step(between)
        step += 1
        assert step < 5000
    d.assert_drained()
    return specs, d, aborted


@pytest.mark.parametrize("seed", range(6))
def test_randomized_stress(seed):
    specs, d, aborted = _stress(seed, with_aborts=True, num_blocks=12)
    _, ref, _ = _stress(seed, with_aborts=False, num_blocks=200, specs=specs)
    completed = [req_id for req_id, *_ in specs if req_id not in aborted]
    assert len(completed) >= 20
    for req_id in completed:
        assert d.tokens[req_id] == ref.tokens[req_id], req_id
        assert d.finish[req_id] == ref.finish[req_id]
    assert d.sched.num_preemptions > 0 and ref.sched.num_preemptions == 0


def test_scheduler_and_kv_cache_never_import_torch():
    code = ("import sys; import flotilla.scheduler.scheduler, flotilla.kv_cache.kv_cache_manager;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
