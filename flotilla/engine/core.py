"""EngineCore: the scheduler and the executor, i.e. everything that runs the model.

It takes already-tokenized, validated requests (one per sample: ``n`` is fanned out by the frontend) and
returns token ids; tokenizing and detokenizing stay in the frontend (``LLMEngine`` in-process, or
``AsyncLLM`` talking to a core process).
"""

from __future__ import annotations

import collections
import logging
import time

import msgspec

from flotilla.config import EngineConfig
from flotilla.errors import ModelLoadError
from flotilla.executor.base import Executor
from flotilla.request import Request, RequestStatus
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.output import EngineCoreOutput
from flotilla.scheduler.scheduler import Scheduler, SchedulerStats
from flotilla.wire import WireStruct

logger = logging.getLogger(__name__)


class EngineCoreRequest(WireStruct):
    """One sequence to generate (a request with n > 1 becomes n of these, ids "<i>_<parent id>").

    ``request_id``: the sequence's id; ``prompt_token_ids``: its prompt; ``sampling_params``: validated,
    with the model's EOS ids filled in; ``arrival_time``: ``time.monotonic()`` of the frontend when it came;
    ``cache_salt``: prefix-cache blocks are shared only between requests of the same salt (None: unsalted);
    ``priority``: the scheduling priority (vLLM's: lower is served earlier, default 0; a 64-bit integer,
    checked by the frontend).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    cache_salt: str | None = None
    priority: int = 0


class EngineCoreOutputs(WireStruct):
    """One step's results: ``outputs`` (per-sequence progress), ``scheduled_ids`` (sequences scheduled for
    the first time: they left the queue), ``stats`` (a scheduler snapshot) and ``timestamp`` (the core's
    ``time.monotonic()``)."""

    outputs: list[EngineCoreOutput] = msgspec.field(default_factory=list)
    scheduled_ids: list[str] = msgspec.field(default_factory=list)
    stats: SchedulerStats | None = None
    timestamp: float = 0.0


def make_child_requests(request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                        child_ids: list[str], arrival_time: float, cache_salt: str | None = None,
                        priority: int = 0) -> list[EngineCoreRequest]:
    """Fan a request out into one core request per sample (all with the request's cache salt and priority);
    seeded samples get seed + i."""
    children = []
    for i, cid in enumerate(child_ids):
        child_params = params
        if params.n > 1:
            child_params = params.clone(n=1, seed=None if params.seed is None else params.seed + i)
        children.append(EngineCoreRequest(cid, prompt_token_ids, child_params, arrival_time, cache_salt, priority))
    return children


class EngineCore:
    """Schedules and executes. Contract: ``step()`` is only called with unfinished requests present and
    returns every sequence's progress; aborts free KV blocks at once."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.executor = Executor.get_class(config)(config)
        num_blocks = self.executor.determine_num_blocks()
        needed = -(-config.model.max_model_len // config.cache.block_size)
        if num_blocks < needed:
            self.executor.shutdown()
            raise ModelLoadError(
                f"the KV cache budget holds {num_blocks} blocks of {config.cache.block_size} tokens, fewer than "
                f"one max_model_len ({config.model.max_model_len}) sequence needs ({needed}); raise "
                f"kv_cache_memory / num_kv_blocks or lower max_model_len")
        self.executor.initialize_cache(num_blocks)
        self.num_blocks = num_blocks
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, config.speculative)
        # Steps in flight (pipeline parallelism): (scheduler output, handle), oldest first.
        self.batch_queue: collections.deque = collections.deque()
        self.max_batches = self.executor.max_concurrent_batches
        self.peak_batches_in_flight = 0

    def add_request(self, req: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request(req.request_id, req.prompt_token_ids, req.sampling_params,
                                           req.arrival_time, cache_salt=req.cache_salt, priority=req.priority))

    def finish_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED):
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.batch_queue)

    def step(self) -> EngineCoreOutputs:
        if self.max_batches > 1:
            return self._step_with_batch_queue()
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        return self._outputs(outputs, [scheduler_output])

    def _step_with_batch_queue(self) -> EngineCoreOutputs:
        """Keep up to ``max_batches`` steps in flight so pipeline stages overlap.

        Requests of an in-flight step are not schedulable again until its tokens arrive (their computed
        tokens already reach their known tokens), so each new step takes other requests or prompt chunks.
        Returns after submitting when the queue still has room, else after completing the oldest step.
        """
        submitted = []
        if len(self.batch_queue) < self.max_batches:
            pending = min(self.scheduler.num_running + self.scheduler.num_waiting,
                          self.config.scheduler.max_num_seqs)
            so = self.scheduler.schedule(max_num_reqs=max(1, -(-pending // self.max_batches)))
            if so.total_num_scheduled_tokens > 0 or so.finished_req_ids:
                self.batch_queue.append((so, self.executor.execute_model_async(so)))
                self.peak_batches_in_flight = max(self.peak_batches_in_flight, len(self.batch_queue))
                submitted.append(so)
                if len(self.batch_queue) < self.max_batches and so.total_num_scheduled_tokens > 0:
                    return self._outputs([], submitted)
        if not self.batch_queue:
            return self._outputs([], submitted)
        so, handle = self.batch_queue.popleft()
        return self._outputs(self.scheduler.update_from_output(so, handle.result()), submitted)

    def _outputs(self, outputs, submitted) -> EngineCoreOutputs:
        scheduled = [r.req_id for so in submitted for r in so.scheduled_new_reqs]
        return EngineCoreOutputs(outputs, scheduled, self.scheduler.make_stats(), time.monotonic())

    def shutdown(self) -> None:
        self.executor.shutdown()
