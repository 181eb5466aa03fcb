"""Request: the scheduler's view of one sequence being generated (pure Python, no torch)."""

from __future__ import annotations

import enum
import time

from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import SamplingParams

# Request priorities follow vLLM: an integer, lower is served earlier, 0 is the default (online traffic).
# ``BATCH_PRIORITY`` is what offline batch work (run-batch, the Batches API, Spark, Ray Data) submits at: behind
# every request of priority 0 in the waiting queue under either scheduling policy (see ``Scheduler``), and
# behind any online priority below it under "priority"; ``priority`` values above it rank after batch work.
BATCH_PRIORITY = 1 << 20
PRIORITY_MIN, PRIORITY_MAX = -(2**63), 2**63 - 1  # what crosses a process (msgpack int64)


def check_priority(priority) -> int:
    """``priority`` if it is an int in int64 range (not a bool), else ``InvalidRequestError`` naming it."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidRequestError(f"priority must be an integer, got {type(priority).__name__}", "priority")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidRequestError(f"priority must fit in 64 bits (between {PRIORITY_MIN} and {PRIORITY_MAX}), got "
                                  f"{priority}", "priority")
    return priority


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        return status >= RequestStatus.FINISHED_STOPPED

    @staticmethod
    def finish_reason(status: "RequestStatus") -> str | None:
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence: prompt tokens, generated tokens and how far the KV cache has computed them.

    Contract (the one scheduling model of DESIGN.md): the request's target is ``num_tokens``
    (prompt + output); ``num_computed_tokens`` counts tokens whose KV is in the cache. Each step the
    scheduler grants it some of the remaining tokens; when ``num_computed_tokens`` reaches
    ``num_tokens`` the model samples one new token, which ``append_output_token`` adds.
    Preemption by recompute resets ``num_computed_tokens`` to 0.
    ``block_hashes`` holds the sha256 chain hash of each full block of ``all_token_ids`` computed so far
    (maintained by the KV cache manager). ``cache_salt`` separates tenants' prefix caches.
    ``priority`` (vLLM's: lower is served earlier, default 0) and ``arrival_seq`` (the order in which the
    scheduler received it, set by ``Scheduler.add_request``) give its place in the waiting queue:
    ``queue_key = (priority, arrival_seq)``, smallest first. ``spec_token_ids``: draft tokens proposed for it
    (speculative decoding), scheduled after its known tokens in its next step.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 arrival_time: float | None = None, cache_salt: str | None = None, priority: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.cache_salt = cache_salt
        self.priority = priority
        self.arrival_seq = 0
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prompt tokens served from the prefix cache at first scheduling
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.block_hashes: list[bytes] = []
        self.spec_token_ids: list[int] = []  # draft tokens to verify in its next step (speculative decoding)

    @property
    def queue_key(self) -> tuple[int, int]:
        return self.priority, self.arrival_seq

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finish_reason(self) -> str | None:
        return RequestStatus.finish_reason(self.status)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
