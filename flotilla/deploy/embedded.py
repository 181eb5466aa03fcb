"""Embedded mode: run a whole ``DeploymentConfig`` in this process (``flotilla serve --config deploy.yaml``).

One ``AsyncLLM`` (whose engine core runs in a child process) per model replica, or for an embedding model
one ``AsyncEmbedder`` (in this process; ``flotilla.engine.async_embedder``); a model with several
replicas is one ``ReplicaSet`` routed by the file's ``routing`` policy. Embedded mode does not autoscale: a
model with ``autoscaling`` runs ``autoscaling.min`` replicas (Ray Serve autoscales). ``ray:`` options are
ignored here.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping

from flotilla.deploy.config import DeploymentConfig, ModelSpec
from flotilla.deploy.replica_set import ReplicaSet
from flotilla.deploy.routing import make_policy
from flotilla.errors import InvalidRequestError

logger = logging.getLogger(__name__)


def _default_factory(args):
    from flotilla.engine.async_embedder import make_async_engine
    from flotilla.repository.embedding_model import dynamic_embedding_batcher
    return make_async_engine(args, dynamic_embedding_batcher(name=args.served_model_name or "embedding"))


def start_engines(deployment: DeploymentConfig, engine_factory: Callable | None = None,
                  on_start: Callable[[str], None] | None = None) -> dict:
    """``{model name: engine}`` for every model of ``deployment``, in file order: an ``AsyncLLM`` (or, for an
    embedding model, an ``AsyncEmbedder``) per model, or a ``ReplicaSet`` of them when it has several replicas. ``engine_factory(EngineArgs)`` builds one
    replica (default ``AsyncLLM.from_engine_args``); ``on_start(message)`` is told before each load.
    If any load fails (or is interrupted), every engine already started is shut down and the error is
    re-raised: no engine process outlives a failed start. Parallel sizes that do not fit a model fail
    before anything starts (``check_parallel_sizes``)."""
    factory = engine_factory or _default_factory
    check_parallel_sizes(deployment)
    started: list = []
    engines: dict = {}
    try:
        for i, spec in enumerate(deployment.models):
            count = spec.replicas
            if spec.autoscaling is not None:
                logger.info("%s: embedded mode does not autoscale; running min=%d replica(s)", spec.name, count)
            replicas = []
            for r in range(count):
                if on_start is not None:
                    which = f" replica {r + 1}/{count}" if count > 1 else ""
                    on_start(f"loading {spec.name}{which} ({spec.model}) ...")
                replicas.append(factory(spec.engine_args()))
                started.append(replicas[-1])
                if count > 1 and getattr(replicas[-1], "runner", "generate") == "pooling":
                    raise InvalidRequestError(f"{spec.name}: an embedding model runs as one replica in embedded "
                                              f"mode (it batches concurrent requests itself); set replicas: 1",
                                              "replicas")
            engines[spec.name] = replicas[0] if count == 1 else _replica_set(deployment, i, spec, replicas)
    except BaseException:
        shutdown_engines(dict(enumerate(started)))
        raise
    return engines


def check_parallel_sizes(deployment: DeploymentConfig) -> None:
    """Raise ``InvalidRequestError`` (naming the model's heads or layers and the sizes that work) for any
    model whose tensor/pipeline sizes do not fit it, before any engine loads (models with both sizes 1
    always fit and are not checked, so nothing is read twice for them)."""
    for spec in deployment.models:
        if spec.tensor_parallel_size > 1 or spec.pipeline_parallel_size > 1:
            spec.engine_args().create_engine_config()


def _replica_set(deployment: DeploymentConfig, index: int, spec: ModelSpec, replicas: list) -> ReplicaSet:
    rng = random.Random(None if deployment.seed is None else deployment.seed * 1000 + index)
    kwargs = {}
    if deployment.routing == "prefix_aware":
        kwargs["block_size"] = replicas[0].config.cache.block_size
    policy = make_policy(deployment.routing, rng=rng, **kwargs)
    return ReplicaSet(replicas, policy, [f"{spec.name}-{r}" for r in range(len(replicas))])


def shutdown_engines(engines: Mapping) -> None:
    """Shut every engine down, each even if another fails (errors are logged)."""
    for name, engine in engines.items():
        try:
            engine.shutdown()
        except Exception as e:  # noqa: BLE001 - keep stopping the others
            logger.error("shutting down %s failed: %s", name, e)
