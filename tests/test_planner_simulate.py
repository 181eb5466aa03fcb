"""The planner's simulator: flotilla's real scheduler and KV cache manager on a fake clock (every step costs
what a stub cost model says), so the expected times follow by hand. Pure Python, no torch, no model."""

from __future__ import annotations

import pytest

from flotilla.config import CacheConfig, SchedulerConfig
from flotilla.planner.metrics import SLO, plan_metrics
from flotilla.planner.simulate import simulate
from flotilla.planner.workload import Workload, WorkloadRequest


class FixedCost:
    """Each stage takes ``stage_seconds[s]`` per micro-batch whatever it holds (or ``per_token`` seconds per
    token when given); hops take ``hop`` seconds."""

    def __init__(self, stage_seconds=(1.0,), hop=0.0, per_token=None):
        self.stage_seconds, self.hop, self.per_token = list(stage_seconds), hop, per_token
        self.works = []

    def stage_times(self, work):
        self.works.append(work)
        if self.per_token is not None:
            return [self.per_token * work.num_tokens for _ in self.stage_seconds]
        return list(self.stage_seconds)

    def hop_time(self, work, hop):
        return self.hop


def configs(max_num_seqs=8, max_tokens=2048, num_blocks=256, block_size=4, prefix_caching=True):
    return (SchedulerConfig(max_num_batched_tokens=max_tokens, max_num_seqs=max_num_seqs, max_model_len=512),
            CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix_caching),
            num_blocks)


def reqs(*shapes, start=1000):
    """Requests of (prompt_len, output_len) with distinct token ids."""
    out, tok = [], start
    for n, m in shapes:
        out.append(WorkloadRequest(list(range(tok, tok + n)), m))
        tok += n
    return out


def by_prompt(result):
    return {r.prompt_len: r for r in result.results}


def test_one_request_one_second_per_step():
    sched, cache, blocks = configs()
    r = simulate(FixedCost(), 1, sched, cache, blocks, reqs((32, 4)), arrivals=[0.0]).results[0]
    # step 1 prefills and samples the first token (t=1); three decode steps follow (t=2, 3, 4)
    assert (r.ttft, r.latency, r.output_tokens) == (1.0, 4.0, 4)
    assert r.itl == [1.0, 1.0, 1.0]


def test_chunked_prefill_takes_several_steps():
    sched, cache, blocks = configs(max_tokens=40)
    cost = FixedCost()
    r = simulate(cost, 1, sched, cache, blocks, reqs((100, 2)), arrivals=[0.0]).results[0]
    assert [w.num_tokens for w in cost.works[:3]] == [40, 40, 20]  # the scheduler's chunks
    assert [w.num_sampled for w in cost.works[:3]] == [0, 0, 1]
    assert r.ttft == 3.0 and r.latency == 4.0


def test_max_concurrency_holds_requests_until_a_slot_frees():
    sched, cache, blocks = configs(max_num_seqs=2)
    res = simulate(FixedCost(), 1, sched, cache, blocks, reqs((8, 2), (8, 2), (8, 2), (8, 2)), [0.0] * 4,
                   max_concurrency=2)
    # two slots: prefill at t=1, finish at t=2; the next two are sent when the slots free (t=2), finish at t=4
    assert res.duration == 4.0 and [r.ttft for r in res.results] == [1.0] * 4
    m = plan_metrics(res.results, res.duration, SLO(ttft_p99=1.0, tpot_p99=1.0))
    assert (m.output_throughput, m.request_throughput, m.goodput) == (2.0, 1.0, 1.0)


def test_open_loop_arrivals_wait_for_their_time():
    sched, cache, blocks = configs()
    res = simulate(FixedCost(), 1, sched, cache, blocks, reqs((8, 2), (8, 2)), arrivals=[0.0, 10.0])
    assert [r.ttft for r in res.results] == [1.0, 1.0] and res.duration == 12.0


def test_kv_pressure_preempts_and_every_request_finishes():
    # 12 blocks of 4 tokens: each request grows to 40 tokens (10 blocks), so two cannot run together
    sched, cache, blocks = configs(num_blocks=12, prefix_caching=False)
    res = simulate(FixedCost(), 1, sched, cache, blocks, reqs((20, 20), (20, 20), (20, 20)), arrivals=[0.0] * 3)
    assert res.preemptions > 0
    assert all(r.success and r.output_tokens == 20 for r in res.results)


def test_shared_prefix_hits_cut_prefill_work():
    workload = Workload(input_len=64, output_len=2, range_ratio=0.0, prefix_len=48)
    requests = workload.requests(4, vocab_size=1000)
    sched, cache, blocks = configs(block_size=16)
    cost = FixedCost(per_token=0.01)
    res = simulate(cost, 1, sched, cache, blocks, requests, arrivals=[0.0, 5.0, 10.0, 15.0])
    # the first prompt computes 64 tokens; the others hit the 48 cached prefix tokens and compute 16
    prefill = [w.num_tokens for w in cost.works if w.num_sampled and w.num_tokens > 1]
    assert prefill == [64, 16, 16, 16] and res.prefix_hit_rate == pytest.approx(3 * 48 / 256)
    assert [round(r.ttft, 6) for r in res.results] == [0.64, 0.16, 0.16, 0.16]


def test_pipeline_overlaps_micro_batches():
    sched, cache, blocks = configs()
    cost = FixedCost(stage_seconds=(1.0, 1.0))
    res = simulate(cost, 2, sched, cache, blocks, reqs((8, 2), (8, 2)), arrivals=[0.0, 0.0])
    a, b = res.results
    # A's prefill runs stage 0 in [0, 1] and stage 1 in [1, 2]; B's runs one stage behind ([1, 2], [2, 3]);
    # A's decode enters stage 0 when its token is back (t=2) and leaves at 4; B's at 5
    assert (a.ttft, a.latency, b.ttft, b.latency) == (2.0, 4.0, 3.0, 5.0)
    assert all(w.num_seqs == 1 for w in cost.works)  # ceil(2 requests / 2 stages) per micro-batch


def test_deterministic():
    workload = Workload(input_len=50, output_len=10, rate=2.0, seed=3)
    requests = workload.requests(20, 1000)
    runs = [simulate(FixedCost(per_token=0.002), 1, *configs(max_num_seqs=4), requests,
                     arrivals=workload.arrival_times(20, 2.0)) for _ in range(2)]
    assert [(r.ttft, r.latency) for r in runs[0].results] == [(r.ttft, r.latency) for r in runs[1].results]
    assert runs[0].duration == runs[1].duration


def test_rate_and_max_concurrency_together():
    sched, cache, blocks = configs(max_num_seqs=4)
    # sent at 0, 0.5 and 0.6; one slot: the second waits for the first (done at t=2), the third for the second
    res = simulate(FixedCost(), 1, sched, cache, blocks, reqs((8, 2), (8, 2), (8, 2)), [0.0, 0.5, 0.6],
                   max_concurrency=1)
    assert [(r.ttft, r.latency) for r in res.results] == [(1.0, 2.0), (1.0, 2.0), (1.0, 2.0)]
    assert res.duration == 6.0
    with pytest.raises(ValueError, match="one arrival time per request"):
        simulate(FixedCost(), 1, sched, cache, blocks, reqs((8, 2)), [])
