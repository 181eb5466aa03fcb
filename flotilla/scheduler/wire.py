"""msgpack encoding of the batch contract (SchedulerOutput, ModelRunnerOutput) for worker processes.

Only documented dataclasses of primitives cross process boundaries; never pickle.
"""

from __future__ import annotations

import dataclasses

import msgpack

from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.output import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput

_PARAM_FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]


def params_to_wire(p: SamplingParams) -> dict:
    d = {name: getattr(p, name) for name in _PARAM_FIELDS}
    d["eos_token_ids"] = list(d["eos_token_ids"])
    return d


def params_from_wire(d: dict) -> SamplingParams:
    d = dict(d)
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return SamplingParams(**d)


def scheduler_output_to_wire(so: SchedulerOutput) -> dict:
    return {
        "new": [[r.req_id, r.prompt_token_ids, r.all_token_ids, params_to_wire(r.sampling_params), r.block_ids,
                 r.num_computed_tokens] for r in so.scheduled_new_reqs],
        "cached": [[r.req_id, r.new_token_ids, r.new_block_ids, r.num_computed_tokens]
                   for r in so.scheduled_cached_reqs],
        "num": so.num_scheduled_tokens,
        "total": so.total_num_scheduled_tokens,
        "finished": sorted(so.finished_req_ids),
        "preempted": sorted(so.preempted_req_ids),
    }


def scheduler_output_from_wire(d: dict) -> SchedulerOutput:
    return SchedulerOutput(
        scheduled_new_reqs=[NewRequestData(r[0], r[1], r[2], params_from_wire(r[3]), r[4], r[5]) for r in d["new"]],
        scheduled_cached_reqs=[CachedRequestData(*r) for r in d["cached"]],
        num_scheduled_tokens=dict(d["num"]), total_num_scheduled_tokens=d["total"],
        finished_req_ids=set(d["finished"]), preempted_req_ids=set(d["preempted"]))


def runner_output_to_wire(out: ModelRunnerOutput) -> dict:
    return {"sampled": out.sampled_token_ids, "logprobs": {k: list(v) for k, v in out.logprobs.items()}}


def runner_output_from_wire(d: dict) -> ModelRunnerOutput:
    return ModelRunnerOutput(dict(d["sampled"]), {k: tuple(v) for k, v in d["logprobs"].items()})


def pack(kind: str, payload) -> bytes:
    return msgpack.packb([kind, payload], use_bin_type=True)


def unpack(data: bytes):
    kind, payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return kind, payload
