"""Request priorities in the scheduler (pure Python, no model): the waiting queue's (priority, arrival) order,
"fcfs" (positive priorities wait behind priority 0, never preempt) and "priority" (a better waiting request
preempts worse running ones). The fake runner of ``test_scheduler`` checks every KV slot a request reads, so a
preemption that frees blocks still in use (or caches blocks never computed) fails these tests.
"""

from __future__ import annotations

import random

import pytest

from flotilla.config import CacheConfig, SchedulerConfig
from flotilla.errors import InvalidRequestError
from flotilla.request import BATCH_PRIORITY, Request, RequestStatus
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.request_queue import WaitingQueue
from flotilla.scheduler.scheduler import Scheduler
from test_scheduler import Driver, reference_tokens


def make_scheduler(policy: str, num_blocks=64, block_size=4, budget=64, max_seqs=16, max_model_len=64,
                   caching=True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=max_model_len,
                                     policy=policy),
                     CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching),
                     num_blocks)


def req(req_id: str, prompt: list[int], priority: int = 0, max_tokens: int = 8) -> Request:
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens), arrival_time=0.0, priority=priority)


def admitted(d: Driver) -> list[str]:
    """Request ids in the order they were first scheduled (resumes after preemption not repeated)."""
    seen: list[str] = []
    for so in d.steps:
        seen += [nr.req_id for nr in so.scheduled_new_reqs if nr.req_id not in seen]
    return seen


def test_waiting_queue_is_priority_then_arrival_order():
    q = WaitingQueue()
    assert q.head is None and not q
    for seq, rid, prio in [(0, "a", 5), (1, "b", 0), (3, "c", 5), (4, "d", -1), (5, "e", 0), (2, "f", 5)]:
        r = req(rid, [1], prio)
        r.arrival_seq = seq  # "f" comes back between "a" and "c" (as a preempted request would)
        q.push(r)
    assert [r.request_id for r in q] == ["d", "b", "e", "a", "f", "c"]  # ties keep arrival order
    assert q.head.request_id == "d" and len(q) == 6
    assert [q.pop().request_id for _ in range(2)] == ["d", "b"]
    q.head.status = RequestStatus.FINISHED_ABORTED  # "e" aborted while waiting
    q.remove_finished()
    assert [r.request_id for r in q] == ["a", "f", "c"] and q[0] is q.head and q.head.request_id == "a"
    assert [q.pop().request_id for _ in range(3)] == ["a", "f", "c"] and q.head is None and len(q) == 0
    with pytest.raises(IndexError):
        q.pop()


@pytest.mark.parametrize("value", [True, 1.5, "1", 2**63, -(2**63) - 1])
def test_priority_must_be_a_64_bit_integer(value):
    sched = make_scheduler("priority")
    with pytest.raises(InvalidRequestError) as e:
        sched.add_request(req("a", [1, 2], value))
    assert e.value.param == "priority" and not sched.has_unfinished_requests()


def test_invalid_policy_is_refused():
    with pytest.raises(ValueError, match="fcfs, priority"):
        SchedulerConfig(policy="lifo")


def saturated(policy: str) -> Driver:
    """Two seats, both taken by batch requests "b0" and "b1" (b0 finishes first), "b2" and "b3" queued; then
    online requests "o1" (and, after one more step, "o2") arrive at priority 0."""
    d = Driver(make_scheduler(policy, max_seqs=2))
    for i, n in enumerate([3, 10, 4, 4]):
        d.sched.add_request(req(f"b{i}", [10 + i, 20, 30], BATCH_PRIORITY, max_tokens=n))
    d.step()
    d.sched.add_request(req("o1", [40, 41], 0, max_tokens=5))
    d.step()
    d.sched.add_request(req("o2", [50, 51, 52], 0, max_tokens=5))
    return d


def test_fcfs_online_requests_overtake_queued_batch_but_never_preempt():
    d = saturated("fcfs")
    d.run()
    assert admitted(d) == ["b0", "b1", "o1", "o2", "b2", "b3"]
    assert d.sched.num_preemptions == 0 and not any(so.preempted_req_ids for so in d.steps)
    for rid, prompt, n in [("b1", [11, 20, 30], 10), ("o1", [40, 41], 5), ("b3", [13, 20, 30], 4)]:
        assert d.tokens[rid] == reference_tokens(prompt, n)
    d.assert_drained()


def test_priority_policy_preempts_the_worst_running_request_at_once():
    d = saturated("priority")
    so = d.steps[-1]  # the step after "o1" arrived: it took "b1"'s seat (b1 arrived after b0)
    assert so.preempted_req_ids == {"b1"} and "o1" in so.num_scheduled_tokens and "b0" in so.num_scheduled_tokens
    assert so.preempted_req_ids <= so.finished_req_ids
    so = d.step()  # "o2" preempts "b0", the last batch request running
    assert so.preempted_req_ids == {"b0"} and {"o1", "o2"} == set(so.num_scheduled_tokens)
    d.run()
    # The preempted batch requests come back in arrival order, ahead of the batch requests queued behind them.
    resumed = [nr.req_id for so in d.steps[2:] for nr in so.scheduled_new_reqs]
    assert resumed[:2] == ["o2", "b0"] and resumed.index("b1") < resumed.index("b2") < resumed.index("b3")
    assert d.sched.num_preemptions == 2 and d.sched.make_stats().num_preemptions == 2
    for i, n in enumerate([3, 10, 4, 4]):  # recomputed after preemption: the same tokens
        assert d.tokens[f"b{i}"] == reference_tokens([10 + i, 20, 30], n)
    assert d.tokens["o2"] == reference_tokens([50, 51, 52], 5)
    d.assert_drained()


def test_equal_priority_never_preempts():
    d = Driver(make_scheduler("priority", max_seqs=1))
    d.sched.add_request(req("a", [1, 2, 3], 3, max_tokens=6))
    d.step()
    d.sched.add_request(req("b", [4, 5], 3, max_tokens=2))  # same priority, later: waits
    d.sched.add_request(req("c", [6, 7], 4, max_tokens=2))  # worse: waits behind b
    d.run()
    assert admitted(d) == ["a", "b", "c"] and d.sched.num_preemptions == 0


def test_priority_preempts_for_kv_blocks_not_only_for_seats():
    # 6 blocks of 4 tokens; two batch requests hold 3 blocks each, so an online prompt of 8 tokens (2 blocks)
    # cannot get blocks although a seat is free.
    d = Driver(make_scheduler("priority", num_blocks=6, block_size=4, max_seqs=4, max_model_len=24,
                              caching=False))
    d.sched.add_request(req("b0", list(range(1, 10)), 7, max_tokens=3))
    d.sched.add_request(req("b1", list(range(11, 20)), 7, max_tokens=3))
    so = d.step()
    assert set(so.num_scheduled_tokens) == {"b0", "b1"} and d.sched.kv_cache_manager.num_free_blocks == 0
    d.sched.add_request(req("o", list(range(21, 29)), 0, max_tokens=2))
    so = d.step()
    assert so.preempted_req_ids == {"b1"} and "o" in so.num_scheduled_tokens
    d.run()
    assert d.tokens["b1"] == reference_tokens(list(range(11, 20)), 3)
    assert d.tokens["o"] == reference_tokens(list(range(21, 29)), 2)
    d.assert_drained()


def test_fcfs_out_of_blocks_waits_instead_of_preempting():
    d = Driver(make_scheduler("fcfs", num_blocks=6, block_size=4, max_seqs=4, max_model_len=24, caching=False))
    d.sched.add_request(req("b0", list(range(1, 10)), 7, max_tokens=3))
    d.sched.add_request(req("b1", list(range(11, 20)), 7, max_tokens=3))
    d.step()
    d.sched.add_request(req("o", list(range(21, 29)), 0, max_tokens=2))
    so = d.step()
    assert not so.preempted_req_ids and "o" not in so.num_scheduled_tokens
    d.run()
    assert d.sched.num_preemptions == 0 and d.tokens["o"] == reference_tokens(list(range(21, 29)), 2)


def test_out_of_blocks_preempts_the_worst_priority_not_the_newest():
    # "hi" arrives last but ranks first: when decoding runs out of blocks, "lo" (the worst) is preempted.
    d = Driver(make_scheduler("priority", num_blocks=4, block_size=4, max_seqs=4, max_model_len=16, caching=False))
    d.sched.add_request(req("lo", [1, 2, 3, 4], 5, max_tokens=8))
    d.step()
    d.sched.add_request(req("hi", [5, 6, 7, 8], 1, max_tokens=8))
    while not any(so.preempted_req_ids for so in d.steps):
        d.step()
    assert d.steps[-1].preempted_req_ids == {"lo"}
    d.run()
    assert d.tokens["lo"] == reference_tokens([1, 2, 3, 4], 8) and d.tokens["hi"] == reference_tokens([5, 6, 7, 8], 8)
    d.assert_drained()


@pytest.mark.parametrize("seed", range(6))
def test_random_priorities_under_pressure_keep_every_token_exact(seed):
    """Random arrivals and priorities on a small cache, chunked prefill and prefix sharing: every request's
    tokens equal the reference (the fake runner checks every KV slot read), no step schedules a request it
    preempts, and "fcfs" admits nothing in a step that preempted."""
    rng = random.Random(seed)
    policy = "priority" if seed % 2 else "fcfs"
    d = Driver(make_scheduler(policy, num_blocks=14, block_size=4, budget=16, max_seqs=4, max_model_len=40))
    pending = [(f"r{i}", [rng.randrange(3)] * 4 + [rng.randrange(50) for _ in range(rng.randrange(1, 12))],
                rng.choice([0, 0, 1, BATCH_PRIORITY]), rng.randrange(1, 10)) for i in range(24)]
    expected = {rid: reference_tokens(prompt, n) for rid, prompt, _, n in pending}
    for _ in range(5000):
        for _ in range(rng.randrange(3)):
            if pending:
                rid, prompt, prio, n = pending.pop(0)
                d.sched.add_request(req(rid, prompt, prio, max_tokens=n))
        if not d.sched.has_unfinished_requests():
            if not pending:
                break
            continue
        so = d.step()
        assert not set(so.num_scheduled_tokens) & so.preempted_req_ids
        if policy == "fcfs":
            assert not so.preempted_req_ids or not so.scheduled_new_reqs
    assert not pending and not d.sched.has_unfinished_requests()
    assert dict(d.tokens) == expected
    d.assert_drained()
