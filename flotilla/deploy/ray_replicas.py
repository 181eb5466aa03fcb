"""Ray Serve replicas of the models that are not generative LLMs: a repository model (Triton layout) and an
embedding model. The generative models' replica is ``flotilla.deploy.ray_serve.ModelServer``.

``RepositoryModelServer`` (one replica of the deployment of one repository model, e.g. ``repo-encoder``):
- It runs a ``ModelRepository`` over the deployment's repository directories in explicit model control mode
  and loads its one model at start, as tritonserver's explicit ``load`` does: every version its version
  policy selects, each with its ``instance_group`` instances behind its dynamic batcher. An ensemble's replica
  also loads the ensemble's composing models (inside this replica: every step goes through that model's
  batcher here, without another hop through Ray). A load that fails leaves the model UNAVAILABLE with
  Triton's reason in ``info()`` (the replica still starts, as tritonserver does; strict readiness then keeps
  the server not ready).
- The repository runs on an event loop of its own (a daemon thread), so it never depends on Serve's threading
  of user code; the handle methods hop onto it. A caller that cancels (client gone) cancels the request in
  the batcher (a queued request leaves the queue).
- ``infer(bytes)`` / ``info()`` speak ``flotilla.deploy.tensor_wire``; errors are Triton's (code, message).
  ``check_health()`` raises once the repository's loop is gone. Serve's destructor (``__del__``) closes the
  repository: every batcher drains, every instance is finalized (a Python model's ``finalize`` runs).

``EmbeddingServer`` (one replica of an embedding model's deployment): an ``AsyncEmbedder`` batched by the
repository's dynamic batcher (``dynamic_embedding_batcher``), so the inputs of concurrent requests reaching
this replica share forward passes. ``embed(bytes)`` embeds every input of an ``EmbedMessage``; ``stats()``
reports the batcher's counts for the ingress's ``RemoteEmbedder``; ``check_health()`` raises once the model
stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import numpy as np

from flotilla.deploy.aio_util import gather_or_cancel
from flotilla.deploy.tensor_wire import (EMBED_MESSAGE, EMBED_RESULT, INFER_MESSAGE, INFER_RESULT, MODEL_INFO,
                                         EmbedFailure, EmbedReply, IndexRow, InferFailure, InferMessage,
                                         InferReply, ModelInfo, TensorInfo, VersionInfo, tensor_from_wire,
                                         tensor_to_wire)
from flotilla.errors import EngineDeadError, InvalidRequestError
from flotilla.pooling_params import PoolingParams
from flotilla.repository.errors import InferError
from flotilla.wire import WireError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 3600.0     # loading a repository model (its instances) may take a while
CLOSE_TIMEOUT_S = 120.0


def replica_id() -> str:
    """Serve's unique id of the replica this runs in (``local-<pid>`` outside Serve)."""
    from ray import serve
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests constructing a replica class directly)
        return f"local-{os.getpid()}"


class LoopThread:
    """An asyncio event loop in a daemon thread: ``run(coro)`` blocks for its result, ``await call(coro)``
    awaits it from another loop (cancelling the awaiting task cancels ``coro``)."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.loop.is_closed()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def call(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


class RepositoryModelServer:
    """One replica of one repository model's deployment (see the module docstring). ``paths``: the
    repository directories (every node that runs a replica must see them at these paths); ``model_name``:
    the model directory this deployment serves."""

    def __init__(self, paths: list[str], model_name: str):
        from flotilla.distributed.ray_compat import bind_replica_grpc_to_node_ip
        bind_replica_grpc_to_node_ip()
        self.model_name = model_name
        self.replica_id = replica_id()
        self._loop = LoopThread(f"flotilla-repo-{model_name}")
        self.repository = self._loop.run(_start_repository(list(paths), model_name), START_TIMEOUT_S)
        logger.info("repository model %s: replica %s serves version(s) %s", model_name, self.replica_id,
                    ", ".join(self.repository.model_versions(model_name)) or "none")

    async def infer(self, message: bytes) -> bytes:
        try:
            request = INFER_MESSAGE.decode(message)
            inputs = {t.name: tensor_from_wire(t) for t in request.inputs}
            version, outcome = await self._loop.call(self._infer(request, inputs))
            outputs = [tensor_to_wire(name, array) for name, array in outcome.outputs.items()]
            return INFER_RESULT.encode(InferReply(version, outputs, dict(outcome.parameters)))
        except InferError as e:
            return INFER_RESULT.encode(InferFailure(e.code, e.message))
        except WireError as e:
            return INFER_RESULT.encode(InferFailure("INVALID_ARG", str(e)))
        except (TypeError, ValueError) as e:  # outputs or parameters that do not encode: the model's fault
            logger.error("repository model %s: cannot send its response: %s", self.model_name, e)
            return INFER_RESULT.encode(InferFailure("INTERNAL", f"model '{self.model_name}' returned a response "
                                                                f"that cannot be sent: {e}"))

    async def _infer(self, request: InferMessage, inputs: dict):
        """(the version that served, its outcome), on the repository's loop."""
        model = self.repository.model(request.model, request.version or None)
        version = model.version  # no await until model.infer resolves the same version (one event loop)
        outcome = await model.infer(inputs, requested_outputs=tuple(request.requested_outputs),
                                    parameters=dict(request.parameters), priority=request.priority,
                                    timeout_us=request.timeout_us)
        return version, outcome

    async def info(self) -> bytes:
        return MODEL_INFO.encode(await self._loop.call(self._info()))

    async def _info(self) -> ModelInfo:
        repo, name = self.repository, self.model_name
        versions = []
        for v in repo.model_versions(name):
            try:
                served = repo.model(name, v)
            except InferError:      # retired since model_versions
                continue
            meta = served.metadata()
            versions.append(VersionInfo(
                v, served.ready(), meta.platform, [TensorInfo(t.name, t.datatype, list(t.shape)) for t in meta.inputs],
                [TensorInfo(t.name, t.datatype, list(t.shape)) for t in meta.outputs],
                served.config().SerializeToString(deterministic=True), served.statistics(), _pending(served)))
        if versions:
            rows = [IndexRow(v.version, "READY" if v.ready else "UNAVAILABLE") for v in versions]
        else:   # not loaded (its reason): the index (a repository scan: not on every call of a serving model)
            rows = [IndexRow(e.version, e.state, e.reason) for e in repo.index() if e.name == name]
        return ModelInfo(name, self.replica_id, rows, versions)

    def check_health(self) -> None:
        if not self._loop.alive:
            raise RuntimeError(f"repository model {self.model_name}: its event loop stopped")

    def __del__(self):  # Serve calls it when it stops the replica; Python may call it again
        loop, self._loop = getattr(self, "_loop", None), None
        repository = getattr(self, "repository", None)
        if loop is None:
            return
        try:
            if repository is not None and loop.alive:
                loop.run(repository.close(), CLOSE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - stopping anyway
            logger.warning("repository model %s: closing failed: %s", getattr(self, "model_name", "?"), e)
        finally:
            loop.stop()


def _pending(served) -> int:
    """Requests queued in a version's batcher (``pending_request_count`` where the model has one)."""
    count = getattr(served, "pending_request_count", None)
    return int(count()) if count is not None else 0


async def _start_repository(paths: list[str], model_name: str):
    """A started ``ModelRepository`` (explicit mode) with ``model_name`` loaded, or recorded as failed."""
    from flotilla.deploy.model_repository import visible_gpus
    from flotilla.repository.manager import ModelRepository
    repository = ModelRepository(paths, model_control_mode="explicit", gpu_count=visible_gpus())
    await repository.start()
    try:
        await repository.load(model_name)
    except InferError as e:         # the index shows the model UNAVAILABLE with the reason
        logger.error("repository model %s: %s", model_name, e.message)
    return repository


class EmbeddingServer:
    """One replica of an embedding model's deployment (see the module docstring)."""

    def __init__(self, model_name: str, engine_args):
        from flotilla.distributed.ray_compat import bind_replica_grpc_to_node_ip
        from flotilla.engine.async_embedder import AsyncEmbedder
        from flotilla.repository.embedding_model import dynamic_embedding_batcher
        bind_replica_grpc_to_node_ip()
        self.model_name = model_name
        self.replica_id = replica_id()
        self.engine = AsyncEmbedder.from_engine_args(engine_args, dynamic_embedding_batcher(name=model_name))
        self.requests_total = 0
        logger.info("embedding model %s: replica %s ready (%d dimensions)", model_name, self.replica_id,
                    self.engine.output_dim)

    async def embed(self, message: bytes) -> bytes:
        self.requests_total += 1
        try:
            request = EMBED_MESSAGE.decode(message)
            params = self.engine.check_params(PoolingParams(dimensions=request.dimensions,
                                                            normalize=request.normalize))
            for ids in request.token_ids:
                self.engine.input_processor.check_token_ids(ids, "input")
            rows = await _embed_all(self.engine, request.token_ids, params)
        except (InvalidRequestError, WireError) as e:
            return EMBED_RESULT.encode(EmbedFailure("invalid", getattr(e, "message", str(e)), getattr(e, "param", None)))
        except EngineDeadError as e:
            return EMBED_RESULT.encode(EmbedFailure("dead", f"embedding model '{self.model_name}' stopped ({e})"))
        except RuntimeError as e:       # a failed forward pass (the batcher's message)
            return EMBED_RESULT.encode(EmbedFailure("failed", str(e)))
        matrix = np.stack([np.asarray(row, dtype=np.float32) for row in rows]) if rows else \
            np.zeros((0, self.engine.output_dim), np.float32)    # (inputs, dim)
        return EMBED_RESULT.encode(EmbedReply(int(matrix.shape[1]), matrix.astype("<f4").tobytes()))

    def stats(self) -> dict:
        s = self.engine.latest_stats
        return {"model": self.model_name, "replica_id": self.replica_id, "pid": os.getpid(),
                "output_dim": self.engine.output_dim, "num_running": s.num_running, "num_waiting": s.num_waiting,
                "iteration_tokens": list(s.iteration_tokens), "iteration_tokens_sum": s.iteration_tokens_sum,
                "requests_total": self.requests_total, "healthy": not self.engine.is_dead}

    def check_health(self) -> None:
        if self.engine.is_dead:
            raise RuntimeError(f"embedding model {self.model_name}: {self.engine.dead_error}")

    def __del__(self):
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()


async def _embed_all(engine, token_ids: list[list[int]], params) -> list:
    """Every input's embedding, in order, entering the batcher together (``embed_many`` where the engine has
    it); if one fails (or this is cancelled) the others are cancelled."""
    many = getattr(engine, "embed_many", None)
    if many is not None:
        return list(await many(token_ids, params))
    return await gather_or_cancel(engine.embed(ids, params) for ids in token_ids)
