"""RemoteEngine: AsyncLLM's surface over a Ray Serve model deployment, for the OpenAI app in the ingress.

The ingress builds the same OpenAI app as embedded mode (``build_app``), giving it one RemoteEngine per
model instead of an AsyncLLM. Tokenizer, input processor and config are built here from the model's
EngineArgs without loading weights (``create_engine_config`` reads only config files), so prompts are
tokenized and validated in the ingress; the replicas receive token ids. Requests and outputs cross as bytes
of ``flotilla.deploy.serve_wire``'s wire types, never as pickled flotilla objects.

Ray is imported lazily (only the handle calls need it), so this module imports without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from flotilla.deploy.serve_wire import GENERATE_REQUEST, GenerateRequest, decode_output
from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.input_processor import InputProcessor, PromptType
from flotilla.engine.llm_engine import load_tokenizer
from flotilla.engine.output_processor import OutputKind
from flotilla.errors import EngineDeadError, InvalidRequestError
from flotilla.outputs import RequestOutput
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.scheduler import SchedulerStats

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 2.0
STATS_TIMEOUT_S = 10.0
NOT_READY_PERIOD_S = 0.5
_ZERO_STATS = SchedulerStats(0, 0, 0.0, 0, 0, 0)


class RemoteEngine:
    """A model deployment seen as one engine: ``generate`` / ``abort`` / stats, as ``AsyncLLM`` offers them.

    Contract:
    - ``generate(prompt, params, request_id, output_kind)`` validates locally (``InvalidRequestError`` before
      anything is sent), then streams the model deployment's ``generate`` through ``handle.options(stream=
      True)``; the replica is chosen by the deployment's request router. Outputs are deltas unless another
      ``output_kind`` is asked for. Their ``metrics`` times are rebased onto this process's
      ``time.monotonic()`` (arrival = when ``generate`` was called here, first token = when it arrived here).
    - A replica that fails (actor died, engine dead) before the request's first output: the request is sent
      once more (the router then avoids the dead replica). A failure after output started, or a second one,
      raises ``EngineDeadError`` to the caller (HTTP 503 / an error event in a stream).
    - ``abort(ids)`` cancels those requests' streams (the replica aborts them in its engine, freeing their KV
      blocks); their ``generate`` ends without error. Leaving the ``async for`` early does the same.
    - ``latest_stats`` sums the replicas' scheduler stats (KV usage: their mean), refreshed every
      ``stats_period_s`` while the event loop runs; zero until the first refresh. ``num_queued_requests``
      counts this ingress's requests that have no output yet. ``num_blocks`` is one replica's KV cache size.
    - ``is_dead`` is False unless the deployment is gone: a stats refresh found it unavailable after an
      earlier one had reached it (a later successful refresh clears it).
    - ``is_ready`` is True when the last stats refresh reached at least one replica whose engine is alive
      (a RUNNING replica has loaded its model); False before the first refresh, while every replica is
      starting, dead or being replaced, and after a failed refresh. It is cached (no call per read); while
      it is False the refresh runs every ``NOT_READY_PERIOD_S``.
    """

    def __init__(self, name: str, handle, engine_args: EngineArgs, *, stats_period_s: float = STATS_PERIOD_S):
        self.name = name
        self.config = engine_args.create_engine_config()
        self.model_config = self.config.model
        self.tokenizer = load_tokenizer(self.config)
        self.input_processor = InputProcessor(self.tokenizer, self.model_config.vocab_size,
                                              self.model_config.max_model_len)
        self.num_blocks = self.config.cache.num_blocks or 0
        self.latest_stats = _ZERO_STATS
        self.replica_stats: list[dict] = []
        self.dead_error: BaseException | None = None
        self.num_retries = 0  # requests re-sent after their replica failed before the first output
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self._streams: dict[str, object] = {}  # request id -> DeploymentResponseGenerator
        self._aborted: set[str] = set()
        self._queued: set[str] = set()
        self._stats_period_s = stats_period_s
        self._stats_task: asyncio.Task | None = None
        self._was_available = False
        self._ready = False

    # ---- AsyncLLM's read-only surface ---------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def is_ready(self) -> bool:
        return self._ready

    @property
    def num_queued_requests(self) -> int:
        return len(self._queued)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    # ---- requests ---------------------------------------------------------------------------------------
    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None, request_id: str,
                       output_kind: OutputKind = OutputKind.CUMULATIVE) -> AsyncIterator[RequestOutput]:
        if self.dead_error is not None:
            raise EngineDeadError(f"model {self.name!r} is unavailable: {self.dead_error}")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        processed = self.input_processor.process(prompt, sampling_params or SamplingParams())
        self.ensure_stats_task()
        request = GenerateRequest(request_id, processed.prompt, processed.prompt_token_ids, processed.params,
                                  output_kind, processed.cache_salt)
        data = GENERATE_REQUEST.encode(request)
        arrival = time.monotonic()
        clock = _Rebase(arrival)
        self._queued.add(request_id)
        started = done = False
        try:
            for attempt in (0, 1):
                stream = self._stream_handle.generate.remote(data)
                self._streams[request_id] = stream
                try:
                    async for item in stream:
                        out = decode_output(item, request)
                        if not started:
                            started = True
                            self._queued.discard(request_id)
                        clock.apply(out)
                        yield out
                    done = True
                    return
                except Exception as e:  # noqa: BLE001 - classified below
                    if request_id in self._aborted:
                        return
                    if isinstance(_cause(e), InvalidRequestError):
                        raise _cause(e) from None
                    if not started and attempt == 0 and _is_replica_failure(e):
                        self.num_retries += 1
                        logger.warning("model %s: request %s failed on its replica before any output (%s); "
                                       "sending it once more", self.name, request_id, _describe(e))
                        continue
                    raise EngineDeadError(f"model {self.name!r}: the replica serving request {request_id} "
                                          f"failed: {_describe(e)}") from e
        finally:
            stream = self._streams.pop(request_id, None)
            self._queued.discard(request_id)
            self._aborted.discard(request_id)
            if stream is not None and not done:  # left early, aborted or failed: the replica aborts it
                _cancel(stream)

    def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            stream = self._streams.get(rid)
            if stream is not None:
                self._aborted.add(rid)
                self._queued.discard(rid)
                _cancel(stream)

    # ---- stats ------------------------------------------------------------------------------------------
    def ensure_stats_task(self) -> None:
        """Start the periodic stats refresh on the running event loop (once; no-op without a loop)."""
        if self._stats_task is not None and not self._stats_task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._stats_task = loop.create_task(self._stats_loop())

    async def _stats_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.refresh_stats()
            # Not ready: look again soon, so /health turns 200 shortly after a replica is up.
            await asyncio.sleep(self._stats_period_s if self._ready else min(self._stats_period_s, NOT_READY_PERIOD_S))

    async def refresh_stats(self) -> list[dict]:
        """Ask every replica for ``stats()`` now; update ``latest_stats`` and ``num_blocks``; return them."""
        try:
            results = await self._handle.broadcast("stats").results_async(timeout_s=STATS_TIMEOUT_S,
                                                                         return_exceptions=True)
        except Exception as e:  # noqa: BLE001
            self._ready = False
            if _is_unavailable(e) and self._was_available:  # it was there and now it is gone
                self.dead_error = e
            raise
        self._was_available, self.dead_error = True, None
        stats = [r for r in results if isinstance(r, dict)]
        self._ready = any(s.get("healthy", True) for s in stats)
        self.replica_stats = stats
        self.latest_stats = sum_stats(stats)
        if stats and stats[0].get("num_blocks"):
            self.num_blocks = stats[0]["num_blocks"]
        return stats

    def shutdown(self) -> None:
        """Stop the stats refresh and cancel every open stream."""
        if self._stats_task is not None:
            self._stats_task.cancel()
        self.abort(list(self._streams))


def sum_stats(stats: list[dict]) -> SchedulerStats:
    """The replicas' scheduler stats as one snapshot: counts summed, KV usage averaged."""
    if not stats:
        return _ZERO_STATS

    def total(key: str):
        return sum(s.get(key, 0) for s in stats)

    return SchedulerStats(num_running=total("num_running"), num_waiting=total("num_waiting"),
                          kv_cache_usage=total("kv_cache_usage") / len(stats),
                          prefix_cache_queries=total("prefix_cache_queries"),
                          prefix_cache_hits=total("prefix_cache_hits"), num_preemptions=total("num_preemptions"))


class _Rebase:
    """Moves a replica's ``time.monotonic()`` stamps in output metrics onto this process's clock."""

    def __init__(self, local_arrival: float):
        self.local_arrival = local_arrival
        self.offset: float | None = None
        self.first = True

    def apply(self, out: RequestOutput) -> None:
        m = out.metrics
        if m:
            if self.offset is None and m.get("arrival_time") is not None:
                self.offset = self.local_arrival - m["arrival_time"]
            if self.offset is not None:
                out.metrics = {k: (v + self.offset if k.endswith("_time") and isinstance(v, (int, float)) else v)
                               for k, v in m.items()}
            if self.first and "first_token_time" in out.metrics:
                out.metrics["first_token_time"] = time.monotonic()
        self.first = False


def _cancel(stream) -> None:
    with contextlib.suppress(Exception):
        stream.cancel()


def _cause(e: BaseException) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _is_replica_failure(e: BaseException) -> bool:
    """The replica (or its engine) died: another replica may well serve the request."""
    from ray.exceptions import RayActorError
    c = _cause(e)
    return isinstance(e, (RayActorError, EngineDeadError)) or isinstance(c, (RayActorError, EngineDeadError))


def _is_unavailable(e: BaseException) -> bool:
    from ray.serve.exceptions import DeploymentUnavailableError
    return isinstance(e, DeploymentUnavailableError) or isinstance(_cause(e), DeploymentUnavailableError)


def _describe(e: BaseException) -> str:
    c = _cause(e)
    lines = str(c).strip().splitlines()
    return f"{type(c).__name__}: {lines[-1] if lines else ''}"
