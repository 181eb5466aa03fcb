"""One loaded version of a repository model as the v2 layer serves it (``service.ServedModel``): its effective
config, v2 metadata, its instances behind one dynamic batcher, and Triton's statistics.

Contracts:
- ``ServedVersion.load(config, version_dir, version, versions_of)`` (blocking: call it in a worker thread)
  loads every instance, takes the backend's auto-completed config, normalises and validates it again (Triton
  normalises after auto-complete) and builds the batcher; a failure is a ``ModelLoadError`` /
  ``ModelConfigError`` and leaves nothing loaded. ``await start()`` starts the batcher on the running loop.
  Every model goes through the dynamic batcher: without ``dynamic_batching`` each request is a batch alone
  (Triton's default scheduler).
- ``infer`` returns an ``InferOutcome``; every failure is an ``InferError`` (Triton's code and message).
  ``infer_timed`` also returns the request's ``StepTimes`` (what an ensemble adds up).
- ``await stop(drain=True)`` stops admitting (new requests get UNAVAILABLE), finishes every admitted request,
  then finalizes the instances (in a worker thread); idempotent.
- ``statistics()`` is Triton's ``ModelStatistics`` JSON (``model_stats`` entry): request success / fail
  counts and durations and ``last_inference`` (ms since the epoch) counted here, queue and compute input /
  infer / output times and batch statistics from the batcher. Flotilla has no response cache: cache_hit and
  cache_miss stay 0.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flotilla.repository.backends import Backend
from flotilla.repository.config import ModelConfig, normalize, validate_model_config
from flotilla.repository.dynamic_batcher import BatcherStats, DynamicBatcher
from flotilla.repository.errors import InferError
from flotilla.repository.instances import executor_for, finalize_all, load_instances
from flotilla.repository.service import InferOutcome, ModelMetadata, TensorMetadata
from flotilla.repository.tensors import ModelIO

_NS = 1e9


@dataclass(frozen=True)
class StepTimes:
    """One request's times in seconds, as Triton's statistics count them."""
    queue_s: float = 0.0
    compute_input_s: float = 0.0
    compute_infer_s: float = 0.0
    compute_output_s: float = 0.0

    def __add__(self, other: "StepTimes") -> "StepTimes":
        return StepTimes(self.queue_s + other.queue_s, self.compute_input_s + other.compute_input_s,
                         self.compute_infer_s + other.compute_infer_s,
                         self.compute_output_s + other.compute_output_s)


def duration(count: int, seconds: float) -> dict[str, int]:
    """Triton's StatisticDuration JSON."""
    return {"count": int(count), "ns": int(round(seconds * _NS))}


class RequestStats:
    """Request outcomes counted where the request enters the model (success / fail, with durations)."""

    def __init__(self) -> None:
        self.success_count = self.fail_count = 0
        self.success_s = self.fail_s = 0.0
        self.last_inference_ms = 0

    def record(self, ok: bool, seconds: float) -> None:
        if ok:
            self.success_count += 1
            self.success_s += seconds
        else:
            self.fail_count += 1
            self.fail_s += seconds
        self.last_inference_ms = int(time.time() * 1000)


def model_metadata(config: ModelConfig, versions: Sequence[str]) -> ModelMetadata:
    """v2 metadata of a config: datatypes as v2 names, -1 for the batch dimension when the model batches."""
    io = ModelIO.from_config(config)
    lead = (-1,) if io.batching else ()

    def tensors(specs) -> tuple[TensorMetadata, ...]:
        return tuple(TensorMetadata(s.name, s.datatype, lead + s.dims) for s in specs.values())

    platform = config.platform or config.backend
    return ModelMetadata(config.name, tuple(versions), platform, tensors(io.inputs), tensors(io.outputs))


def statistics_json(name: str, version: str, requests: RequestStats, *, inference_count: int,
                    execution_count: int, queue: tuple[int, float], compute: tuple[int, float, float, float],
                    batch_stats: Mapping[int, tuple[int, float, float, float]] | None = None) -> dict[str, Any]:
    """Triton's ``ModelStatistics`` JSON. ``queue``: (count, seconds); ``compute``: (count, input, infer,
    output seconds); ``batch_stats``: batch size -> (executions, input, infer, output seconds)."""
    count, c_in, c_infer, c_out = compute
    return {
        "name": name, "version": version, "last_inference": requests.last_inference_ms,
        "inference_count": int(inference_count), "execution_count": int(execution_count),
        "inference_stats": {
            "success": duration(requests.success_count, requests.success_s),
            "fail": duration(requests.fail_count, requests.fail_s),
            "queue": duration(*queue),
            "compute_input": duration(count, c_in), "compute_infer": duration(count, c_infer),
            "compute_output": duration(count, c_out),
            "cache_hit": duration(0, 0.0), "cache_miss": duration(0, 0.0),
        },
        "response_stats": {},
        "batch_stats": [{"batch_size": size, "compute_input": duration(n, b_in),
                         "compute_infer": duration(n, b_infer), "compute_output": duration(n, b_out)}
                        for size, (n, b_in, b_infer, b_out) in sorted((batch_stats or {}).items())],
        "memory_usage": [],
    }


class ServedVersion:
    """One version of a backend model (see the module contract). Event-loop thread only, except ``load``."""

    def __init__(self, config: ModelConfig, version: int, instances: Sequence[Backend],
                 versions_of: Callable[[], Sequence[str]]):
        self.name = config.name
        self.version = str(version)
        self._config = config
        self._instances = list(instances)
        self._versions_of = versions_of
        self._metadata = model_metadata(config, (self.version,))
        self.batcher = DynamicBatcher.from_config(config, [executor_for(b) for b in self._instances])
        self._requests = RequestStats()
        self._stopped = False

    @classmethod
    def load(cls, config: ModelConfig, version_dir: Path, version: int,
             versions_of: Callable[[], Sequence[str]]) -> "ServedVersion":
        """Load the version's instances and build it (blocking; see the module contract)."""
        instances = load_instances(config, version_dir)
        try:
            effective = ModelConfig()
            effective.CopyFrom(instances[0].config)
            normalize(effective)
            validate_model_config(effective)
            return cls(effective, version, instances, versions_of)
        except BaseException:
            finalize_all(instances)
            raise

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self, drain: bool = True) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            await self.batcher.stop(drain=drain)
        finally:
            await asyncio.to_thread(finalize_all, self._instances)

    # ----------------------------------------------------------------------------------- ServedModel

    def metadata(self) -> ModelMetadata:
        m = self._metadata
        return ModelMetadata(m.name, tuple(self._versions_of()) or (self.version,), m.platform, m.inputs,
                             m.outputs)

    def config(self) -> ModelConfig:
        return self._config

    def ready(self) -> bool:
        return self.batcher.accepting

    async def infer(self, inputs: Mapping[str, np.ndarray], *, requested_outputs: Sequence[str] = (),
                    parameters: Mapping[str, Any] | None = None, priority: int = 0,
                    timeout_us: int = 0) -> InferOutcome:
        outcome, _ = await self.infer_timed(inputs, requested_outputs=requested_outputs, parameters=parameters,
                                            priority=priority, timeout_us=timeout_us)
        return outcome

    async def infer_timed(self, inputs: Mapping[str, np.ndarray], *, requested_outputs: Sequence[str] = (),
                          parameters: Mapping[str, Any] | None = None, priority: int = 0,
                          timeout_us: int = 0) -> tuple[InferOutcome, StepTimes]:
        start, ok = time.perf_counter(), False
        try:
            result = await self.batcher.infer_result(inputs, requested_outputs=requested_outputs,
                                                     parameters=parameters, priority=priority,
                                                     timeout_us=timeout_us)
            ok = True
        finally:
            self._requests.record(ok, time.perf_counter() - start)
        times = StepTimes(result.queue_s, result.compute_input_s, result.compute_infer_s, result.compute_output_s)
        return InferOutcome(result.outputs, result.parameters), times

    def pending_request_count(self) -> int:
        """Requests queued in the dynamic batcher now (Triton's ``nv_inference_pending_request_count``)."""
        return self.batcher.stats().queue_length

    def statistics(self) -> dict[str, Any]:
        s: BatcherStats = self.batcher.stats()
        batches = {size: (n, *s.batch_compute_s.get(size, (0.0, 0.0, 0.0))) for size, n in s.batch_sizes.items()}
        return statistics_json(self.name, self.version, self._requests, inference_count=s.inference_count,
                               execution_count=s.execution_count, queue=(s.executed_count, s.queue_s),
                               compute=(s.executed_count, s.compute_input_s, s.compute_infer_s,
                                        s.compute_output_s), batch_stats=batches)

    def generate(self, text_input: str, parameters: Mapping[str, Any]):
        raise InferError("UNSUPPORTED", f"model '{self.name}' does not support the generate extension (it is "
                                        f"not an LLM)")
