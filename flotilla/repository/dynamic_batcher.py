"""The dynamic batcher's runner: an asyncio task that follows ``BatchQueue`` and executes each batch on one of
N model instances (``instance_group`` count) in worker threads, then resolves every request's future.

Contracts (the KServe v2 layer and the embeddings endpoint call only ``infer``):
- ``await batcher.infer(inputs, priority=, timeout_us=, requested_outputs=, parameters=)`` returns the
  request's outputs as a dict of numpy arrays (``infer_result``: a ``RequestResult`` with the response
  parameters and the request's queue and compute times too), or raises ``InferError`` with Triton's code and
  message:
  INVALID_ARG for a bad request (checked before queueing, so it fails alone), UNAVAILABLE for a full queue
  (at once), a queue timeout under REJECT, or a stopping batcher; INTERNAL when the model fails. A failing
  ``execute`` fails exactly the requests of its batch; an executor may also fail single requests by returning
  an exception in their place (Triton's python backend error responses), and may return an ``Executed``
  (outputs, response parameters, and the batch's compute input / infer / output times) instead of a dict.
- Cancelling the awaiting task (client gone) removes a queued request from the queue; a running one is
  computed and dropped. Nothing else is affected.
- At most one batch runs per instance; batches on different instances run concurrently. With
  ``preserve_ordering`` results are released in arrival order even when later batches finish first.
- ``stop(drain=True)`` stops admitting (UNAVAILABLE), sends what is queued without waiting for the delay,
  waits for running batches and shuts the threads down: no admitted request is lost (``drain=False`` fails
  the queued ones instead).
- ``clock`` (monotonic seconds) is injectable; after advancing a fake clock call ``wakeup()``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from flotilla.repository.batch_policy import BatchQueue, BatcherSettings, OrderedRelease
from flotilla.repository.config import ModelConfig
from flotilla.repository.errors import HTTP_STATUS, STOPPING_MESSAGE, InferError, timed_out
from flotilla.repository.tensors import ModelIO, concat_inputs, split_outputs

logger = logging.getLogger(__name__)

Outputs = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class InferRequest:
    """One checked request as an executor sees it."""
    id: int
    inputs: Mapping[str, np.ndarray]       # each (batch_size, *dims), or (*dims) for a model without batching
    batch_size: int
    requested_outputs: tuple[str, ...] = ()   # empty: all outputs
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Executed:
    """One request's result as an executor may return it: outputs, response parameters, and the compute
    times (seconds) of the batch it ran in, split as Triton's statistics split them (gathering the inputs,
    running the model, scattering the outputs)."""
    outputs: Outputs
    parameters: Mapping[str, Any] = field(default_factory=dict)
    compute_input_s: float = 0.0
    compute_infer_s: float = 0.0
    compute_output_s: float = 0.0


@dataclass(frozen=True)
class RequestResult:
    """What ``DynamicBatcher.infer_result`` returns: the outputs (the requested ones), the response parameters
    and the request's times in the batcher (queue: admitted -> its batch started; compute split as in
    ``Executed``, all of the batch's execution counted as compute_infer when the executor does not split it)."""
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    queue_s: float
    compute_input_s: float
    compute_infer_s: float
    compute_output_s: float


class BatchExecutor(Protocol):
    """One model instance. ``execute`` runs in a worker thread, never concurrently with itself, and returns
    one result per request, in order: a dict of outputs, an ``Executed``, or an exception that fails that
    request alone."""

    def execute(self, requests: Sequence[InferRequest]) -> Sequence[Outputs | Executed | BaseException]: ...


class TensorExecutor:
    """An instance of a tensor model (ONNX, torch program): concatenates the batch's inputs along the batch
    dimension (padding ragged inputs), calls ``fn`` once and splits the outputs back per request, timing the
    three parts."""

    def __init__(self, io: ModelIO, fn: Callable[[dict[str, np.ndarray]], Outputs]):
        self.io = io
        self.fn = fn

    def execute(self, requests: Sequence[InferRequest]) -> list[Executed]:
        t0 = time.perf_counter()
        batch = concat_inputs(self.io, [r.inputs for r in requests])
        t1 = time.perf_counter()
        outputs = self.fn(batch)
        t2 = time.perf_counter()
        split = split_outputs(self.io, outputs, [r.inputs for r in requests], [r.batch_size for r in requests])
        t3 = time.perf_counter()
        return [Executed(out, {}, t1 - t0, t2 - t1, t3 - t2) for out in split]


@dataclass
class BatcherStats:
    """Counters in Triton's statistics vocabulary (times in seconds of the batcher's clock)."""
    success_count: int = 0                 # requests answered with outputs
    fail_count: int = 0                    # requests answered with an error after admission (incl. timeouts)
    rejected_queue_full: int = 0           # refused at once: "Exceeds maximum queue size"
    rejected_timeout: int = 0              # timed out in the queue under REJECT
    inference_count: int = 0               # sum of successful requests' batch sizes
    execution_count: int = 0               # batches executed
    executed_count: int = 0                # requests that ran in a batch (the count of the queue / compute times)
    queue_s: float = 0.0                   # total time executed requests waited in the queue
    compute_s: float = 0.0                 # total execution time, counted per request
    compute_input_s: float = 0.0           # of which gathering inputs (per request, when the executor splits it)
    compute_infer_s: float = 0.0           # of which running the model
    compute_output_s: float = 0.0          # of which scattering outputs
    batch_sizes: dict[int, int] = field(default_factory=dict)   # executed batch size -> number of batches
    batch_compute_s: dict[int, tuple[float, float, float]] = field(default_factory=dict)   # size -> total
                                           # (input, infer, output) seconds of the batches of that size
    queue_length: int = 0                  # requests queued now
    running: int = 0                       # batches executing now


@dataclass(eq=False)
class _Pending:
    request: InferRequest
    future: asyncio.Future
    enqueued: float
    started: float | None = None


class DynamicBatcher:
    """Runs one model version's requests through Triton's dynamic batcher on ``instances``."""

    def __init__(self, settings: BatcherSettings, io: ModelIO, instances: Sequence[BatchExecutor], *,
                 clock: Callable[[], float] = time.monotonic):
        if not instances:
            raise ValueError(f"model '{settings.model}' needs at least one instance")
        self.settings = settings
        self.io = io
        self._instances = list(instances)
        self._clock = clock
        self._queue = BatchQueue(settings)
        self._ordered = OrderedRelease() if settings.preserve_ordering else None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count()
        self._free = list(range(len(self._instances)))[::-1]   # pop() hands out instance 0 first
        self._running: set[asyncio.Task] = set()
        self._stats = BatcherStats()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stopping = False
        self._broken: str | None = None

    @classmethod
    def from_config(cls, config: ModelConfig, instances: Sequence[BatchExecutor], *,
                    clock: Callable[[], float] = time.monotonic) -> "DynamicBatcher":
        return cls(BatcherSettings.from_config(config), ModelIO.from_config(config), instances, clock=clock)

    # ------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the scheduling task on the running loop (all calls must come from this loop)."""
        if self._task is not None:
            raise RuntimeError("the batcher is already started")
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=len(self._instances),
                                        thread_name_prefix=f"flotilla-{self.settings.model}")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.settings.model}")

    async def stop(self, drain: bool = True) -> None:
        """Stop admitting; drain (or fail) the queue; wait for running batches; release the threads."""
        if self._task is None:
            return
        self._stopping = True
        if not drain:
            for rid in list(self._pending):
                if self._queue.cancel(rid):
                    self._finish(rid, InferError("UNAVAILABLE", STOPPING_MESSAGE))
        self.wakeup()
        try:
            await self._task
        finally:
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
            self._pool.shutdown(wait=True)

    def wakeup(self) -> None:
        """Make the scheduler look at the queue again now (e.g. after a fake clock moved)."""
        if self._wake is not None:
            self._wake.set()

    def stats(self) -> BatcherStats:
        s = self._stats
        return BatcherStats(s.success_count, s.fail_count, s.rejected_queue_full, s.rejected_timeout,
                            s.inference_count, s.execution_count, s.executed_count, s.queue_s, s.compute_s, s.compute_input_s,
                            s.compute_infer_s, s.compute_output_s, dict(s.batch_sizes), dict(s.batch_compute_s),
                            len(self._queue), len(self._running))

    @property
    def accepting(self) -> bool:
        """True while ``infer`` admits requests (started, not stopping, not broken)."""
        return self._task is not None and not self._stopping and not self._broken

    # ------------------------------------------------------------------------------------------ infer

    async def infer(self, inputs: Mapping[str, np.ndarray], *, priority: int = 0, timeout_us: int = 0,
                    requested_outputs: Sequence[str] = (), parameters: Mapping[str, Any] | None = None
                    ) -> dict[str, np.ndarray]:
        """Run one request; see the module docstring for the errors it raises."""
        result = await self.infer_result(inputs, priority=priority, timeout_us=timeout_us,
                                         requested_outputs=requested_outputs, parameters=parameters)
        return result.outputs

    async def infer_result(self, inputs: Mapping[str, np.ndarray], *, priority: int = 0, timeout_us: int = 0,
                           requested_outputs: Sequence[str] = (), parameters: Mapping[str, Any] | None = None
                           ) -> RequestResult:
        """``infer``, returning the response parameters and the request's queue and compute times too."""
        if self._task is None or self._stopping or self._broken:
            raise InferError("UNAVAILABLE", self._broken or STOPPING_MESSAGE)
        if priority < 0 or timeout_us < 0:
            raise InferError("INVALID_ARG", f"'priority' and 'timeout' must be >= 0 for '{self.settings.model}'")
        if isinstance(requested_outputs, str):
            requested_outputs = (requested_outputs,)
        requested_outputs = self.io.select_outputs(requested_outputs) if requested_outputs else ()
        batch_size, key, inputs = self.io.check_request(inputs)
        rid = next(self._ids)
        now = self._clock()
        try:
            self._queue.enqueue(rid, batch_size, now, priority=priority, timeout_us=timeout_us, key=key,
                                length=_row_length(inputs) if self.settings.max_batch_padded_tokens else 0)
        except InferError:
            self._stats.rejected_queue_full += 1
            raise
        request = InferRequest(rid, inputs, batch_size, tuple(requested_outputs), dict(parameters or {}))
        pending = _Pending(request, asyncio.get_running_loop().create_future(), now)
        self._pending[rid] = pending
        if self._ordered is not None:
            self._ordered.admit(rid)
        self.wakeup()
        try:
            result: RequestResult = await pending.future
        except asyncio.CancelledError:
            self._abandon(rid)
            raise
        if requested_outputs:
            missing = [name for name in requested_outputs if name not in result.outputs]
            if missing:
                raise InferError("INTERNAL", f"model '{self.settings.model}' did not produce requested output "
                                             f"'{missing[0]}'")
            result = RequestResult({name: result.outputs[name] for name in requested_outputs}, result.parameters,
                                   result.queue_s, result.compute_input_s, result.compute_infer_s,
                                   result.compute_output_s)
        return result

    def _abandon(self, rid: int) -> None:
        """The caller went away: forget the request (dequeue it if it is still queued)."""
        if self._pending.pop(rid, None) is None:
            return
        self._queue.cancel(rid)
        if self._ordered is not None:
            for other, value in self._ordered.discard(rid):
                self._resolve(other, value)

    # -------------------------------------------------------------------------------------- scheduling

    async def _loop(self) -> None:
        try:
            while True:
                self._wake.clear()
                decision = self._queue.poll(self._clock(), can_execute=bool(self._free), flush=self._stopping)
                for rid in decision.rejected:
                    self._stats.rejected_timeout += 1
                    self._finish(rid, timed_out())
                if decision.batch:
                    self._dispatch(decision.batch)
                    continue
                if self._stopping and not len(self._queue) and not self._running:
                    return
                await self._sleep(decision.wait_s)
        except Exception as e:          # a defect here must not leave callers waiting forever
            logger.exception("dynamic batcher of model '%s' failed", self.settings.model)
            self._broken = f"the dynamic batcher of model '{self.settings.model}' failed: {type(e).__name__}"
            for rid in list(self._pending):
                self._queue.cancel(rid)
                self._finish(rid, InferError("INTERNAL", self._broken))
            raise

    async def _sleep(self, timeout: float | None) -> None:
        if timeout is None:
            await self._wake.wait()
            return
        handle = asyncio.get_running_loop().call_later(timeout, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            handle.cancel()

    def _dispatch(self, rids: Sequence[int]) -> None:
        instance = self._free.pop()
        start = self._clock()
        batch = []
        for rid in rids:
            pending = self._pending.get(rid)
            if pending is not None:          # a request cancelled while queued is already gone
                pending.started = start
                batch.append(pending)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._instances[instance].execute, [p.request for p in batch])
        task = loop.create_task(self._collect(instance, batch, future, start))
        self._running.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self.wakeup()

    async def _collect(self, instance: int, batch: list[_Pending], future: asyncio.Future, start: float) -> None:
        try:
            results = list(await future)
            if len(results) != len(batch):
                raise InferError("INTERNAL", f"model '{self.settings.model}' returned {len(results)} responses "
                                             f"for {len(batch)} requests")
        except asyncio.CancelledError:  # the loop is going away: answer, and keep the busy instance out of use
            for pending in batch:
                self._finish(pending.request.id, InferError("UNAVAILABLE", STOPPING_MESSAGE))
            raise
        except Exception as e:          # the whole batch fails, and only it
            results = [_as_infer_error(e, self.settings.model)] * len(batch)
        self._free.append(instance)
        end = self._clock()
        s = self._stats
        s.execution_count += 1
        size = sum(p.request.batch_size for p in batch)
        s.batch_sizes[size] = s.batch_sizes.get(size, 0) + 1
        split = next((r for r in results if isinstance(r, Executed)), None)
        times = ((split.compute_input_s, split.compute_infer_s, split.compute_output_s) if split is not None
                 else (0.0, end - start, 0.0))
        before = s.batch_compute_s.get(size, (0.0, 0.0, 0.0))
        s.batch_compute_s[size] = tuple(a + b for a, b in zip(before, times))
        s.executed_count += len(batch)
        for pending, result in zip(batch, results):
            queue_s = start - pending.enqueued
            s.queue_s += queue_s
            s.compute_s += end - start
            s.compute_input_s += times[0]
            s.compute_infer_s += times[1]
            s.compute_output_s += times[2]
            self._finish(pending.request.id, self._result(result, queue_s, times))

    def _result(self, result, queue_s: float, times: tuple[float, float, float]) -> RequestResult | InferError:
        if isinstance(result, BaseException):
            return _as_infer_error(result, self.settings.model)
        parameters: Mapping[str, Any] = {}
        if isinstance(result, Executed):
            result, parameters = result.outputs, result.parameters
        if not isinstance(result, Mapping):
            return InferError("INTERNAL", f"model '{self.settings.model}' returned a {type(result).__name__} "
                                          "instead of a dict of outputs")
        return RequestResult(dict(result), dict(parameters), queue_s, *times)

    def _finish(self, rid: int, result: RequestResult | InferError) -> None:
        """Deliver ``rid``'s result (in arrival order with preserve_ordering); forgotten requests are skipped."""
        pending = self._pending.get(rid)
        if pending is None:
            return
        if isinstance(result, InferError):
            self._stats.fail_count += 1
        else:
            self._stats.success_count += 1
            self._stats.inference_count += pending.request.batch_size
        released = [(rid, result)] if self._ordered is None else self._ordered.complete(rid, result)
        for other, value in released:
            self._resolve(other, value)

    def _resolve(self, rid: int, value: RequestResult | InferError) -> None:
        pending = self._pending.pop(rid, None)
        if pending is None or pending.future.done():
            return
        if isinstance(value, InferError):
            pending.future.set_exception(value)
        else:
            pending.future.set_result(value)


def _as_infer_error(e: BaseException, model: str) -> InferError:
    """``e`` as the request's InferError: kept when it is one; an error carrying a Triton status code
    (``code`` and ``message``, as the backends' ModelExecutionError) keeps its code and text; else INTERNAL."""
    if isinstance(e, InferError):
        return e
    code, message = getattr(e, "code", None), getattr(e, "message", None)
    if code in HTTP_STATUS and isinstance(message, str):
        return InferError(code, message)
    logger.warning("model '%s' failed a batch: %s: %s", model, type(e).__name__, e)
    return InferError("INTERNAL", f"{type(e).__name__}: {e}")


def _row_length(inputs: Mapping[str, np.ndarray]) -> int:
    """A request's per-row element count (its longest input; the batch dimension excluded)."""
    return max((int(np.prod(a.shape[1:], dtype=np.int64)) for a in inputs.values()), default=0)
