"""The driver <-> worker-rank messages (mp, external-launcher and Ray executors alike).

The driver (rank 0) sends every rank a ``ToWorker`` message; ranks answer with ``FromWorker`` messages.
Both are tagged unions of ``WireStruct``s, encoded with ``flotilla.wire`` (never pickle): ``TO_WORKER`` and
``FROM_WORKER`` are their codecs, and decoding anything else raises ``WireError``.
"""

from __future__ import annotations

from typing import Any, Union

from flotilla.scheduler.output import ModelRunnerOutput, SchedulerOutput
from flotilla.wire import Codec, WireError, WireStruct


class Step(WireStruct, tag="step"):
    """Driver -> every rank: run one engine step (``scheduler_output``, a diff against the last step)."""

    scheduler_output: SchedulerOutput


class Rpc(WireStruct, tag="rpc"):
    """Driver -> every rank: call the public Worker method ``method`` with positional ``args`` (plain
    msgpack values) and reply with an ``RpcResult``."""

    method: str
    args: list[Any]


class Shutdown(WireStruct, tag="shutdown"):
    """Driver -> every rank: leave the serve loop and exit."""


class StepResult(WireStruct, tag="out"):
    """The sampling rank (TP rank 0 of the last pipeline stage) -> driver: one step's ``output``."""

    output: ModelRunnerOutput


class RpcResult(WireStruct, tag="result"):
    """Every rank -> driver: the return ``value`` (plain msgpack) of an ``Rpc`` on ``rank``."""

    rank: int
    value: Any


class Ready(WireStruct, tag="ready"):
    """A Ray rank actor -> the Ray executor: joined the process group as ``tp_rank`` / ``pp_rank`` and loaded
    its shard."""

    tp_rank: int
    pp_rank: int


ToWorker = Union[Step, Rpc, Shutdown]
FromWorker = Union[StepResult, RpcResult, Ready]
TO_WORKER: Codec[ToWorker] = Codec(ToWorker, "driver -> worker message")
FROM_WORKER: Codec[FromWorker] = Codec(FromWorker, "worker -> driver message")


def expect(msg, kind: type):
    """``msg`` if it is a ``kind`` message; else ``WireError`` (the other side broke the protocol)."""
    if not isinstance(msg, kind):
        raise WireError(f"expected a {kind.__name__} message, got {type(msg).__name__}")
    return msg
