"""The batch contract between the scheduler and the workers: documented wire types (msgspec Structs).

``SchedulerOutput`` ships diffs: a request's full prompt and sampling parameters travel once (in
``scheduled_new_reqs``, also when it resumes after preemption); afterwards only the new block ids and the
tokens appended since it was last scheduled travel (``scheduled_cached_reqs``). These types are what the
driver sends to every worker rank and what the sampling rank sends back (``flotilla.scheduler.wire``), and
what the engine core sends its frontend (``EngineCoreOutput``); ``flotilla.wire`` says how they are encoded.
"""

from __future__ import annotations

import msgspec

from flotilla.sampling_params import SamplingParams
from flotilla.wire import WireStruct

# One position's logprobs: (token ids, logprobs, ranks); index 0 is the sampled token, the rest the top-N.
PositionLogprobs = tuple[list[int], list[float], list[int]]


class NewRequestData(WireStruct):
    """A request the workers have not seen (or must rebuild after preemption).

    ``req_id``: the scheduler's id of the sequence; ``prompt_token_ids``: its prompt;
    ``all_token_ids``: prompt + output so far (output is non-empty only on resume after preemption);
    ``sampling_params``: how to sample it; ``block_ids``: the full block table; ``num_computed_tokens``: how
    many tokens already have KV (prefix cache hits).
    """

    req_id: str
    prompt_token_ids: list[int]
    all_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


class CachedRequestData(WireStruct):
    """A request the workers already hold: what changed since it was last scheduled.

    ``req_id``: the sequence; ``new_token_ids``: tokens appended to it since the workers last saw it (sampled
    tokens); ``new_block_ids``: blocks appended to its block table; ``num_computed_tokens``: KV tokens
    before this step.
    """

    req_id: str
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int


class SchedulerOutput(WireStruct):
    """One engine step. ``num_scheduled_tokens[req_id]`` tokens of each request are computed this step
    (``total_num_scheduled_tokens`` in all).

    ``finished_req_ids``: requests finished/aborted/preempted since the last step whose worker state can be
    dropped (preempted requests come back as new requests, and are also listed in ``preempted_req_ids``).
    ``scheduled_spec_decode_tokens[req_id]`` (speculative decoding, vLLM's name): the draft tokens computed
    after the request's known tokens this step; they are the last ``len(...)`` of its scheduled tokens.
    """

    scheduled_new_reqs: list[NewRequestData] = msgspec.field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = msgspec.field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = msgspec.field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_req_ids: set[str] = msgspec.field(default_factory=set)
    preempted_req_ids: set[str] = msgspec.field(default_factory=set)
    scheduled_spec_decode_tokens: dict[str, list[int]] = msgspec.field(default_factory=dict)

    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


class ModelRunnerOutput(WireStruct):
    """What the workers return for one step.

    ``sampled_token_ids[req_id]`` is set only for requests whose computation reached their last known
    token this step (a prefill chunk in the middle of a prompt samples nothing).
    ``logprobs[req_id]`` (when the request asked for them) is the sampled position's ``PositionLogprobs``.
    ``prompt_logprobs[req_id]`` (when the request asked for them) is set in the step its prompt completes:
    one ``PositionLogprobs`` per prompt token after the first (index 0 is that prompt token, then the top-K).
    Speculative decoding: ``accepted_draft_token_ids[req_id]`` are the scheduled draft tokens the target
    accepted (a prefix of them; they precede ``sampled_token_ids[req_id]`` in the output; absent: none), with
    their logprobs in ``accepted_draft_logprobs[req_id]``; ``draft_token_ids[req_id]`` are the drafts proposed
    for the request's next step (after the accepted and sampled tokens).
    """

    sampled_token_ids: dict[str, int] = msgspec.field(default_factory=dict)
    logprobs: dict[str, PositionLogprobs] = msgspec.field(default_factory=dict)
    prompt_logprobs: dict[str, list[PositionLogprobs]] = msgspec.field(default_factory=dict)
    accepted_draft_token_ids: dict[str, list[int]] = msgspec.field(default_factory=dict)
    accepted_draft_logprobs: dict[str, list[PositionLogprobs]] = msgspec.field(default_factory=dict)
    draft_token_ids: dict[str, list[int]] = msgspec.field(default_factory=dict)


class EngineCoreOutput(WireStruct):
    """One request's progress after a step, from the scheduler to the output processor.

    ``req_id``: the sequence; ``new_token_ids``: tokens sampled this step; ``new_logprobs``: one
    ``PositionLogprobs`` per new token when the request asked for logprobs, else empty; ``finish_reason``:
    "stop" | "length" | "abort" once finished, else None; ``stop_reason``: the stop token id that ended it
    (or a stop string, set by the frontend); ``num_cached_tokens``: prompt tokens served from the prefix cache;
    ``prompt_logprobs``: with the request's first output when it asked for them, one ``PositionLogprobs`` per
    prompt token after the first. ``new_token_ids`` is empty only for a request with ``max_tokens=0``.
    """

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] = msgspec.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[PositionLogprobs] | None = None
