"""EngineCore: the scheduler and the executor, i.e. everything that runs the model.

It takes already-tokenized, validated requests (one per sample: ``n`` is fanned out by the frontend) and
returns token ids; tokenizing and detokenizing stay in the frontend (``LLMEngine`` in-process, or
``AsyncLLM`` talking to a core process).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flotilla.config import EngineConfig
from flotilla.errors import ModelLoadError
from flotilla.executor.base import Executor
from flotilla.request import Request, RequestStatus
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.output import EngineCoreOutput
from flotilla.scheduler.scheduler import Scheduler, SchedulerStats

logger = logging.getLogger(__name__)


@dataclass
class EngineCoreRequest:
    """One sequence to generate (a request with n > 1 becomes n of these, ids "<i>_<parent id>")."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float


@dataclass
class EngineCoreOutputs:
    """One step's results: per-sequence progress, the ids scheduled for the first time (they left the
    queue), and a stats snapshot."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    scheduled_ids: list[str] = field(default_factory=list)
    stats: SchedulerStats | None = None
    timestamp: float = 0.0


def make_child_requests(request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                        child_ids: list[str], arrival_time: float) -> list[EngineCoreRequest]:
    """Fan a request out into one core request per sample; seeded samples get seed + i."""
    children = []
    for i, cid in enumerate(child_ids):
        child_params = params
        if params.n > 1:
            child_params = params.clone(n=1, seed=None if params.seed is None else params.seed + i)
        children.append(EngineCoreRequest(cid, prompt_token_ids, child_params, arrival_time))
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
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks)

    def add_request(self, req: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request(req.request_id, req.prompt_token_ids, req.sampling_params,
                                           req.arrival_time))

    def finish_requests(self, request_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED):
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        scheduled = [r.req_id for r in scheduler_output.scheduled_new_reqs]
        return EngineCoreOutputs(outputs, scheduled, self.scheduler.make_stats(), time.monotonic())

    def shutdown(self) -> None:
        self.executor.shutdown()
