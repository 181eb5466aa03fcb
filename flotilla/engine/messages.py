"""The frontend <-> core-process wire format: typed messages encoded with msgpack (never pickle).

Each message is ``[kind, payload]``; payloads are plain dicts/lists built from the documented dataclasses
of ``flotilla.engine.core`` and ``flotilla.scheduler.output``.
"""

from __future__ import annotations

import dataclasses
import enum

import msgpack

from flotilla.engine.core import EngineCoreOutputs, EngineCoreRequest
from flotilla.scheduler.wire import params_from_wire, params_to_wire
from flotilla.scheduler.output import EngineCoreOutput
from flotilla.scheduler.scheduler import SchedulerStats


class Kind(str, enum.Enum):
    # frontend -> core
    ADD = "add"
    ABORT = "abort"  # payload: {"ids": [...], "stopped": bool}
    SHUTDOWN = "shutdown"
    # core -> frontend
    READY = "ready"  # payload: {"num_blocks": int}
    OUTPUTS = "outputs"
    FAILED = "failed"  # payload: {"error": str, "type": str}; the core is gone


def encode(kind: Kind, payload) -> bytes:
    return msgpack.packb([kind.value, payload], use_bin_type=True)


def decode(data: bytes) -> tuple[Kind, object]:
    kind, payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return Kind(kind), payload


def request_to_wire(req: EngineCoreRequest) -> dict:
    return {"id": req.request_id, "prompt": req.prompt_token_ids, "params": params_to_wire(req.sampling_params),
            "arrival": req.arrival_time, "salt": req.cache_salt}


def request_from_wire(d: dict) -> EngineCoreRequest:
    return EngineCoreRequest(d["id"], list(d["prompt"]), params_from_wire(d["params"]), d["arrival"], d.get("salt"))


def outputs_to_wire(out: EngineCoreOutputs) -> dict:
    rows = [[o.req_id, o.new_token_ids, [list(lp) for lp in o.new_logprobs], o.finish_reason, o.stop_reason,
             o.num_cached_tokens] for o in out.outputs]
    stats = dataclasses.asdict(out.stats) if out.stats is not None else None
    return {"outputs": rows, "scheduled": out.scheduled_ids, "stats": stats, "ts": out.timestamp}


def outputs_from_wire(d: dict) -> EngineCoreOutputs:
    outputs = [EngineCoreOutput(req_id=r[0], new_token_ids=r[1], new_logprobs=[tuple(lp) for lp in r[2]],
                                finish_reason=r[3], stop_reason=r[4], num_cached_tokens=r[5])
               for r in d["outputs"]]
    stats = SchedulerStats(**d["stats"]) if d["stats"] is not None else None
    return EngineCoreOutputs(outputs, list(d["scheduled"]), stats, d["ts"])
