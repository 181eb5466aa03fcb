"""RemoteEmbedder: ``AsyncEmbedder``'s surface over an embedding model's Ray Serve deployment, for the ingress.

The ingress builds the same OpenAI app as embedded mode, giving it a RemoteEmbedder for each embedding model
(and a ``RemoteEngine`` for each generative one). Tokenizer, input processor and config are built here from
the model's EngineArgs without loading weights, so inputs are tokenized and validated in the ingress; the
replicas (``EmbeddingServer``, ``flotilla.deploy.ray_replicas``) receive token ids and batch them with the
repository's dynamic batcher. Messages are ``flotilla.deploy.tensor_wire``'s, never pickle.

Contract (``AsyncEmbedder``'s, as the OpenAI and KServe layers use it):
- ``check_params(params)`` validates ``PoolingParams`` exactly as the replica's ``Embedder`` does;
  ``input_processor`` tokenizes as the replica's model does (sentence-transformers' truncation).
- ``await embed(token_ids, params)`` returns the float32 embedding row of one input. The ``embed`` calls
  started in one event-loop iteration with the same parameters (the inputs of one request: the OpenAI layer
  starts them together) go to one replica in one message, where each input joins that replica's batcher.
  A replica's rejection raises ``InvalidRequestError`` (400), a stopped model ``EngineDeadError`` (503), a
  failed forward pass ``RuntimeError`` with its message; a replica that dies before answering is an
  ``EngineDeadError`` ("retry it"). When every caller of a message is cancelled, the replica's work is
  cancelled (its queued inputs leave the batcher).
- Stats, as ``RemoteEngine``: ``latest_stats`` sums the replicas' batcher counts, refreshed every
  ``stats_period_s`` once ``ensure_stats_task()`` ran on the loop; ``num_queued_requests`` is the replicas'
  waiting inputs at the last refresh; ``is_ready`` once a refresh reached a live replica; ``is_dead`` once the
  deployment has had no replica for ``gone_after_s`` after it had one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np

from flotilla.deploy.aio_util import PeriodicStats, gather_or_cancel
from flotilla.deploy.remote_engine import GONE_AFTER_S, STATS_PERIOD_S, STATS_TIMEOUT_S
from flotilla.deploy.tensor_wire import EMBED_MESSAGE, EMBED_RESULT, EmbedFailure, EmbedMessage
from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.embedding import EmbeddingInputProcessor, Embedder, lower_case_tokenizer
from flotilla.errors import EngineDeadError, InvalidRequestError
from flotilla.pooling_params import PoolingParams
from flotilla.scheduler.scheduler import SchedulerStats, add_step_counts
from flotilla.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class _Message:
    """The inputs of one event-loop iteration with one set of parameters, sent as one ``EmbedMessage``."""

    def __init__(self, params: PoolingParams, loop: asyncio.AbstractEventLoop):
        self.params = params
        self.token_ids: list[list[int]] = []
        self.waiting = 0                   # callers still awaiting the rows
        self.task: asyncio.Task | None = None
        self.rows: asyncio.Future = loop.create_future()
        self.rows.add_done_callback(_retrieve)


class RemoteEmbedder(PeriodicStats):
    """An embedding model's deployment seen as one ``AsyncEmbedder`` (see the module contract)."""

    runner = "pooling"

    def __init__(self, name: str, handle, engine_args: EngineArgs, *, stats_period_s: float = STATS_PERIOD_S,
                 gone_after_s: float = GONE_AFTER_S):
        self.name = name
        self.config = engine_args.create_engine_config()
        self.model_config = mc = self.config.model
        if mc.runner != "pooling":
            raise ValueError(f"model {name!r} is not an embedding model (runner {mc.runner!r})")
        self.tokenizer = Tokenizer.from_pretrained(mc.source)
        if mc.pooler.do_lower_case:
            lower_case_tokenizer(self.tokenizer)
        self.input_processor = EmbeddingInputProcessor(self.tokenizer, mc.vocab_size, mc.max_model_len,
                                                       mc.pooler.default_prompt)
        self.output_dim = len(mc.pooler.pooling_modes) * mc.hf_config.hidden_size  # as Embedder computes it
        self.num_blocks = 0
        self.latest_stats = SchedulerStats(0, 0, 0.0, 0, 0, 0)
        self.replica_stats: list[dict] = []
        self.dead_error: BaseException | None = None
        self.gone_after_s = gone_after_s
        self._handle = handle
        self._pending: dict[tuple, _Message] = {}   # not sent yet, by (dimensions, normalize)
        self._sent: set[asyncio.Task] = set()
        self._in_flight = 0
        self._stats_period_s = stats_period_s
        self._stats_task: asyncio.Task | None = None
        self._ready = self._was_available = False
        self._unavailable_since: float | None = None

    # ---- AsyncEmbedder's read-only surface -------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def is_ready(self) -> bool:
        return self._ready

    @property
    def num_queued_requests(self) -> int:
        return self.latest_stats.num_waiting

    @property
    def num_unfinished_requests(self) -> int:
        return self._in_flight

    def check_params(self, params: PoolingParams | None) -> PoolingParams:
        # Embedder.check_params reads only model_config and output_dim, which this object has as the replica does.
        return Embedder.check_params(self, params)  # type: ignore[arg-type]

    # ---- requests ----------------------------------------------------------------------------------------
    async def embed_many(self, token_ids: list[list[int]], params: PoolingParams) -> list:
        """One request's inputs, in order (``AsyncEmbedder.embed_many``): their ``embed`` calls start in the same
        event-loop iteration, so they travel in one message to the replica. If one fails (or this is cancelled)
        the others are cancelled."""
        return await gather_or_cancel(self.embed(ids, params) for ids in token_ids)

    async def embed(self, token_ids: list[int], params: PoolingParams) -> np.ndarray:
        if self.dead_error is not None:
            raise EngineDeadError(str(self.dead_error))
        self.ensure_stats_task()
        key = (params.dimensions, params.normalize)
        message = self._pending.get(key)
        if message is None:
            loop = asyncio.get_running_loop()
            message = self._pending[key] = _Message(params, loop)
            loop.call_soon(self._send, key)   # after the calls already scheduled in this iteration join
        index = len(message.token_ids)
        message.token_ids.append(list(token_ids))
        message.waiting += 1
        self._in_flight += 1
        try:
            rows = await asyncio.shield(message.rows)
        except asyncio.CancelledError:
            message.waiting -= 1
            if message.waiting == 0 and message.task is not None:
                message.task.cancel()       # nobody waits for it any more: the replica drops its inputs
            raise
        finally:
            self._in_flight -= 1
        return rows[index]

    def _send(self, key: tuple) -> None:
        message = self._pending.pop(key)
        if message.waiting == 0:           # every caller left before it was sent
            message.rows.cancel()
            return
        message.task = asyncio.get_running_loop().create_task(self._call(message))
        message.task.add_done_callback(lambda task: _settle(message.rows, task))
        self._sent.add(message.task)
        message.task.add_done_callback(self._sent.discard)

    async def _call(self, message: _Message) -> np.ndarray:
        request = EmbedMessage(message.token_ids, message.params.dimensions, message.params.normalize)
        response = self._handle.embed.remote(EMBED_MESSAGE.encode(request))
        try:
            data = await response
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                response.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - Ray's errors never reach the client
            logger.error("embedding model %s: request failed: %s: %s", self.name, type(e).__name__,
                         str(e).strip()[-500:])
            raise EngineDeadError(f"model {self.name!r}: the replica embedding the request stopped before it "
                                  f"answered; retry it") from None
        result = EMBED_RESULT.decode(data)
        if isinstance(result, EmbedFailure):
            if result.kind == "invalid":
                raise InvalidRequestError(result.message, result.param or "input")
            if result.kind == "dead":
                raise EngineDeadError(result.message)
            raise RuntimeError(result.message)
        rows = np.frombuffer(result.data, dtype="<f4").astype(np.float32)
        return rows.reshape(len(message.token_ids), result.dim)      # (inputs, dim)

    # ---- stats -------------------------------------------------------------------------------------------

    async def refresh_stats(self) -> list[dict]:
        """Ask every replica for ``stats()`` now; update ``latest_stats`` and readiness; return them."""
        try:
            results = await self._handle.broadcast("stats").results_async(timeout_s=STATS_TIMEOUT_S,
                                                                         return_exceptions=True)
        except Exception:
            self._ready = False
            if self._was_available:     # it was there and now has no replica
                now = time.monotonic()
                self._unavailable_since = self._unavailable_since or now
                if now - self._unavailable_since >= self.gone_after_s:
                    self.dead_error = EngineDeadError(f"model {self.name!r} has had no replica for "
                                                      f"{now - self._unavailable_since:.0f} s")
            raise
        self._was_available, self.dead_error, self._unavailable_since = True, None, None
        stats = [r for r in results if isinstance(r, dict)]
        self._ready = any(s.get("healthy", True) for s in stats)
        self.replica_stats = stats
        self.latest_stats = _sum(stats)
        if stats and stats[0].get("output_dim"):
            self.output_dim = int(stats[0]["output_dim"])
        return stats

    def shutdown(self) -> None:
        """Stop the stats refresh and cancel every message in flight."""
        if self._stats_task is not None:
            self._stats_task.cancel()
        for message in list(self._pending.values()):
            message.rows.cancel()
        for task in list(self._sent):
            task.cancel()


def _sum(stats: list[dict]) -> SchedulerStats:
    counts: tuple = ()
    for s in stats:
        counts = add_step_counts(counts, tuple(s.get("iteration_tokens", ())))
    return SchedulerStats(sum(s.get("num_running", 0) for s in stats), sum(s.get("num_waiting", 0) for s in stats),
                          0.0, 0, 0, 0, iteration_tokens=counts,
                          iteration_tokens_sum=sum(s.get("iteration_tokens_sum", 0) for s in stats))


def _settle(rows: asyncio.Future, task: asyncio.Task) -> None:
    """Hand a message's outcome (its task's) to its callers."""
    if rows.done():
        return
    if task.cancelled():
        rows.cancel()
    elif task.exception() is not None:
        rows.set_exception(task.exception())
    else:
        rows.set_result(task.result())


def _retrieve(future: asyncio.Future) -> None:
    """Mark a message's exception as seen (its callers may all have left)."""
    if not future.cancelled():
        future.exception()
