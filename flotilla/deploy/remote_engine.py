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
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from flotilla.deploy.aio_util import PeriodicStats
from flotilla.deploy.replica_failures import FAILED_REPLICAS, FailedReplicas
from flotilla.deploy.serve_wire import (ENGINE_DEAD, GENERATE_REQUEST, Accepted, GenerateFailure,
                                        GenerateRequest, decode_frame)
from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.input_processor import InputProcessor, PromptType
from flotilla.engine.llm_engine import load_tokenizer
from flotilla.engine.output_processor import OutputKind
from flotilla.errors import EngineDeadError, InvalidRequestError
from flotilla.outputs import RequestOutput
from flotilla.request import check_priority
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.scheduler import SchedulerStats, add_step_counts

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 2.0
STATS_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 3  # replicas a request that has produced no output is sent to, each failed one excluded
RETRY_ROUTING_TIMEOUT_S = 60.0  # how long a re-sent request may wait for a replica other than the failed ones
ATTEMPT_LOG_SIZE = 4096
# A deployment without any replica for this long counts as gone (its engine "dead": new requests get 503).
# Shorter gaps (a replica being replaced) are not: requests wait in Serve's queue for the replacement.
GONE_AFTER_S = 60.0
_ZERO_STATS = SchedulerStats(0, 0, 0.0, 0, 0, 0)


class RemoteEngine(PeriodicStats):
    """A model deployment seen as one engine: ``generate`` / ``abort`` / stats, as ``AsyncLLM`` offers them.

    Contract:
    - ``generate(prompt, params, request_id, output_kind)`` validates locally (``InvalidRequestError`` before
      anything is sent), then streams the model deployment's ``generate`` through ``handle.options(stream=
      True)``; the replica is chosen by the deployment's request router. Outputs are deltas unless another
      ``output_kind`` is asked for. Their ``metrics`` times are rebased onto this process's
      ``time.monotonic()`` (arrival = when ``generate`` was called here, first token = when it arrived here).
    - A replica that fails (its actor died, or its engine did: a ``GenerateFailure`` frame) before the
      request's first output here: the request is sent again, up to ``MAX_ATTEMPTS`` replicas in all, with
      every replica it failed on in ``exclude_replicas`` (the router never sends it back there; a re-sent
      request waits up to ``retry_routing_timeout_s`` for another replica, e.g. the failed one's
      replacement). The failed replica is also marked in ``FAILED_REPLICAS`` so this process's router keeps
      other requests away from it. With ``OutputKind.FINAL_ONLY`` nothing arrives before the end, so a
      replica dying mid-generation costs only time. A failure after output started here, the last attempt's
      failure, or any other error raises ``EngineDeadError`` with a plain message (no Ray internals; HTTP
      503 / an error event in a stream).
    - ``reruns_unstarted_requests`` is True: the OpenAI layer asks for ``FINAL_ONLY`` outputs when the client
      does not stream, so such a request is re-run on another replica if its replica dies.
    - ``attempts`` logs the latest attempts: ``(request_id, replica_id or None, outcome)``, outcome one of
      ``ok``, ``failed`` (the replica failed), ``aborted``, ``error``.
    - ``abort(ids)`` cancels those requests' streams (the replica aborts them in its engine, freeing their KV
      blocks); their ``generate`` ends without error. Leaving the ``async for`` early does the same.
    - ``latest_stats`` sums the replicas' scheduler stats (KV usage: their mean), refreshed every
      ``stats_period_s`` while the event loop runs; zero until the first refresh. ``num_queued_requests``
      counts this ingress's requests that have no output yet (``FINAL_ONLY`` ones: not yet accepted by a
      replica). ``num_blocks`` is one replica's KV cache size.
    - ``is_dead`` is False unless the deployment is gone: stats refreshes have found it without any replica
      for ``gone_after_s`` (``GONE_AFTER_S``) after an earlier one had reached it (a later successful refresh
      clears it). While a replica is being replaced the model is not ready (``is_ready``) but not dead:
      requests wait in Serve's queue for the replacement.
    - ``is_ready`` is True when the last stats refresh reached at least one replica whose engine is alive
      (a RUNNING replica has loaded its model); False before the first refresh, while every replica is
      starting, dead or being replaced, and after a failed refresh. It is cached (no call per read); while
      it is False the refresh runs every ``NOT_READY_PERIOD_S``.
    """

    reruns_unstarted_requests = True

    def __init__(self, name: str, handle, engine_args: EngineArgs, *, stats_period_s: float = STATS_PERIOD_S,
                 failed_replicas: FailedReplicas = FAILED_REPLICAS,
                 retry_routing_timeout_s: float = RETRY_ROUTING_TIMEOUT_S, gone_after_s: float = GONE_AFTER_S):
        self.name = name
        self.config = engine_args.create_engine_config()
        self.model_config = self.config.model
        self.tokenizer = load_tokenizer(self.config)
        self.input_processor = InputProcessor(self.tokenizer, self.model_config.vocab_size,
                                              self.model_config.max_model_len, self.config.structured_outputs.backend)
        self.num_blocks = self.config.cache.num_blocks or 0
        self.latest_stats = _ZERO_STATS
        self.replica_stats: list[dict] = []
        self.dead_error: BaseException | None = None
        self.num_retries = 0  # requests re-sent after their replica failed before the first output
        self.attempts: deque[tuple[str, str | None, str]] = deque(maxlen=ATTEMPT_LOG_SIZE)
        self.failed_replicas = failed_replicas
        self.retry_routing_timeout_s = retry_routing_timeout_s
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self._streams: dict[str, object] = {}  # request id -> DeploymentResponseGenerator
        self._aborted: set[str] = set()
        self._queued: set[str] = set()
        self._stats_period_s = stats_period_s
        self._stats_task: asyncio.Task | None = None
        self._was_available = False
        self._ready = False
        self._unavailable_since: float | None = None
        self.gone_after_s = gone_after_s

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
                       output_kind: OutputKind = OutputKind.CUMULATIVE,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        if self.dead_error is not None:
            raise EngineDeadError(str(self.dead_error))
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        check_priority(priority)
        processed = self.input_processor.process(prompt, sampling_params or SamplingParams())
        self.ensure_stats_task()
        request = GenerateRequest(request_id, processed.prompt, processed.prompt_token_ids, processed.params,
                                  output_kind, processed.cache_salt, priority=priority)
        clock = _Rebase(time.monotonic(), keep_first_token_time=output_kind == OutputKind.FINAL_ONLY)
        self._queued.add(request_id)
        state = _Attempt(request_id)
        try:
            for attempt in range(MAX_ATTEMPTS):
                state.replica_id = None
                request.exclude_replicas = list(state.excluded)
                stream = self._stream_handle.generate.remote(GENERATE_REQUEST.encode(request))
                self._streams[request_id] = stream
                try:
                    timeout = self.retry_routing_timeout_s if attempt else None
                    async for item in _frames(stream, timeout):
                        out = self._on_frame(decode_frame(item, request), state, output_kind)
                        if out is not None:
                            clock.apply(out)
                            yield out
                    state.done = True
                    self.attempts.append((request_id, state.replica_id, "ok"))
                    return
                except Exception as e:  # noqa: BLE001 - classified below
                    if request_id in self._aborted:
                        self.attempts.append((request_id, state.replica_id, "aborted"))
                        return
                    if isinstance(_cause(e), InvalidRequestError):
                        self.attempts.append((request_id, state.replica_id, "error"))
                        raise _cause(e) from None
                    error = self._on_failure(e, state, attempt)
                    if error is not None:
                        raise error from None
        finally:
            stream = self._streams.pop(request_id, None)
            self._queued.discard(request_id)
            self._aborted.discard(request_id)
            if stream is not None and not state.done:  # left early, aborted or failed: the replica aborts it
                _cancel(stream)

    def _on_frame(self, frame, state: "_Attempt", output_kind: OutputKind) -> RequestOutput | None:
        """Bookkeeping of one frame; returns the output to hand on (None for the other frames)."""
        if isinstance(frame, Accepted):
            state.replica_id = frame.replica_id
            if output_kind == OutputKind.FINAL_ONLY:
                self._queued.discard(state.request_id)
            return None
        if isinstance(frame, GenerateFailure):
            raise _ReplicaFailed(frame)
        if not state.started:
            state.started = True
            self._queued.discard(state.request_id)
        return frame

    def _on_failure(self, e: BaseException, state: "_Attempt", attempt: int) -> EngineDeadError | None:
        """After attempt ``attempt`` failed with ``e``: None to send the request again, else the error for the
        caller (plain words; the detail goes to the log)."""
        rid, name = state.request_id, self.name
        if isinstance(e, _ReplicaFailed):
            state.replica_id = e.frame.replica_id
        replica_failed = isinstance(e, _ReplicaFailed) or _is_replica_failure(e)
        self.attempts.append((rid, state.replica_id, "failed" if replica_failed else "error"))
        if isinstance(e, TimeoutError) and attempt:
            return EngineDeadError(f"model {name!r}: no other replica took request {rid} within "
                                   f"{self.retry_routing_timeout_s:.0f} s after its replica failed")
        if not replica_failed:
            logger.error("model %s: request %s failed: %s", name, rid, _describe(e))
            return EngineDeadError(f"model {name!r}: request {rid} failed on its replica")
        what = "its engine died" if isinstance(e, _ReplicaFailed) and e.frame.kind == ENGINE_DEAD else "it died"
        if state.replica_id is not None:
            state.excluded.append(state.replica_id)
            self.failed_replicas.mark(state.replica_id)
        if state.started:
            return EngineDeadError(f"model {name!r}: the replica serving request {rid} failed ({what}) after "
                                   f"it had started streaming; the request was not completed")
        if attempt + 1 >= MAX_ATTEMPTS:
            return EngineDeadError(f"model {name!r}: request {rid} failed on {MAX_ATTEMPTS} replicas in turn "
                                   f"(the last one: {what}); the request was not completed")
        self.num_retries += 1
        logger.warning("model %s: request %s failed on replica %s before any output (%s: %s); sending it to "
                       "another replica", name, rid, state.replica_id, what, _describe(e))
        return None

    def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            stream = self._streams.get(rid)
            if stream is not None:
                self._aborted.add(rid)
                self._queued.discard(rid)
                _cancel(stream)

    # ---- stats ------------------------------------------------------------------------------------------
    async def refresh_stats(self) -> list[dict]:
        """Ask every replica for ``stats()`` now; update ``latest_stats`` and ``num_blocks``; return them."""
        try:
            results = await self._handle.broadcast("stats").results_async(timeout_s=STATS_TIMEOUT_S,
                                                                         return_exceptions=True)
        except Exception as e:  # noqa: BLE001
            self._ready = False
            if _is_unavailable(e) and self._was_available:  # it was there and now has no replica
                now = time.monotonic()
                if self._unavailable_since is None:
                    self._unavailable_since = now
                gone_for = now - self._unavailable_since
                if gone_for >= self.gone_after_s:
                    self.dead_error = EngineDeadError(f"model {self.name!r} has had no replica for "
                                                      f"{gone_for:.0f} s")
            raise
        self._was_available, self.dead_error, self._unavailable_since = True, None, None
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
                          prefix_cache_hits=total("prefix_cache_hits"), num_preemptions=total("num_preemptions"),
                          iteration_tokens=functools.reduce(add_step_counts, (tuple(s.get("iteration_tokens", ()))
                                                                              for s in stats), ()),
                          iteration_tokens_sum=total("iteration_tokens_sum"),
                          spec_num_drafts=total("spec_num_drafts"), spec_num_draft_tokens=total("spec_num_draft_tokens"),
                          spec_num_accepted_tokens=total("spec_num_accepted_tokens"),
                          spec_accepted_per_pos=_sum_padded(tuple(s.get("spec_accepted_per_pos", ())) for s in stats))


def _sum_padded(rows) -> tuple[int, ...]:
    """Per-position counts of several replicas summed; a shorter row (another k, or none) counts 0 beyond its end."""
    out: list[int] = []
    for row in rows:
        out.extend([0] * (len(row) - len(out)))
        for i, v in enumerate(row):
            out[i] += v
    return tuple(out)


@dataclass
class _Attempt:
    """One request's retry state: the replica of the current attempt, those it failed on, whether output
    reached the caller, whether it finished."""

    request_id: str
    replica_id: str | None = None
    excluded: list[str] = field(default_factory=list)
    started: bool = False
    done: bool = False


class _ReplicaFailed(Exception):
    """A replica's ``GenerateFailure`` frame."""

    def __init__(self, frame: GenerateFailure):
        super().__init__(frame.message)
        self.frame = frame


async def _frames(stream, first_timeout_s: float | None) -> AsyncIterator:
    """The items of ``stream``; the first must arrive within ``first_timeout_s`` (None: no limit), else
    ``TimeoutError``."""
    it = stream.__aiter__()
    if first_timeout_s is not None:
        try:
            first = await asyncio.wait_for(it.__anext__(), first_timeout_s)
        except StopAsyncIteration:
            return
        yield first
    async for item in it:
        yield item


class _Rebase:
    """Moves a replica's ``time.monotonic()`` stamps in output metrics onto this process's clock. The first
    output's ``first_token_time`` becomes the time it arrived here, unless ``keep_first_token_time`` (a
    final-only output arrives long after its first token: the replica's stamp, rebased, is kept)."""

    def __init__(self, local_arrival: float, keep_first_token_time: bool = False):
        self.local_arrival = local_arrival
        self.offset: float | None = None
        self.first = not keep_first_token_time

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
    """For the log only (Ray's text may carry internals clients must not see)."""
    c = _cause(e)
    lines = str(c).strip().splitlines()
    return f"{type(c).__name__}: {lines[-1] if lines else ''}"
