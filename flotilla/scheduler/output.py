"""The batch contract between the scheduler and the workers (documented dataclasses, msgpack-friendly).

``SchedulerOutput`` ships diffs: a request's full prompt and sampling parameters travel once (in
``scheduled_new_reqs``, also when it resumes after preemption); afterwards only the new block ids and the
tokens appended since it was last scheduled travel (``scheduled_cached_reqs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flotilla.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the workers have not seen (or must rebuild after preemption).

    ``all_token_ids`` is prompt + output so far (output is non-empty only on resume after preemption);
    ``block_ids`` is the full block table; ``num_computed_tokens`` is how many tokens already have KV
    (prefix cache hits).
    """

    req_id: str
    prompt_token_ids: list[int]
    all_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the workers already hold: what changed since it was last scheduled.

    ``new_token_ids``: tokens appended to the request since the workers last saw it (sampled tokens);
    ``new_block_ids``: blocks appended to its block table; ``num_computed_tokens``: KV tokens before this step.
    """

    req_id: str
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """One engine step. ``num_scheduled_tokens[req_id]`` tokens of each request are computed this step.

    ``finished_req_ids``: requests finished/aborted/preempted since the last step whose worker state can be
    dropped (preempted requests come back as new requests).
    """

    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)

    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    """What the workers return for one step.

    ``sampled_token_ids[req_id]`` is set only for requests whose computation reached their last known
    token this step (a prefill chunk in the middle of a prompt samples nothing).
    ``logprobs[req_id]`` (when the request asked for them) is ``(token_ids, logprobs, ranks)`` where index 0
    is the sampled token and the rest the top-N in order.
    """

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, tuple[list[int], list[float], list[int]]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """One request's progress after a step, from the scheduler to the output processor."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[tuple[list[int], list[float], list[int]]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
