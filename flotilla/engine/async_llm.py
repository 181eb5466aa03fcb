"""AsyncLLM: the streaming engine API for servers (``async for out in engine.generate(...)``).

The frontend (this object) tokenizes, validates and detokenizes; the engine core (scheduler + model) runs
in its own process (``core_proc``), so a saturated model never blocks the caller's event loop. One
background thread receives the core's outputs, detokenizes them and hands each request's outputs to its
asyncio queue with ``call_soon_threadsafe`` (so any event loop, or several in turn, can use the engine).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.core import EngineCoreOutputs, make_child_requests
from flotilla.engine.core_proc import CoreProcessClient
from flotilla.engine.input_processor import InputProcessor, PromptType
from flotilla.engine.llm_engine import load_tokenizer, require_generative
from flotilla.engine.messages import AbortRequests, AddRequest, Failed, Outputs
from flotilla.engine.output_processor import OutputKind, OutputProcessor
from flotilla.errors import EngineDeadError, InvalidRequestError
from flotilla.outputs import RequestOutput
from flotilla.request import check_priority
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.scheduler import SchedulerStats

logger = logging.getLogger(__name__)

_ABORTED = object()  # put on a request's queue by abort(): its stream ends


class AsyncLLM:
    """Streams RequestOutputs per request; ``abort(request_id)`` (or leaving the ``async for``) frees it.

    Contract: ``generate`` validates before queuing (``InvalidRequestError`` goes to the caller only);
    outputs are cumulative by default, or deltas with ``output_kind=OutputKind.DELTA``. An aborted stream
    ends at its next iteration. If the core process fails or exits (``shutdown()`` included), every
    in-flight request raises ``EngineDeadError``, ``is_dead`` turns True and new requests are refused;
    ``dead_error`` is then an ``EngineDeadError`` whose message is fit for clients (details are logged).
    ``latest_stats`` is the core's last scheduler snapshot (refreshed after every step, and after aborts
    while idle); ``num_queued_requests`` counts requests not yet scheduled. Outputs' ``metrics`` carry
    ``arrival_time``, ``first_scheduled_time`` and ``first_token_time`` (``time.monotonic()``).
    ``generate(..., priority=0)``: the request's scheduling priority (vLLM's: lower is served earlier; see
    ``LLMEngine``); a value that is not a 64-bit integer is an ``InvalidRequestError``.
    """

    def __init__(self, args: EngineArgs):
        self.config = args.create_engine_config()
        require_generative(self.config)
        self.model_config = self.config.model
        self.tokenizer = load_tokenizer(self.config)
        self.input_processor = InputProcessor(self.tokenizer, self.model_config.vocab_size,
                                              self.model_config.max_model_len, self.config.structured_outputs.backend)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._client = CoreProcessClient(args)
        self.num_blocks = self._client.num_blocks
        self._lock = threading.Lock()  # guards output_processor, _queues, _queued
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._queued: set[str] = set()
        self.num_scheduled_requests_total = 0  # requests that ever left the queue
        self.latest_stats = SchedulerStats(0, 0, 0.0, 0, 0, 0)
        self.dead_error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._output_loop, name="flotilla-outputs", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLM":
        return cls(args)

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def num_queued_requests(self) -> int:
        return len(self._queued)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None, request_id: str,
                       output_kind: OutputKind = OutputKind.CUMULATIVE,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        self._check_alive()
        check_priority(priority)
        processed = self.input_processor.process(prompt, sampling_params or SamplingParams())
        queue: asyncio.Queue = asyncio.Queue()
        self._add(request_id, processed, output_kind, (asyncio.get_running_loop(), queue), priority)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if item is _ABORTED:
                    return
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed: {item}") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def _add(self, request_id: str, processed, output_kind: OutputKind, target, priority: int) -> None:
        with self._lock:
            self._check_alive()  # under the lock: a concurrent failure either sees this queue or we see it
            if request_id in self._queues or request_id in self.output_processor.requests:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
            child_ids = self.output_processor.add_request(request_id, processed.prompt, processed.prompt_token_ids,
                                                          processed.params, output_kind)
            self._queues[request_id] = target
            self._queued.add(request_id)
        children = make_child_requests(request_id, processed.prompt_token_ids, processed.params, child_ids,
                                       time.monotonic(), processed.cache_salt, priority)
        try:
            for child in children:
                self._client.send(AddRequest(child))
        except BaseException:  # e.g. the core died before the output thread noticed: forget the request
            self.abort(request_id)
            raise

    def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._lock:
            child_ids = self.output_processor.abort_requests(ids)
            targets = [self._queues.pop(rid, None) for rid in ids]
            self._queued.difference_update(ids)
        if child_ids and not self.is_dead:
            try:
                self._client.send(AbortRequests(child_ids, stopped=False))
            except EngineDeadError:
                pass  # the core is gone, and with it the request's blocks
        for target in targets:
            if target is not None:
                _deliver(target, _ABORTED)

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_error}")

    def shutdown(self) -> None:
        self._stopped = True
        self._thread.join(timeout=5)
        self._client.close()

    # ---- the output thread ------------------------------------------------------------------------
    def _output_loop(self) -> None:
        try:
            while not self._stopped:
                msg = self._client.recv(timeout_ms=200)
                if msg is None:
                    if not self._client.is_alive() and not self._stopped:
                        raise EngineDeadError(f"the engine core process exited (code {self._client.proc.returncode})")
                    continue
                if isinstance(msg, Failed):
                    raise EngineDeadError(msg.error)
                if isinstance(msg, Outputs):
                    self._on_outputs(msg.outputs)
        except BaseException as e:  # noqa: BLE001 - any failure must reach every waiter
            if isinstance(e, EngineDeadError):
                logger.error("engine failed: %s", e)
            else:  # a bug in this loop: its text (and stack) stays in the log, clients get plain words
                logger.exception("engine output loop failed")
                e = EngineDeadError("the engine failed unexpectedly")
            self._fail_all(e)
        else:  # shut down: streams still open must end rather than wait forever
            self._fail_all(EngineDeadError("the engine was shut down"))

    def _fail_all(self, e: BaseException) -> None:
        if self.dead_error is None:
            self.dead_error = e
        with self._lock:
            waiters = list(self._queues.values())
            self._queues.clear()
            self._queued.clear()
        for target in waiters:
            _deliver(target, e)

    def _on_outputs(self, outs: EngineCoreOutputs) -> None:
        if outs.stats is not None:
            self.latest_stats = outs.stats
        with self._lock:
            started = self.output_processor.mark_scheduled(outs.scheduled_ids, outs.timestamp)
            self._queued.difference_update(started)
            self.num_scheduled_requests_total += len(started)
            processed = self.output_processor.process_outputs(outs.outputs)
            deliveries = []
            for out in processed.request_outputs:
                target = self._queues.get(out.request_id)
                if out.finished:
                    self._queues.pop(out.request_id, None)
                    self._queued.discard(out.request_id)
                if target is not None:
                    deliveries.append((target, out))
        if processed.child_ids_to_stop:
            self._client.send(AbortRequests(processed.child_ids_to_stop, stopped=True))
        for target, out in deliveries:
            _deliver(target, out)


def _deliver(target, item) -> None:
    loop, queue = target
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # that event loop is closed: nobody is listening any more
        pass
