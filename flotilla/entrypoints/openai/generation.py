"""Running the engine requests of one HTTP request: prepare, admit, stream, account, abort.

``ServingContext`` is what every route needs for one model (engine, config, tracker, metrics, tokenizer
lanes); ``ServedModels`` (``models``) maps request ``model`` names to them.
``prepare`` tokenizes and validates prompts on a tokenizer lane, after rejecting those that provably cannot
fit the context without tokenizing any (400 before anything starts); ``start`` applies admission control
and returns an ``EngineRun`` whose ``outputs()`` yields ``(prompt_index, delta RequestOutput)`` for every
prompt of the request, merged in arrival order.

Tokenizer lanes: two single threads, each with its own tokenizer (a fast tokenizer must not be used from
two threads at once). Requests with at most ``LARGE_REQUEST_CHARS`` characters of text (or token ids) use
the small lane and the engine's own input processor; larger ones use the large lane and a clone made there
on first use, so a big request never queues small ones behind it. After each large-lane job the memory it
freed is handed back to the operating system.

Contract of ``EngineRun``: one engine request per prompt (ids ``<base>-<i>``); a streaming run's outputs are
deltas (one per generated token per sample); a non-streaming run on an engine that can run a request again
elsewhere until its first output (``engine.reruns_unstarted_requests``: ``RemoteEngine``) asks for
``OutputKind.FINAL_ONLY`` (one output per prompt, when it is finished: all samples, full text, tokens and
logprobs), so losing a replica mid-generation costs it only time (its inter-token latency is then not
observed). A non-streaming run whose ASGI scope sets ``FINAL_ONLY_SCOPE_KEY`` (``"flotilla.final_only"``:
the in-process batch callers, which want only the answer) asks for ``FINAL_ONLY`` on any engine too: one
output per prompt instead of one per token spares the serving process the per-token delivery, wake-up and
accounting that, on a small machine, compete with the engine for CPU (their inter-token latency is not
observed; the answer is the same). ``close()`` (or cancelling the task iterating it, then ``close()``) aborts
every unfinished engine request (the engine frees its blocks; a request still queued is never prefilled);
metrics and the waiting count are settled exactly once per engine request, whether it finished, was
aborted or failed.

Request priority (``request_priority``, vLLM's ``priority`` extra field): the body's ``priority`` (an
integer, lower is served earlier, default 0) reaches the engine only when it runs ``--scheduling-policy
priority``; under "fcfs" a nonzero value is a 400 naming ``priority`` (as vLLM: priority scheduling is not
enabled). In-process callers that call the ASGI app directly (the batch runner, the Batches API) set the ASGI
scope key ``PRIORITY_SCOPE_KEY`` (``"flotilla.priority"``, an int; usually ``flotilla.request.BATCH_PRIORITY``)
to run their requests at that priority under either policy: the engine priority is the scope's value plus the
body's. HTTP clients cannot set ASGI scope keys (the server builds the scope), so only code in the serving
process can lower (or raise) a request's priority this way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from flotilla.engine.input_processor import ProcessedPrompt
from flotilla.engine.output_processor import OutputKind
from flotilla.entrypoints.openai.admission import RequestTracker, WaitingCount, decide
from flotilla.entrypoints.openai.cli_args import ServerConfig
from flotilla.entrypoints.openai.errors import APIError
from flotilla.entrypoints.openai.metrics import ModelMetrics, RequestMetrics
from flotilla.errors import InvalidRequestError
from flotilla.outputs import RequestOutput
from flotilla.procutil import release_free_memory
from flotilla.request import PRIORITY_MAX, PRIORITY_MIN, check_priority
from flotilla.sampling_params import SamplingParams

LARGE_REQUEST_CHARS = 32_768
PRIORITY_SCOPE_KEY = "flotilla.priority"  # ASGI scope key: in-process callers' base priority (module docstring)
FINAL_ONLY_SCOPE_KEY = "flotilla.final_only"  # ASGI scope key: non-streaming runs want one final output per prompt


def wants_final_only(scope: Mapping) -> bool:
    """Whether an in-process caller asked (``FINAL_ONLY_SCOPE_KEY``) for final outputs only (module docstring)."""
    return bool(scope.get(FINAL_ONLY_SCOPE_KEY))


def request_priority(requested: int | None, scope: Mapping, policy: str | None) -> int:
    """The engine priority of one HTTP request: the scope's ``PRIORITY_SCOPE_KEY`` (0 when absent or None) plus the
    body's ``priority`` (None: 0). ``policy``: the engine's scheduling policy (read only when the body asks for
    a nonzero priority). InvalidRequestError (400) for a nonzero body priority unless ``policy`` is "priority",
    or a sum outside 64 bits; TypeError / ValueError for a scope value that is not a 64-bit int (a bug of the
    in-process caller, not of the client)."""
    base = scope.get(PRIORITY_SCOPE_KEY) or 0
    if isinstance(base, bool) or not isinstance(base, int):
        raise TypeError(f"ASGI scope key {PRIORITY_SCOPE_KEY!r} must be an int, got {type(base).__name__}")
    if not PRIORITY_MIN <= base <= PRIORITY_MAX:
        raise ValueError(f"ASGI scope key {PRIORITY_SCOPE_KEY!r} must fit in 64 bits, got {base}")
    if not requested:
        return base
    if policy != "priority":
        raise InvalidRequestError(f"priority scheduling is not enabled: priority {requested} needs a server started "
                                  f"with --scheduling-policy priority (leave priority out, or 0)", "priority")
    return check_priority(base + requested)


@dataclass
class ServingContext:
    """One served model inside an app: its engine (an ``EngineClient``), the name clients use, its metrics
    and waiting count, and the app's shared pieces (``config``, ``tracker``, the tokenizer ``lanes``,
    ``active_runs``). ``ServedModels`` builds one per model. ``created`` is the unix time reported for it."""

    engine: object  # EngineClient: AsyncLLM, ReplicaSet, a remote proxy or a test double
    config: ServerConfig
    model_name: str
    metrics: ModelMetrics
    tracker: RequestTracker  # the app's: in-flight HTTP requests, draining
    lanes: "TokenizerLanes"  # the app's two tokenizer threads
    active_runs: set  # the app's EngineRuns not yet closed
    created: int = field(default_factory=lambda: int(time.time()))
    waiting: WaitingCount = field(default_factory=WaitingCount)
    large_processor: object = field(default=None, init=False, repr=False)  # made on the large lane

    @property
    def max_model_len(self) -> int:
        return self.engine.model_config.max_model_len

    @property
    def runner(self) -> str:
        """"generate", or "pooling" for an embedding model (``AsyncEmbedder``)."""
        return getattr(self.engine.model_config, "runner", "generate")

    async def on_lane(self, size: int, fn):
        """``fn(input_processor)`` on the tokenizer lane for a request of ``size`` characters or token ids
        (see the module docstring); use only the tokenizer of the processor it is given."""
        loop = asyncio.get_running_loop()
        if size <= LARGE_REQUEST_CHARS:
            return await loop.run_in_executor(self.lanes.small, fn, self.engine.input_processor)
        return await loop.run_in_executor(self.lanes.large, self._run_large, fn)

    def _run_large(self, fn):
        if self.large_processor is None:
            self.large_processor = self.engine.input_processor.clone()
        try:
            return fn(self.large_processor)
        finally:
            release_free_memory()

    async def prepare(self, prompts: list, params: SamplingParams,
                      cache_salt: str | None = None) -> list[ProcessedPrompt]:
        """Tokenize and validate every prompt (texts or token-id lists, salted with ``cache_salt``);
        InvalidRequestError (-> 400) on the first bad one (prompts that provably cannot fit are rejected
        first, without tokenizing any)."""
        def salted(p):
            if not cache_salt:
                return p
            return {("prompt" if isinstance(p, str) else "prompt_token_ids"): p, "cache_salt": cache_salt}

        def run(processor) -> list[ProcessedPrompt]:
            for p in prompts:
                processor.precheck(salted(p), params)
            return [processor.process(salted(p), params) for p in prompts]
        return await self.on_lane(sum(len(p) for p in prompts), run)

    def admit(self, num_requests: int) -> None:
        """Raise APIError(503 | 429) unless admitted; on admission count the requests as waiting (an
        ``EngineRun`` settles the count)."""
        waiting = max(self.engine.num_queued_requests, self.waiting.num_waiting)
        dead = self.engine.is_dead
        decision = decide(draining=self.tracker.draining, engine_dead=dead, num_waiting=waiting,
                          max_waiting=self.config.max_queued_requests, retry_after_s=self.config.retry_after_s,
                          dead_reason=str(self.engine.dead_error) if dead else None)
        if not decision.admitted:
            headers = {"Retry-After": str(decision.retry_after_s)} if decision.retry_after_s else None
            raise APIError(decision.status, decision.message, headers=headers)
        self.waiting.add_waiting(num_requests)

    def priority(self, requested: int | None, scope: Mapping) -> int:
        """``request_priority`` under this model's engine's scheduling policy."""
        return request_priority(requested, scope, self.engine.config.scheduler.policy if requested else None)

    def start(self, base_id: str, prepared: list[ProcessedPrompt], params: SamplingParams,
              stream: bool = True, priority: int = 0, final_only: bool = False) -> "EngineRun":
        """Admit (APIError 429/503 otherwise) and set up the engine requests of one HTTP request (``stream``:
        the client streams; ``final_only``: a non-streaming caller wants one output per prompt; see the module
        contract for the output kind) at engine priority ``priority``."""
        self.admit(len(prepared))
        final_only = not stream and (final_only or getattr(self.engine, "reruns_unstarted_requests", False))
        return EngineRun(self, base_id, prepared, params, OutputKind.FINAL_ONLY if final_only else OutputKind.DELTA,
                         priority)


class EngineRun:
    """The engine requests of one HTTP request (see the module contract). Create it with ``ctx.start``;
    iterate ``outputs()`` at most once; always ``await close()`` (idempotent), even if never iterated."""

    def __init__(self, ctx: ServingContext, base_id: str, prepared: list[ProcessedPrompt],
                 params: SamplingParams, output_kind: OutputKind = OutputKind.DELTA, priority: int = 0):
        self.ctx, self.base_id, self.prepared, self.output_kind = ctx, base_id, prepared, output_kind
        self.waiting = [True] * len(prepared)
        self.recorders = [RequestMetrics(ctx.metrics, len(p.prompt_token_ids), params.n,
                                         params.max_tokens or ctx.max_model_len - len(p.prompt_token_ids))
                          for p in prepared]
        self.streams = [ctx.engine.generate({"prompt": p.prompt, "prompt_token_ids": p.prompt_token_ids,
                                             "cache_salt": p.cache_salt}, params, f"{base_id}-{i}", output_kind,
                                            priority=priority)
                        for i, p in enumerate(prepared)]
        self._merged = _single(self.streams[0]) if len(self.streams) == 1 else merge_streams(self.streams)
        self._outputs = self._iterate()
        self._closed = False
        ctx.active_runs.add(self)

    def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(prompt_index, output)`` in arrival order, until every prompt is finished: deltas, or one final
        output per prompt (``FINAL_ONLY``)."""
        return self._outputs

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if self.output_kind == OutputKind.FINAL_ONLY:  # no output until the end: from here on the engine's
            self._release_waiting()                       # own queue count covers these requests
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
            self._release_waiting()
            for rec in self.recorders:
                rec.finish(completed=False)  # a no-op for the finished ones


    def _release_waiting(self) -> None:
        self.ctx.waiting.done_waiting(sum(self.waiting))
        self.waiting = [False] * len(self.waiting)


class TokenizerLanes:
    """The app's two tokenizer threads: ``small`` and ``large`` (see the module docstring)."""

    def __init__(self):
        self.small = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flotilla-tokenize")
        self.large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flotilla-tokenize-large")

    def shutdown(self) -> None:
        for executor in (self.small, self.large):
            executor.shutdown(wait=False, cancel_futures=True)


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
