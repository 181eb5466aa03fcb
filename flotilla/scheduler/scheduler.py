"""The token-budget scheduler (vLLM v1 style): continuous batching, chunked prefill, prefix hits, preemption,
request priorities (vLLM's ``--scheduling-policy fcfs|priority``).

Pure Python, no torch. One engine step is ``schedule()`` -> workers -> ``update_from_output()``.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from dataclasses import dataclass, field
from typing import Iterable

from flotilla.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from flotilla.errors import InvalidRequestError
from flotilla.kv_cache.kv_cache_manager import KVCacheManager
from flotilla.request import Request, RequestStatus, check_priority
from flotilla.scheduler.output import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                                       SchedulerOutput)
from flotilla.scheduler.request_queue import WaitingQueue


# Upper bounds of vLLM's ``iteration_tokens_total`` histogram (tokens scheduled in one engine step).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class SchedulerStats:
    """A snapshot for metrics. Prefix-cache counters (tokens), preemptions and the step histogram are
    cumulative. ``iteration_tokens``: how many steps scheduled a number of tokens in each bucket of
    ``ITERATION_TOKENS_BUCKETS`` (``<=`` its bound, above the previous one; one more entry for larger steps;
    empty before the first step); ``iteration_tokens_sum``: the tokens of all those steps.
    Speculative decoding (cumulative, vLLM's ``spec_decode_*`` counters): ``spec_num_drafts`` request-steps
    that verified drafts, ``spec_num_draft_tokens`` draft tokens verified, ``spec_num_accepted_tokens`` of them
    accepted, ``spec_accepted_per_pos[j]`` drafts accepted at position j (empty without speculation)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    iteration_tokens: tuple[int, ...] = ()
    iteration_tokens_sum: int = 0
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()


def add_step_counts(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Two ``SchedulerStats.iteration_tokens`` summed (either may be empty)."""
    if not a or not b:
        return tuple(a or b)
    return tuple(x + y for x, y in zip(a, b))


@dataclass
class _Step:
    """What one schedule() call has decided so far."""

    budget: int
    max_reqs: int
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    spec: dict[str, list[int]] = field(default_factory=dict)  # the draft tokens scheduled per request
    preempted: set[str] = field(default_factory=set)
    out_of_blocks: bool = False  # a running request had to preempt others to grow: admit no waiting request

    def add(self, request: Request, num_tokens: int, block_ids: list[int]) -> None:
        self.scheduled.append((request, num_tokens))
        self.new_block_ids[request.request_id] = block_ids
        self.budget -= num_tokens


# Why the waiting queue's head was or was not admitted (plain ints: this is the hot path).
_ADMITTED = 0
_NO_BUDGET = 1  # the step's token budget cannot take it: it waits, nothing is preempted for it
_NO_ROOM = 2  # no KV blocks or no max_num_seqs seat for it: with "priority", worse running requests may go


_QUEUE_KEY = operator.attrgetter("queue_key")


class Scheduler:
    """Decides, each step, which tokens of which requests are computed, within one token budget.

    Contract:
    - Every request has a target (``num_tokens``) and ``num_computed_tokens``; ``schedule()`` grants running
      requests first (in order: decodes get 1 token, prefills up to the remaining budget), then waiting
      requests in queue order while budget and ``max_num_seqs`` allow; the queue's head blocks the requests
      behind it (nothing overtakes it). ``num_computed_tokens`` of scheduled requests is advanced inside
      ``schedule()``.
    - Priorities (vLLM's convention): every request has an integer ``priority``, default 0, lower served
      earlier. The waiting queue is always in ``(priority, arrival)`` order (``WaitingQueue``; arrival is the
      order ``add_request`` received them). ``SchedulerConfig.policy``:
      - "fcfs" (the default): running requests in admission order, then the waiting queue. Priority-0
        traffic is plain first-come first-served; a request with a positive priority (offline batch work,
        ``flotilla.request.BATCH_PRIORITY``) waits behind every priority-0 request in the waiting queue but
        never preempts anything (and, once running, is treated like any other).
      - "priority": running requests are kept in ``(priority, arrival)`` order and a step hands out its
        budget over running and waiting requests together in that order (a running request first on equal
        priority). A waiting request that cannot be admitted for lack of KV blocks or of a ``max_num_seqs``
        seat preempts the worst running requests (largest priority, latest arrival) not yet scheduled this
        step, one at a time while their priority is strictly worse than its own (vLLM's priority policy).
    - When the KV cache is full, the last running request (fcfs: the newest; priority: the worst) not yet
      scheduled this step is preempted by recompute (blocks freed, back to the waiting queue, where its
      priority and arrival put it: ahead of later arrivals of its priority); no waiting request is admitted
      in a step with such a preemption. Every preemption (priority ones too) counts in ``num_preemptions``.
      A request asking for prompt logprobs reads no prefix-cache hits until it has output (its whole prompt
      is computed); the blocks it computes are cached for others as usual.
    - ``SchedulerOutput`` carries diffs: first scheduling (and resume after preemption) in
      ``scheduled_new_reqs``, later steps in ``scheduled_cached_reqs`` with only the new tokens and blocks.
      ``finished_req_ids`` lists requests finished, aborted or preempted since the previous ``schedule()``
      (a preempted id is also in ``preempted_req_ids`` and comes back as a new request).
    - ``update_from_output`` appends sampled tokens, applies stop conditions and frees finished requests
      (a request with ``max_tokens=0`` finishes with "length" once its prompt is computed, without a token);
      ``finish_requests`` aborts/stops requests at any time. Requests gone in between are skipped.
    - Sequences are capped at ``min(max_model_len, num_blocks * block_size)`` tokens, so a lone request
      always fits in the cache and the scheduler never spins on a request that cannot fit.
    - Speculative decoding (``speculative``): the draft tokens the workers proposed for a request
      (``ModelRunnerOutput.draft_token_ids``, kept in ``Request.spec_token_ids``, capped so that neither
      ``max_tokens`` nor the sequence cap can be passed) are scheduled tokens: a decode is granted 1 + k
      tokens (fewer drafts when the budget is short; the drafts are listed in ``scheduled_spec_decode_tokens``)
      and ``num_computed_tokens`` advances over them. ``update_from_output`` rolls ``num_computed_tokens``
      back over the rejected drafts (their KV slots are overwritten later; blocks are registered in the
      prefix cache only up to the known tokens) and appends the accepted drafts and the sampled token, one by
      one, stopping at the first stop condition. With a draft model every allocation also reserves k
      lookahead slots, where the drafter writes its KV.
    """

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 speculative: SpeculativeConfig | None = None):
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        self.kv_cache_manager = KVCacheManager(num_blocks, cache_config.block_size,
                                               enable_caching=cache_config.enable_prefix_caching)
        self.max_model_len = min(scheduler_config.max_model_len, num_blocks * cache_config.block_size)
        self.policy = scheduler_config.policy
        self._by_priority = scheduler_config.policy == "priority"
        self._max_num_seqs = scheduler_config.max_num_seqs
        self._chunked = scheduler_config.enable_chunked_prefill
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self._arrivals = itertools.count()
        self.num_preemptions = 0
        self._step_counts = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)  # see SchedulerStats.iteration_tokens
        self._step_tokens = 0
        self._finished_req_ids: set[str] = set()
        self._num_tokens_sent: dict[str, int] = {}  # how many of a request's tokens the workers hold
        self._lookahead = speculative.k if speculative is not None and speculative.method == "draft_model" else 0
        self._spec_counts = [0, 0, 0]  # drafts (request-steps), draft tokens, accepted tokens
        self._spec_per_pos = [0] * (speculative.k if speculative is not None else 0)

    # ----------------------------------------------------------------- requests in and out
    def add_request(self, request: Request) -> None:
        """Queue a new request (status WAITING). Raises InvalidRequestError for a duplicate id, an empty
        prompt, a prompt longer than the sequence cap, or a priority that is not a 64-bit integer."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use", "request_id")
        if not 0 < request.num_tokens <= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {request.num_tokens} tokens; it must have 1 to {self.max_model_len}", "prompt")
        check_priority(request.priority)
        request.status = RequestStatus.WAITING
        request.arrival_seq = next(self._arrivals)
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish (abort, or stop on a stop string) waiting or running requests and free their blocks now.
        Unknown or already finished ids are ignored; the ids go out in the next ``finished_req_ids``."""
        if not RequestStatus.is_finished(status):
            raise ValueError(f"{status!r} is not a finished status")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        done = [self.requests[r] for r in req_ids if r in self.requests]
        for request in done:
            request.status = status
            self._release(request)
        if done:
            self._drop_finished_from_queues()

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ----------------------------------------------------------------- one step
    def schedule(self, max_num_reqs: int | None = None) -> SchedulerOutput:
        """Pick this step's tokens; advance the scheduled requests' ``num_computed_tokens``.

        ``max_num_reqs`` caps the requests of this one step (pipeline parallelism splits the running
        requests into several micro-batches that are in flight together)."""
        step = _Step(budget=self.scheduler_config.max_num_batched_tokens,
                     max_reqs=max_num_reqs or self.scheduler_config.max_num_seqs)
        if self._by_priority:
            self._schedule_by_priority(step)
        else:
            self._schedule_running(step)
            self._schedule_waiting(step)
        out = SchedulerOutput(preempted_req_ids=step.preempted, scheduled_spec_decode_tokens=step.spec)
        for request, num_tokens in step.scheduled:
            req_id = request.request_id
            if req_id not in self._num_tokens_sent:
                out.scheduled_new_reqs.append(NewRequestData(
                    req_id=req_id, prompt_token_ids=list(request.prompt_token_ids),
                    all_token_ids=list(request.all_token_ids), sampling_params=request.sampling_params,
                    block_ids=self.kv_cache_manager.get_block_ids(req_id),
                    num_computed_tokens=request.num_computed_tokens))
            else:
                out.scheduled_cached_reqs.append(CachedRequestData(
                    req_id=req_id, new_token_ids=request.all_token_ids[self._num_tokens_sent[req_id]:],
                    new_block_ids=step.new_block_ids[req_id], num_computed_tokens=request.num_computed_tokens))
            self._num_tokens_sent[req_id] = request.num_tokens
            out.num_scheduled_tokens[req_id] = num_tokens
            out.total_num_scheduled_tokens += num_tokens
            request.num_computed_tokens += num_tokens
        out.finished_req_ids = self._finished_req_ids
        self._finished_req_ids = set()
        if out.total_num_scheduled_tokens:
            self._step_counts[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, out.total_num_scheduled_tokens)] += 1
            self._step_tokens += out.total_num_scheduled_tokens
        return out

    def _schedule_running(self, step: _Step) -> None:
        i: int | None = 0
        while i is not None and i < len(self.running) and step.budget > 0 and len(step.scheduled) < step.max_reqs:
            i = self._schedule_running_at(i, step)

    def _schedule_running_at(self, i: int, step: _Step) -> int | None:
        """Grant ``running[i]`` its next tokens; the index of the next running request, or None when it had to
        preempt itself (nothing is left to take blocks from)."""
        request = self.running[i]
        num_known = request.num_tokens - request.num_computed_tokens
        drafts = request.spec_token_ids
        num_new = min(num_known + len(drafts), step.budget)
        if num_new <= 0:  # nothing to compute until its sampled token arrives
            return i + 1
        block_ids = self._allocate_or_preempt(request, num_new, step)
        if block_ids is None:
            return None
        step.add(request, num_new, block_ids)
        if num_new > num_known:
            step.spec[request.request_id] = drafts[:num_new - num_known]
        request.spec_token_ids = []
        return i + 1

    def _with_lookahead(self, num_computed: int, num_new: int) -> int:
        """``num_new`` plus the draft model's lookahead slots (within the sequence cap)."""
        return num_new + max(0, min(self._lookahead, self.max_model_len - num_computed - num_new))

    def _allocate_or_preempt(self, request: Request, num_new: int, step: _Step) -> list[int] | None:
        """Allocate, preempting the last running request (never one scheduled this step: those precede
        ``request`` in the running list) until it fits. None if ``request`` itself had to go."""
        while True:
            block_ids = self.kv_cache_manager.allocate_slots(
                request, self._with_lookahead(request.num_computed_tokens, num_new))
            if block_ids is not None:
                return block_ids
            victim = self.running.pop()
            self._preempt(victim)
            step.preempted.add(victim.request_id)
            step.out_of_blocks = True
            if victim is request:
                return None

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._num_tokens_sent.pop(request.request_id, None)
        self._finished_req_ids.add(request.request_id)
        self.waiting.push(request)

    def _schedule_waiting(self, step: _Step) -> None:
        if step.out_of_blocks:
            return
        waiting = self.waiting
        while waiting.head is not None and step.budget > 0 and len(step.scheduled) < step.max_reqs:
            if self._admit_head(waiting.head, step) != _ADMITTED:
                break  # the head blocks the queue: later requests do not overtake it

    def _schedule_by_priority(self, step: _Step) -> None:
        """The "priority" policy's step: running and waiting requests together in ``(priority, arrival)``
        order (a running request first on equal priority); see the class contract. ``running[:i]`` are the
        running requests already granted (or passed over) this step: never preempted for a waiting one."""
        i: int | None = 0
        admitting = True
        while i is not None and step.budget > 0 and len(step.scheduled) < step.max_reqs:
            head = self.waiting.head if admitting and not step.out_of_blocks else None
            if i < len(self.running) and (head is None or self.running[i].priority <= head.priority):
                i = self._schedule_running_at(i, step)
                continue
            if head is None:
                return
            verdict = self._admit_head(head, step)
            if verdict == _ADMITTED:
                i += 1  # the admitted request sorts before running[i] (its priority is better): skip past it
            elif not (verdict == _NO_ROOM and self._preempt_for(head, i, step)):
                admitting = False  # the head waits for a later step; so does everything behind it

    def _preempt_for(self, head: Request, first: int, step: _Step) -> bool:
        """Preempt the worst running request for ``head`` if its priority is strictly worse and it is not among
        ``running[:first]`` (granted this step); False if there is no such request."""
        if len(self.running) <= first or self.running[-1].priority <= head.priority:
            return False
        victim = self.running.pop()
        self._preempt(victim)
        step.preempted.add(victim.request_id)
        return True

    def _admit_head(self, request: Request, step: _Step) -> int:
        """Move ``request``, the waiting queue's head, to running with its first tokens if a seat, the budget
        and the KV cache allow (``_ADMITTED``); otherwise change nothing and say what it lacks."""
        if len(self.running) >= self._max_num_seqs:
            return _NO_ROOM
        hits, num_hit_tokens = self._cache_hits(request)
        num_new = request.num_tokens - num_hit_tokens
        if not self._chunked and num_new > step.budget:
            return _NO_BUDGET
        num_new = min(num_new, step.budget)
        block_ids = self.kv_cache_manager.allocate_slots(request, self._with_lookahead(num_hit_tokens, num_new), hits)
        if block_ids is None:
            return _NO_ROOM
        self.waiting.pop()
        request.num_computed_tokens = num_hit_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit_tokens
        request.status = RequestStatus.RUNNING
        running = self.running
        if self._by_priority and running and running[-1].queue_key > request.queue_key:
            bisect.insort(running, request, key=_QUEUE_KEY)  # kept in (priority, arrival) order
        else:
            running.append(request)
        step.add(request, num_new, block_ids)
        return _ADMITTED

    def _cache_hits(self, request: Request):
        """The prefix-cache hits ``request`` may use. A request that wants prompt logprobs and has no output
        yet uses none (as vLLM): its prompt logprobs need every prompt position computed."""
        if request.sampling_params.prompt_logprobs is not None and request.num_output_tokens == 0:
            return [], 0
        return self.kv_cache_manager.get_computed_blocks(request)

    # ----------------------------------------------------------------- results
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Append sampled tokens (accepted drafts first), apply stop conditions, free finished requests; one
        output per request that got a token. Requests finished, aborted or preempted since ``schedule()`` are
        skipped."""
        outputs: list[EngineCoreOutput] = []
        any_finished = False
        mro = model_runner_output
        for req_id in scheduler_output.num_scheduled_tokens:
            token_id = mro.sampled_token_ids.get(req_id)
            request = self.requests.get(req_id)
            if token_id is None or request is None or request.status != RequestStatus.RUNNING:
                continue
            drafts = scheduler_output.scheduled_spec_decode_tokens.get(req_id)
            accepted = mro.accepted_draft_token_ids.get(req_id, []) if drafts else []
            if drafts:
                request.num_computed_tokens -= len(drafts) - len(accepted)  # the rejected drafts' KV is void
                self._count_spec(len(drafts), len(accepted))
            if request.num_computed_tokens != request.num_tokens + len(accepted):
                continue
            logprobs = mro.logprobs.get(req_id)
            if request.sampling_params.max_tokens == 0:  # prompt only: the sampled token is dropped
                request.status = RequestStatus.FINISHED_LENGTH_CAPPED
                new_token_ids, new_logprobs = [], []
            else:
                new_token_ids = self._append_tokens(request, [*accepted, token_id])
                new_logprobs = [] if logprobs is None else \
                    [*mro.accepted_draft_logprobs.get(req_id, []), logprobs][:len(new_token_ids)]
            outputs.append(EngineCoreOutput(
                req_id=req_id, new_token_ids=new_token_ids, new_logprobs=new_logprobs,
                finish_reason=request.get_finish_reason(), stop_reason=request.stop_reason,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                prompt_logprobs=mro.prompt_logprobs.get(req_id)))
            if request.is_finished():
                self._release(request)
                any_finished = True
            else:
                request.spec_token_ids = self._capped_drafts(request, mro.draft_token_ids.get(req_id))
        if any_finished:
            self._drop_finished_from_queues()
        return outputs

    def _append_tokens(self, request: Request, token_ids: list[int]) -> list[int]:
        """Append tokens one by one up to the first that finishes the request; the tokens appended."""
        for n, token_id in enumerate(token_ids, 1):
            request.append_output_token(token_id)
            self._check_stop(request)
            if request.is_finished():
                return token_ids[:n]
        return token_ids

    def _capped_drafts(self, request: Request, drafts: list[int] | None) -> list[int]:
        """The drafts a request may verify next step: at most as many as leave room for the sampled token
        within ``max_tokens`` and the sequence cap (a verify step emits up to len(drafts) + 1 tokens)."""
        if not drafts:
            return []
        room = self.max_model_len - request.num_tokens - 1
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens - 1)
        return list(drafts[:max(room, 0)])

    def _count_spec(self, num_drafts: int, num_accepted: int) -> None:
        self._spec_counts[0] += 1
        self._spec_counts[1] += num_drafts
        self._spec_counts[2] += num_accepted
        for pos in range(min(num_accepted, len(self._spec_per_pos))):
            self._spec_per_pos[pos] += 1

    def _check_stop(self, request: Request) -> None:
        params = request.sampling_params
        token_id = request.output_token_ids[-1]
        if request.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return
            if not params.ignore_eos and token_id in params.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                return
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        elif request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED

    def _release(self, request: Request) -> None:
        """Free a finished request's blocks and forget it (the queues are cleaned up by the caller)."""
        self.kv_cache_manager.free(request)
        self.requests.pop(request.request_id, None)
        self._num_tokens_sent.pop(request.request_id, None)
        self._finished_req_ids.add(request.request_id)

    def _drop_finished_from_queues(self) -> None:
        self.running = [r for r in self.running if not r.is_finished()]
        self.waiting.remove_finished()

    # ----------------------------------------------------------------- misc
    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache; refused (False) while requests hold blocks."""
        return self.kv_cache_manager.reset_prefix_cache()

    def make_stats(self) -> SchedulerStats:
        stats = self.kv_cache_manager.prefix_cache_stats
        return SchedulerStats(num_running=len(self.running), num_waiting=len(self.waiting),
                              kv_cache_usage=self.kv_cache_manager.usage, prefix_cache_queries=stats.queries,
                              prefix_cache_hits=stats.hits, num_preemptions=self.num_preemptions,
                              iteration_tokens=tuple(self._step_counts), iteration_tokens_sum=self._step_tokens,
                              spec_num_drafts=self._spec_counts[0], spec_num_draft_tokens=self._spec_counts[1],
                              spec_num_accepted_tokens=self._spec_counts[2],
                              spec_accepted_per_pos=tuple(self._spec_per_pos))
