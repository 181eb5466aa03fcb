"""AsyncLLM: the streaming engine API for servers (``async for out in engine.generate(...)``).

The engine loop runs on its own thread so the event loop stays free; outputs cross back to the loop with
``call_soon_threadsafe`` into one asyncio queue per request. (The server issue may move the loop into its
own process behind the same API.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.input_processor import PromptType
from flotilla.engine.llm_engine import LLMEngine
from flotilla.engine.output_processor import OutputKind
from flotilla.errors import EngineDeadError, InvalidRequestError
from flotilla.outputs import RequestOutput
from flotilla.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_ABORTED = object()  # put on a request's queue by abort(): its stream ends


class AsyncLLM:
    """Streams RequestOutputs per request; ``abort(request_id)`` (or leaving the ``async for``) frees it.

    Contract: ``generate`` validates before queuing (``InvalidRequestError`` raised to the caller only);
    outputs are cumulative by default, or deltas with ``output_kind=OutputKind.DELTA``. After ``abort`` the
    request's ``async for`` ends at its next iteration (no finished output). If the engine loop
    fails, every in-flight request raises ``EngineDeadError`` and ``is_dead`` turns True.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="flotilla-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLM":
        return cls(LLMEngine.from_engine_args(args))

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None, request_id: str,
                       output_kind: OutputKind = OutputKind.CUMULATIVE) -> AsyncIterator[RequestOutput]:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_error}")
        params = sampling_params or SamplingParams()
        processed = self.engine.input_processor.process(prompt, params)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self.engine.add_processed_request(request_id, processed, output_kind)
            self._wakeup.notify()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine failed: {item}") from item
                if item is _ABORTED or (self.dead_error is None
                                        and self._queues.get(request_id, (None, None))[1] is not queue):
                    return  # aborted: drop outputs queued before the abort
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)
            else:
                with self._lock:
                    self._queues.pop(request_id, None)

    def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._lock:
            for rid in ids:
                target = self._queues.pop(rid, None)
                if target is not None and not target[0].is_closed():
                    target[0].call_soon_threadsafe(target[1].put_nowait, _ABORTED)  # wake and end its stream
            self.engine.abort_request(ids)

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            self._wakeup.notify()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopped and not self.engine.has_unfinished_requests():
                        self._wakeup.wait()
                    if self._stopped:
                        return
                    outputs = self.engine.step()
                    targets = [(self._queues.get(o.request_id), o) for o in outputs]
                for target, out in targets:
                    if target is not None:
                        loop, queue = target
                        loop.call_soon_threadsafe(queue.put_nowait, out)
        except BaseException as e:  # noqa: BLE001 - any engine failure must reach every waiter
            logger.exception("engine loop failed")
            self.dead_error = e
            with self._lock:
                waiters = list(self._queues.values())
                self._queues.clear()
            for loop, queue in waiters:
                loop.call_soon_threadsafe(queue.put_nowait, e)
