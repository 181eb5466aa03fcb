"""Running the engine requests of one HTTP request: prepare, admit, stream, account, abort.

``ServingContext`` is what every route needs for one model (engine, config, tracker, metrics, tokenizer
thread); ``ServedModels`` (``models``) maps request ``model`` names to them.
``prepare`` tokenizes and validates prompts off the event loop (400 before anything starts); ``start``
applies admission control and returns an ``EngineRun`` whose ``outputs()`` yields
``(prompt_index, delta RequestOutput)`` for every prompt of the request, merged in arrival order.

Contract of ``EngineRun``: one engine request per prompt (ids ``<base>-<i>``), outputs are deltas (one per
generated token per sample); ``close()`` (or cancelling the task iterating it, then ``close()``) aborts
every unfinished engine request (the engine frees its blocks; a request still queued is never prefilled);
metrics and the waiting count are settled exactly once per engine request, whether it finished, was
aborted or failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from flotilla.engine.input_processor import ProcessedPrompt
from flotilla.engine.output_processor import OutputKind
from flotilla.entrypoints.openai.admission import RequestTracker, WaitingCount, decide
from flotilla.entrypoints.openai.cli_args import ServerConfig
from flotilla.entrypoints.openai.errors import APIError
from flotilla.entrypoints.openai.metrics import ModelMetrics, RequestMetrics
from flotilla.outputs import RequestOutput
from flotilla.sampling_params import SamplingParams


@dataclass
class ServingContext:
    """One served model inside an app: its engine (an ``EngineClient``), the name clients use, its metrics
    and waiting count, and the app's shared pieces (``config``, ``tracker``, the tokenizer ``executor``,
    ``active_runs``). ``ServedModels`` builds one per model. ``created`` is the unix time reported for it."""

    engine: object  # EngineClient: AsyncLLM, ReplicaSet, a remote proxy or a test double
    config: ServerConfig
    model_name: str
    metrics: ModelMetrics
    tracker: RequestTracker  # the app's: in-flight HTTP requests, draining
    executor: ThreadPoolExecutor  # the app's single tokenizer thread
    active_runs: set  # the app's EngineRuns not yet closed
    created: int = field(default_factory=lambda: int(time.time()))
    waiting: WaitingCount = field(default_factory=WaitingCount)

    @property
    def max_model_len(self) -> int:
        return self.engine.model_config.max_model_len

    async def run_blocking(self, fn, *args):
        """Run ``fn(*args)`` on the tokenizer thread (one thread: the HF tokenizer is not re-entrant)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def prepare(self, prompts: list, params: SamplingParams,
                      cache_salt: str | None = None) -> list[ProcessedPrompt]:
        """Tokenize and validate every prompt (texts or token-id lists, salted with ``cache_salt``);
        InvalidRequestError (-> 400) on the first bad one."""
        process = self.engine.input_processor.process

        def salted(p):
            return {("prompt" if isinstance(p, str) else "prompt_token_ids"): p, "cache_salt": cache_salt}
        return await self.run_blocking(lambda: [process(salted(p) if cache_salt else p, params) for p in prompts])

    def admit(self, num_requests: int) -> None:
        """Raise APIError(503 | 429) unless admitted; on admission count the requests as waiting (an
        ``EngineRun`` settles the count)."""
        waiting = max(self.engine.num_queued_requests, self.waiting.num_waiting)
        decision = decide(draining=self.tracker.draining, engine_dead=self.engine.is_dead, num_waiting=waiting,
                          max_waiting=self.config.max_queued_requests, retry_after_s=self.config.retry_after_s)
        if not decision.admitted:
            headers = {"Retry-After": str(decision.retry_after_s)} if decision.retry_after_s else None
            raise APIError(decision.status, decision.message, headers=headers)
        self.waiting.add_waiting(num_requests)

    def start(self, base_id: str, prepared: list[ProcessedPrompt], params: SamplingParams) -> "EngineRun":
        """Admit (APIError 429/503 otherwise) and set up the engine requests of one HTTP request."""
        self.admit(len(prepared))
        return EngineRun(self, base_id, prepared, params)


class EngineRun:
    """The engine requests of one HTTP request (see the module contract). Create it with ``ctx.start``;
    iterate ``outputs()`` at most once; always ``await close()`` (idempotent), even if never iterated."""

    def __init__(self, ctx: ServingContext, base_id: str, prepared: list[ProcessedPrompt],
                 params: SamplingParams):
        self.ctx, self.base_id, self.prepared = ctx, base_id, prepared
        self.waiting = [True] * len(prepared)
        self.recorders = [RequestMetrics(ctx.metrics, len(p.prompt_token_ids)) for p in prepared]
        self.streams = [ctx.engine.generate({"prompt": p.prompt, "prompt_token_ids": p.prompt_token_ids,
                                             "cache_salt": p.cache_salt}, params, f"{base_id}-{i}", OutputKind.DELTA)
                        for i, p in enumerate(prepared)]
        self._merged = _single(self.streams[0]) if len(self.streams) == 1 else merge_streams(self.streams)
        self._outputs = self._iterate()
        self._closed = False
        ctx.active_runs.add(self)

    def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(prompt_index, delta output)`` in arrival order, until every prompt is finished."""
        return self._outputs

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        async for index, out in self._merged:
            self._on_output(index, out)
            yield index, out

    def _on_output(self, index: int, out: RequestOutput) -> None:
        if self.waiting[index]:
            self.waiting[index] = False
            self.ctx.waiting.done_waiting()
        self.recorders[index].on_output(out)
        if out.finished:
            self.recorders[index].finish(completed=True)

    def abort(self) -> None:
        """Abort the engine requests now; ``outputs()`` then ends without finishing them."""
        self.ctx.engine.abort([f"{self.base_id}-{i}" for i in range(len(self.prepared))])

    async def close(self) -> None:
        """Abort what is unfinished, release the waiting count, record aborted requests."""
        if self._closed:
            return
        self._closed = True
        self.ctx.active_runs.discard(self)
        try:
            await self._outputs.aclose()
            await self._merged.aclose()
            for s in self.streams:
                await s.aclose()
        finally:
            self.ctx.waiting.done_waiting(sum(self.waiting))
            self.waiting = [False] * len(self.waiting)
            for rec in self.recorders:
                rec.finish(completed=False)  # a no-op for the finished ones


async def _single(stream: AsyncIterator) -> AsyncIterator[tuple[int, object]]:
    async for item in stream:
        yield 0, item


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as ``(stream_index, item)`` in arrival order. An exception in any
    stream is re-raised; closing the merged iterator cancels (and so closes) every stream."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
            queue.put_nowait((i, done))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
