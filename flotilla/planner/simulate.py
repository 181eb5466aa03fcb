"""Replays a workload through flotilla's own scheduler and KV cache manager on a simulated clock.

The real ``Scheduler`` (and its ``KVCacheManager``) decides every step (admission, chunked prefill, prefix
hits, preemption), exactly as in the engine; the model runner is replaced by a cost model (``stage_times``
and ``hop_time`` of a ``StepWork``: ``flotilla.planner.cost.CostModel``, or any object with those two
methods) and the clock advances by the step's predicted duration. With ``pp`` pipeline stages the loop is
``EngineCore._step_with_batch_queue``'s: up to ``pp`` micro-batches (``ceil(pending / pp)`` requests each) in
flight, each stage busy with one micro-batch at a time, so pipeline bubbles come from the schedule.

Arrivals are ``vllm bench serve``'s: each request has a send time, and with ``max_concurrency`` a request
also waits for one of that many slots (a finished request frees its slot); its latency counts from when it
is sent (its time, or the moment a slot freed). Requests sent during a step are added before the next
``schedule()`` (the engine adds requests between steps). Sampled tokens are arbitrary ids and every request
runs to its output length (``ignore_eos``), as ``flotilla bench`` drives a server. Deterministic: the same
inputs give the same result.

Only the scheduler's public surface is used (``add_request``, ``schedule``, ``update_from_output``,
``has_unfinished_requests``, ``num_running``/``num_waiting``, ``make_stats``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from flotilla.bench.metrics import RequestResult
from flotilla.config import CacheConfig, SchedulerConfig
from flotilla.planner.cost import StepWork
from flotilla.planner.workload import WorkloadRequest
from flotilla.request import Request
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.output import ModelRunnerOutput, SchedulerOutput
from flotilla.scheduler.scheduler import Scheduler

SAMPLED_TOKEN = 101  # the id every simulated step "samples" (any id: requests ignore EOS)
MAX_STEPS = 2_000_000


@dataclass
class _Trace:
    arrival: float
    prompt_len: int
    first: float | None = None
    last: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True)
class SimResult:
    """``results``: one ``RequestResult`` per replayed request (``flotilla.bench.metrics``' definitions, as a
    measured run); ``duration``: first arrival to last finish (seconds); ``steps``: micro-batches run;
    ``mean_batch``: sequences per micro-batch; ``preemptions``; ``prefix_hit_rate`` (tokens);
    ``peak_kv_usage`` (fraction of blocks)."""

    results: list[RequestResult]
    duration: float
    steps: int
    mean_batch: float
    preemptions: int
    prefix_hit_rate: float
    peak_kv_usage: float


def simulate(cost, pp: int, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
             requests: list[WorkloadRequest], arrivals: list[float],
             max_concurrency: int | None = None) -> SimResult:
    """Replay ``requests``, sent at ``arrivals`` (one time per request), at most ``max_concurrency`` in
    flight (see the module docstring)."""
    if len(arrivals) != len(requests):
        raise ValueError("one arrival time per request")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    return _Replay(cost, pp, Scheduler(scheduler_config, cache_config, num_blocks), requests, arrivals,
                   max_concurrency).run()


class _Replay:
    def __init__(self, cost, pp: int, scheduler: Scheduler, requests, arrivals, max_concurrency):
        self.cost, self.pp, self.sched = cost, pp, scheduler
        self.max_num_seqs = scheduler.scheduler_config.max_num_seqs
        self.requests = requests
        self.clock = 0.0
        self.stage_free = [0.0] * pp
        self.in_flight: collections.deque[tuple[SchedulerOutput, float]] = collections.deque()
        self.live: dict[str, Request] = {}
        self.traces: dict[str, _Trace] = {}
        self.pending = collections.deque(sorted((t, i) for i, t in enumerate(arrivals)))
        self.slots = max_concurrency
        self.in_system = 0
        self.slot_freed = 0.0  # when the last slot came free
        self.steps = self.batch_seqs = 0
        self.peak_usage = 0.0

    def run(self) -> SimResult:
        start = 0.0  # as flotilla bench: the clock starts before the first gap
        for _ in range(MAX_STEPS):
            self._admit()
            if not self.sched.has_unfinished_requests() and not self.in_flight:
                if not self.pending:
                    return self._result(start)
                self.clock = self._next_arrival()
                continue
            self._step()
        raise RuntimeError(f"the simulation did not finish within {MAX_STEPS} steps")

    def _admit(self) -> None:
        while self.pending and self.pending[0][0] <= self.clock and (self.slots is None
                                                                      or self.in_system < self.slots):
            t, i = self.pending.popleft()
            sent = t if self.slots is None else max(t, self.slot_freed)
            req = self.requests[i]
            rid = f"sim-{i}"
            request = Request(rid, req.prompt, SamplingParams(max_tokens=req.output_len, ignore_eos=True,
                                                                temperature=0.0), arrival_time=sent)
            self.sched.add_request(request)
            self.live[rid] = request
            self.traces[rid] = _Trace(arrival=sent, prompt_len=len(req.prompt))
            self.in_system += 1

    def _next_arrival(self) -> float:
        """When the next pending request can be sent (it may be waiting for a slot: then the next step)."""
        if self.slots is not None and self.in_system >= self.slots:
            return self.clock
        return max(self.clock, self.pending[0][0])

    def _step(self) -> None:
        """One iteration of the engine core's loop (``EngineCore.step`` / ``_step_with_batch_queue``)."""
        if len(self.in_flight) < self.pp:
            max_reqs = None
            if self.pp > 1:
                pending = min(self.sched.num_running + self.sched.num_waiting, self.max_num_seqs)
                max_reqs = max(1, -(-pending // self.pp))
            so = self.sched.schedule(max_num_reqs=max_reqs)
            if so.total_num_scheduled_tokens > 0 or so.finished_req_ids:
                done = self._run_pipeline(so) if so.total_num_scheduled_tokens else self.clock
                self.in_flight.append((so, done))
                if len(self.in_flight) < self.pp and so.total_num_scheduled_tokens > 0:
                    return
        if not self.in_flight:  # nothing could be scheduled: wait for the next arrival
            if not self.pending or self._next_arrival() <= self.clock:
                raise RuntimeError("the scheduler holds requests it never schedules")
            self.clock = self._next_arrival()
            return
        so, done = self.in_flight.popleft()
        self.clock = max(self.clock, done)
        sampled = ModelRunnerOutput(sampled_token_ids=dict.fromkeys(so.num_scheduled_tokens, SAMPLED_TOKEN))
        for out in self.sched.update_from_output(so, sampled):
            self._record(out)

    def _run_pipeline(self, so: SchedulerOutput) -> float:
        """Time the micro-batch through the stages (each busy with one micro-batch at a time); returns when
        its sampled tokens are back."""
        work = self._work(so)
        self.steps += 1
        self.batch_seqs += work.num_seqs
        self.peak_usage = max(self.peak_usage, self.sched.make_stats().kv_cache_usage)
        times = self.cost.stage_times(work)
        end = max(self.clock, self.stage_free[0]) + times[0]
        self.stage_free[0] = end
        for s in range(1, self.pp):
            end = max(end + self.cost.hop_time(work, s - 1), self.stage_free[s]) + times[s]
            self.stage_free[s] = end
        return end

    def _work(self, so: SchedulerOutput) -> StepWork:
        chunks = []
        for rid, n in so.num_scheduled_tokens.items():
            request = self.live[rid]
            computed = request.num_computed_tokens  # already advanced by schedule()
            chunks.append((n, computed - n, computed >= request.num_tokens))
        return StepWork.of(chunks)

    def _record(self, out) -> None:
        trace = self.traces[out.req_id]
        if out.new_token_ids:
            if trace.first is None:
                trace.first = self.clock
            else:
                trace.itl.append(self.clock - trace.last)
            trace.last = self.clock
            trace.tokens += len(out.new_token_ids)
        if out.finish_reason is not None and not trace.done:
            trace.done = True
            self.live.pop(out.req_id, None)
            self.in_system -= 1
            self.slot_freed = self.clock

    def _result(self, start: float) -> SimResult:
        results = []
        end = start
        for trace in self.traces.values():
            ok = trace.done and trace.first is not None
            end = max(end, trace.last)
            results.append(RequestResult(success=ok, prompt_len=trace.prompt_len, output_tokens=trace.tokens,
                                         ttft=(trace.first - trace.arrival) if ok else 0.0, itl=trace.itl,
                                         latency=(trace.last - trace.arrival) if ok else 0.0))
        stats = self.sched.make_stats()
        hit = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        return SimResult(results=results, duration=max(end - start, 1e-9), steps=self.steps,
                         mean_batch=self.batch_seqs / max(1, self.steps), preemptions=stats.num_preemptions,
                         prefix_hit_rate=hit, peak_kv_usage=self.peak_usage)

