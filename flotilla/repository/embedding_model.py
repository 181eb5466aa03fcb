"""An embedding model's requests through the repository's dynamic batcher (Triton's, ``dynamic_batcher``): one
batcher implementation for tensor models and embeddings alike.

- ``embedding_model_config(name, output_dim, ...)``: the model's Triton configuration: input ``INPUT_IDS``
  INT64 [-1] with ``allow_ragged_batch`` (token-id lists of any length share a batch; they are packed, never
  padded), output ``embedding`` FP32 [output_dim] (-1 when not known yet), ``max_batch_size`` (the engine's ``max_num_seqs``) and a
  ``dynamic_batching`` block (``max_queue_delay_microseconds`` 0 and no preferred sizes by default: a batch
  is whatever waits when an instance is free, so alone an input runs at once and under load batches grow).
- ``EmbeddingExecutor(run_batch)``: the batcher's ``BatchExecutor``: one ``run_batch(token_id_lists,
  pooling_params)`` call (one forward pass) per batch; each request's ``parameters`` may hold
  ``dimensions`` and ``normalize`` (already validated by the caller).
- ``DynamicEmbeddingBatcher``: the seam ``AsyncEmbedder`` batches through (``submit``, ``close``,
  ``num_waiting``, ``num_running``, ``dead_error``). The ``DynamicBatcher`` runs on its own event loop in a
  daemon thread, so ``submit`` may be awaited from any event loop and ``close`` is a plain call. A caller
  cancelled while its input is queued takes it out of the queue; one cancelled later is computed and
  dropped. A failing forward pass fails the inputs of its batch only (``RuntimeError`` with Triton's
  message); the batcher goes on. After ``close`` (or if the batcher breaks) ``submit`` raises
  ``EngineDeadError``; ``close`` fails the queued inputs and lets the running batch finish.
- ``dynamic_embedding_batcher(**settings)``: the ``batcher_factory`` ``AsyncEmbedder`` takes.

A batch is capped by ``max_batch_size`` inputs (the engine's ``max_num_seqs``) and by the engine's
``max_num_batched_tokens`` as padded tokens (inputs x the longest; the batcher's ``max_batch_padded_tokens``,
flotilla's extension of Triton's batcher), as in the offline ``LLM.embed`` path; an input longer than that
budget runs alone.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import replace
import threading
from typing import Callable, Sequence

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from flotilla.errors import EngineDeadError
from flotilla.pooling_params import PoolingParams
from flotilla.repository.config import ModelConfig
from flotilla.repository.batch_policy import BatcherSettings
from flotilla.repository.dynamic_batcher import DynamicBatcher, InferRequest
from flotilla.repository.tensors import ModelIO
from flotilla.repository.errors import InferError

INPUT_IDS = "INPUT_IDS"
EMBEDDING = "embedding"
RunBatch = Callable[[list[list[int]], list[PoolingParams]], list]


def embedding_model_config(name: str, output_dim: int, max_batch_size: int, *, max_queue_delay_us: int = 0,
                           preferred_batch_sizes: Sequence[int] = (), max_queue_size: int = 0) -> ModelConfig:
    """The Triton configuration of an embedding model (see the module docstring)."""
    config = ModelConfig(name=name, backend="flotilla", max_batch_size=max_batch_size)
    config.input.add(name=INPUT_IDS, data_type=mc.TYPE_INT64, dims=[-1], allow_ragged_batch=True)
    config.output.add(name=EMBEDDING, data_type=mc.TYPE_FP32, dims=[output_dim])
    db = config.dynamic_batching
    db.max_queue_delay_microseconds = max_queue_delay_us
    db.preferred_batch_size.extend(preferred_batch_sizes)
    db.default_queue_policy.max_queue_size = max_queue_size
    return config


def pooling_params_of(parameters) -> PoolingParams:
    """A request's ``PoolingParams`` from its ``dimensions`` / ``normalize`` parameters."""
    return PoolingParams(dimensions=parameters.get("dimensions"), normalize=parameters.get("normalize"))


class EmbeddingExecutor:
    """One instance of the embedding model for the dynamic batcher; ``num_running`` inputs are in its pass."""

    def __init__(self, run_batch: RunBatch):
        self.run_batch = run_batch
        self.num_running = 0

    def execute(self, requests: Sequence[InferRequest]) -> list[dict[str, np.ndarray]]:
        token_ids = [r.inputs[INPUT_IDS].reshape(-1).tolist() for r in requests]   # each (1, len) -> len
        self.num_running = len(requests)
        try:
            rows = self.run_batch(token_ids, [pooling_params_of(r.parameters) for r in requests])
        finally:
            self.num_running = 0
        return [{EMBEDDING: np.asarray(row, dtype=np.float32)[None]} for row in rows]   # each (1, dim)


class DynamicEmbeddingBatcher:
    """``AsyncEmbedder``'s batcher over ``DynamicBatcher`` (see the module docstring)."""

    def __init__(self, run_batch: RunBatch, max_num_seqs: int, max_num_batched_tokens: int, *,
                 name: str = "embedding", max_queue_delay_us: int = 0, preferred_batch_sizes: Sequence[int] = (),
                 max_queue_size: int = 0):
        self.config = embedding_model_config(name, -1, max_num_seqs, max_queue_delay_us=max_queue_delay_us,
                                             preferred_batch_sizes=preferred_batch_sizes,
                                             max_queue_size=max_queue_size)
        self.executor = EmbeddingExecutor(run_batch)
        settings = replace(BatcherSettings.from_config(self.config), max_batch_padded_tokens=max_num_batched_tokens)
        self.batcher = DynamicBatcher(settings, ModelIO.from_config(self.config), [self.executor])
        self._in_flight = 0          # submitted, not yet answered (queued + running)
        self._closed = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"flotilla-{name}-batcher", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.batcher.start(), self._loop).result(timeout=60)

    @property
    def num_running(self) -> int:
        return self.executor.num_running

    @property
    def num_waiting(self) -> int:
        return max(self._in_flight - self.executor.num_running, 0)

    @property
    def dead_error(self) -> BaseException | None:
        if self._closed:
            return EngineDeadError("the embedding model was shut down")
        if not self.batcher.accepting or not self._thread.is_alive():
            return EngineDeadError("the embedding model stopped")
        return None

    async def submit(self, token_ids: list[int], params: PoolingParams):
        """The embedding (a float32 numpy row) of one validated input, once its batch ran."""
        return (await self.submit_many([token_ids], params))[0]

    async def submit_many(self, token_ids: list[list[int]], params: PoolingParams) -> list:
        """The embeddings of one request's inputs, in order. They enter the batcher's queue together (one step
        of its loop), so they share a batch whenever its limits allow: the same request sent alone again gets
        the same batch, hence the same bits. If one fails (or this is cancelled) the others are cancelled."""
        if (dead := self.dead_error) is not None:
            raise dead
        inputs = [{INPUT_IDS: np.asarray(ids, dtype=np.int64)[None]} for ids in token_ids]   # each (1, len)
        parameters = {"dimensions": params.dimensions, "normalize": params.normalize}
        with self._lock:
            self._in_flight += len(inputs)
        try:
            future = asyncio.run_coroutine_threadsafe(self._infer_all(inputs, parameters), self._loop)
            outputs = await asyncio.wrap_future(future)   # cancelling this cancels the requests in the batcher
        except InferError as e:
            if self._closed or not self.batcher.accepting:
                raise self.dead_error or EngineDeadError("the embedding model stopped") from None
            raise RuntimeError(e.message) from None
        finally:
            with self._lock:
                self._in_flight -= len(inputs)
        return [out[EMBEDDING][0] for out in outputs]

    async def _infer_all(self, inputs: list[dict], parameters: dict) -> list[dict]:
        """On the batcher's loop: every input enqueued before the batcher looks at its queue again."""
        tasks = [asyncio.ensure_future(self.batcher.infer(one, parameters=parameters)) for one in inputs]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        """Stop admitting; fail the queued inputs (EngineDeadError); let the running batch finish."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.batcher.stop(drain=False), self._loop).result(timeout=120)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=60)
        if not self._thread.is_alive():
            self._loop.close()


def dynamic_embedding_batcher(**settings) -> Callable[..., DynamicEmbeddingBatcher]:
    """``AsyncEmbedder``'s ``batcher_factory`` with ``settings`` (``max_queue_delay_us``,
    ``preferred_batch_sizes``, ``max_queue_size``, ``name``)."""
    return functools.partial(DynamicEmbeddingBatcher, **settings)
