"""flotilla on Ray Serve: one deployment per model, and the application builder that puts an ingress in front.

Layout of the Serve application ``flotilla`` (route prefix ``/``):
- one ``ModelServer`` deployment per generative model (named after the model): each replica is one
  ``AsyncLLM`` whose engine core runs in a child process; with tensor/pipeline parallelism its ranks are Ray
  actors in a placement group made by flotilla's Ray executor (they may span nodes). ``replicas`` becomes
  ``num_replicas``, ``autoscaling`` Serve's ``autoscaling_config`` (driven by ongoing requests); replicas
  are chosen by ``FlotillaRequestRouter`` with the file's ``routing`` policy (``prefix_aware``: the replica
  that has the prompt's prefix cached unless it is overloaded, else power of two choices).
- one ``EmbeddingServer`` deployment per embedding model (named after the model; ``replicas`` /
  ``autoscaling`` as above, Serve's default router): each replica an ``AsyncEmbedder`` batched by the model
  repository's dynamic batcher (``flotilla.deploy.ray_replicas``).
- with a ``model_repository``: one ``RepositoryModelServer`` deployment per repository model,
  ``repo-<model>`` (``flotilla.deploy.ray_repository`` says which models and with what options).
- one ingress deployment (``INGRESS_NAME``, the file's ``ingress.replicas`` replicas), passed to
  ``build_ray_app`` by the layer above: flotilla's OpenAI ingress (``flotilla.entrypoints.openai.ray_ingress``,
  which also holds ``build_openai_ray_app``); ``flotilla serve --ray`` is
  ``flotilla.entrypoints.openai.ray_server.run_on_ray``.

Security: replicas' internal gRPC servers bind the node IP, not every interface; a Ray instance that
``connect_ray`` starts listens on loopback only, without a dashboard (both through the private Ray APIs
isolated in ``flotilla.distributed.ray_compat``).

Per-model ``ray`` settings (``ModelSpec.ray``): ``num_cpus``, ``num_gpus``, ``ray_actor_options``,
``max_ongoing_requests``, ``health_check_period_s``, ``health_check_timeout_s``, ``stall_timeout_s``,
``graceful_shutdown_timeout_s``, ``autoscaling_config`` (extra Serve autoscaling keys, e.g.
``metrics_interval_s``, ``look_back_period_s``), ``routing_stats_period_s``, ``routing_kwargs`` (policy
constructor arguments); ``placement_strategy`` is accepted but not applied yet (ranks are placed PACK).
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from flotilla.deploy.ray_replicas import EmbeddingServer, replica_id
from flotilla.deploy.ray_repository import (check_repository_names, plan_repository, repository_cpus,
                                            repository_deployments)
from flotilla.deploy.ray_router import ROUTER_CLASS_PATH
from flotilla.deploy.schema import RAY_SETTINGS  # the file's ray: keys
from flotilla.deploy.serve_wire import (ENGINE_DEAD, GENERATE_REQUEST, Accepted, GenerateFailure, encode_frame,
                                        encode_output)
from flotilla.distributed.ray_compat import bind_replica_grpc_to_node_ip
from flotilla.engine.arg_utils import EngineArgs
from flotilla.errors import EngineDeadError

logger = logging.getLogger(__name__)

APP_NAME = "flotilla"
INGRESS_NAME = "flotilla-ingress"
DEFAULT_STALL_TIMEOUT_S = 120.0
DEFAULT_HEALTH_CHECK_PERIOD_S = 5.0
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 30.0
DEFAULT_ROUTING_STATS_PERIOD_S = 2.0
ENGINE_WATCH_PERIOD_S = 0.1  # how often a replica looks whether its engine died
EXIT_GRACE_S = 5.0  # a replica whose engine died waits this long for its streams to send their failure frames
INGRESS_MAX_ONGOING = 4096


# ---- one replica of one model ----------------------------------------------------------------------------

def stalled_for(now: float, busy: bool, progressed: bool, last_progress: float | None) -> tuple[float, float | None]:
    """Pure stall bookkeeping: returns ``(seconds without progress while busy, new last_progress)``.

    ``busy``: the engine has unfinished requests; ``progressed``: it stepped or produced output since the
    last call. An idle engine, or one that progressed, is not stalled (the clock restarts).
    """
    if not busy or progressed or last_progress is None:
        return 0.0, now
    return now - last_progress, last_progress


def replica_engine_args(args: EngineArgs, gcs_address: str | None) -> EngineArgs:
    """The EngineArgs a replica runs: several ranks use the Ray executor, joined to this cluster (the engine
    core child process connects to ``gcs_address``; without it, it would start a cluster of its own)."""
    args = copy.deepcopy(args)
    if args.tensor_parallel_size * args.pipeline_parallel_size > 1:
        if args.distributed_executor_backend in (None, "ray"):
            args.distributed_executor_backend = "ray"
    if args.distributed_executor_backend == "ray" and not args.ray_address:
        args.ray_address = gcs_address
    return args


class ModelServer:
    """One replica of a model deployment: one engine (``AsyncLLM``; its core runs in a child process).

    Contract (methods are called by Serve handles):
    - ``generate(request)`` takes the bytes of a ``GenerateRequest`` and is an async generator of the bytes
      of frames (``flotilla.deploy.serve_wire``, never pickled flotilla objects): ``Accepted`` (this
      replica's id) first, then one ``GenerateOutput`` per ``RequestOutput`` (deltas unless the request asks
      for another ``output_kind``). When the engine is dead, or dies before the request finishes, the last
      frame is a ``GenerateFailure`` (``ENGINE_DEAD``, a plain message, this replica's id, whether outputs
      had been sent) and the stream ends without raising. A malformed request raises ``WireError``. If the
      caller cancels the stream (or stops iterating), the engine request is aborted and its blocks freed.
    - When the engine dies, the replica (under Serve) leaves at once: its streams end with failure frames
      (up to ``EXIT_GRACE_S``), then it kills its own actor, so Serve replaces it without waiting for
      health checks and request routers drop it.
    - ``stats()`` -> dict: this replica's id, pid, engine core pid, node, ``num_blocks``, the scheduler
      snapshot (``num_running``, ``num_waiting``, ``kv_cache_usage``, ``prefix_cache_queries``,
      ``prefix_cache_hits``, ``num_preemptions``), ``num_ongoing`` and ``ongoing_request_ids``,
      ``requests_total`` (generate calls) and ``requests_unfinished`` (those that ended before their last
      output: cancelled or failed).
    - ``check_health()`` raises when the engine is dead or has made no progress (no step, no output) for
      ``stall_timeout_s`` while it had work; Serve then replaces the replica.
    - ``record_routing_stats()`` -> ``{"healthy", "num_running", "num_waiting", "kv_cache_usage"}`` for
      the request router (it skips replicas that report ``healthy: False``).
    """

    def __init__(self, model_name: str, engine_args: EngineArgs, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S):
        from flotilla.engine.async_llm import AsyncLLM
        bind_replica_grpc_to_node_ip()
        self.model_name = model_name
        self.stall_timeout_s = stall_timeout_s
        self.args = replica_engine_args(engine_args, ray.get_runtime_context().gcs_address)
        self.engine = AsyncLLM(self.args)
        self.replica_id = replica_id()
        self._inflight = 0
        self._ongoing: set[str] = set()
        self.requests_total = 0
        self.requests_unfinished = 0  # cancelled by the caller, or failed
        self._last_progress: float | None = None
        self._outputs_seen = 0
        self._marker = (None, 0)
        self._closing = threading.Event()
        if _in_serve_replica():
            threading.Thread(target=self._watch_engine, name="flotilla-engine-watch", daemon=True).start()
        logger.info("model %s: replica %s ready (engine core pid %s, %d KV blocks)", model_name, self.replica_id,
                    self.core_pid(), self.engine.num_blocks)

    async def generate(self, request: bytes):
        req = GENERATE_REQUEST.decode(request)
        prompt = {"prompt": req.prompt, "prompt_token_ids": req.prompt_token_ids, "cache_salt": req.cache_salt}
        self._inflight += 1
        self._ongoing.add(req.request_id)
        self.requests_total += 1
        finished = started = False
        stream = None
        try:
            yield encode_frame(Accepted(self.replica_id))
            stream = self.engine.generate(prompt, req.sampling_params, req.request_id, req.output_kind,
                                          priority=req.priority)
            async for out in stream:
                self._outputs_seen += 1
                finished = out.finished
                started = True
                yield encode_output(out)
        except EngineDeadError:
            yield encode_frame(self._failure(req.request_id, started))
        finally:
            self._inflight -= 1
            self._ongoing.discard(req.request_id)
            if not finished:
                self.requests_unfinished += 1
            if stream is not None:
                await stream.aclose()  # unfinished (cancelled by the caller): the engine aborts the request

    def _failure(self, request_id: str, started: bool) -> GenerateFailure:
        reason = self.engine.dead_error if self.engine is not None else None
        message = (f"model {self.model_name!r}: the engine of the replica serving request {request_id} "
                   f"stopped ({reason or 'shut down'})")
        return GenerateFailure(ENGINE_DEAD, message, self.replica_id, started)

    def _watch_engine(self) -> None:
        """Under Serve: once the engine is dead, let open streams send their failure frames, then kill this
        replica's actor so Serve replaces it at once (health checks would take several periods)."""
        while not self._closing.wait(ENGINE_WATCH_PERIOD_S):
            engine = self.engine
            if engine is None or not engine.is_dead:
                continue
            logger.error("model %s: replica %s: the engine died (%s); leaving", self.model_name,
                         self.replica_id, engine.dead_error)
            deadline = time.monotonic() + EXIT_GRACE_S
            while self._inflight > 0 and time.monotonic() < deadline and not self._closing.is_set():
                time.sleep(ENGINE_WATCH_PERIOD_S)
            if not self._closing.is_set():
                _exit_this_actor()
            return

    def stats(self) -> dict:
        s = self.engine.latest_stats
        return {"model": self.model_name, "replica_id": self.replica_id, "pid": os.getpid(),
                "core_pid": self.core_pid(), "node_id": ray.get_runtime_context().get_node_id(),
                "num_blocks": self.engine.num_blocks, "num_running": s.num_running, "num_waiting": s.num_waiting,
                "kv_cache_usage": s.kv_cache_usage, "prefix_cache_queries": s.prefix_cache_queries,
                "prefix_cache_hits": s.prefix_cache_hits, "num_preemptions": s.num_preemptions,
                "iteration_tokens": list(s.iteration_tokens), "iteration_tokens_sum": s.iteration_tokens_sum,
                "spec_num_drafts": s.spec_num_drafts, "spec_num_draft_tokens": s.spec_num_draft_tokens,
                "spec_num_accepted_tokens": s.spec_num_accepted_tokens,
                "spec_accepted_per_pos": list(s.spec_accepted_per_pos),
                "num_ongoing": self._inflight, "ongoing_request_ids": sorted(self._ongoing),
                "requests_total": self.requests_total,
                "requests_unfinished": self.requests_unfinished,
                "healthy": not self.engine.is_dead}

    def record_routing_stats(self) -> dict:
        s = self.engine.latest_stats
        return {"healthy": not self.engine.is_dead, "num_running": s.num_running, "num_waiting": s.num_waiting,
                "kv_cache_usage": s.kv_cache_usage}

    def check_health(self) -> None:
        if self.engine.is_dead:
            raise RuntimeError(f"model {self.model_name}: the engine is dead: {self.engine.dead_error}")
        marker = (self.engine.latest_stats, self._outputs_seen)
        progressed = marker[0] is not self._marker[0] or marker[1] != self._marker[1]
        self._marker = marker
        busy = self._inflight > 0 or self.engine.num_unfinished_requests > 0
        stalled, self._last_progress = stalled_for(time.monotonic(), busy, progressed, self._last_progress)
        if stalled > self.stall_timeout_s:
            raise RuntimeError(f"model {self.model_name}: the engine made no progress for {stalled:.0f} s "
                               f"with {self._inflight} request(s) in flight")

    def core_pid(self) -> int | None:
        """Process id of the engine core child process."""
        client = getattr(self.engine, "_client", None)
        return getattr(getattr(client, "proc", None), "pid", None)

    def __del__(self):  # Serve calls it when it stops the replica; Python may call it again
        closing = getattr(self, "_closing", None)
        if closing is not None:
            closing.set()
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()


def _in_serve_replica() -> bool:
    try:
        serve.get_replica_context()
        return True
    except Exception:  # noqa: BLE001 - outside Serve (tests constructing the class directly)
        return False


def _exit_this_actor() -> None:
    """Kill this replica's actor (public ``ray.kill`` on ``current_actor``): Serve sees the actor die and
    replaces the replica; callers with open requests get ``ActorDiedError``."""
    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


# ---- building the application ----------------------------------------------------------------------------

def _ray_setting(spec, key: str, default=None):
    return (getattr(spec, "ray", None) or {}).get(key, default)


def autoscaling_config(spec) -> dict | None:
    """Serve's ``autoscaling_config`` for a model spec (None: a fixed ``num_replicas``)."""
    auto = getattr(spec, "autoscaling", None)
    if auto is None:
        return None
    config = {"min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
              "target_ongoing_requests": auto.target_ongoing_requests}
    for key in ("upscale_delay_s", "downscale_delay_s", "initial_replicas", "metrics_interval_s",
                "look_back_period_s"):
        value = getattr(auto, key, None)
        if value is not None:
            config[key] = value
    config.update(_ray_setting(spec, "autoscaling_config", {}))
    return config


def replica_resources(args: EngineArgs, spec) -> dict:
    """``ray_actor_options`` of a replica. One rank: the replica's engine core computes, so it holds the
    CPU (or GPU); several ranks: the ranks' placement group holds them and the replica itself needs none."""
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    cuda = args.device.startswith("cuda")
    options = {"num_cpus": _ray_setting(spec, "num_cpus", 1 if world == 1 and not cuda else 0),
               "num_gpus": _ray_setting(spec, "num_gpus", 1 if world == 1 and cuda else 0)}
    options.update(_ray_setting(spec, "ray_actor_options", {}))
    return options


def _check_ray_settings(spec) -> None:
    settings = getattr(spec, "ray", None) or {}
    unknown = sorted(set(settings) - set(RAY_SETTINGS))
    if unknown:
        logger.warning("model %s: ignoring unknown ray settings %s (known: %s)", spec.name, unknown,
                       ", ".join(RAY_SETTINGS))
    if settings.get("placement_strategy", "PACK") != "PACK":
        logger.warning("model %s: ray.placement_strategy %s is not applied yet (the engine's Ray executor "
                       "places ranks with PACK)", spec.name, settings["placement_strategy"])


def model_deployment(spec, routing: str = "prefix_aware", seed: int | None = None):
    """The Serve deployment of one model (bind it with ``(name, engine_args, stall_timeout_s)``)."""
    return serve.deployment(ModelServer).options(**model_deployment_options(spec, routing, seed))


def model_deployment_options(spec, routing: str = "prefix_aware", seed: int | None = None) -> dict:
    """The keyword arguments of ``Deployment.options`` for one model's deployment: name, replicas or
    autoscaling, actor resources, ``max_ongoing_requests``, health checks and the request router."""
    _check_ray_settings(spec)
    args = spec.engine_args()
    max_ongoing = _ray_setting(spec, "max_ongoing_requests", max(16, 2 * args.max_num_seqs))
    policy_kwargs = dict(_ray_setting(spec, "routing_kwargs", {}))
    if routing == "prefix_aware":
        policy_kwargs.setdefault("block_size", args.block_size)
    router = RequestRouterConfig(
        request_router_class=ROUTER_CLASS_PATH,
        request_router_kwargs={"policy": routing, "seed": seed, "max_num_seqs": args.max_num_seqs,
                               "policy_kwargs": policy_kwargs},
        request_routing_stats_period_s=_ray_setting(spec, "routing_stats_period_s", DEFAULT_ROUTING_STATS_PERIOD_S))
    return dict(_common_options(spec, args, max_ongoing), request_router_config=router)


def _common_options(spec, args, max_ongoing: int) -> dict:
    """``Deployment.options`` both kinds of model deployment share: name, actor resources, ``max_ongoing_requests``,
    health checks, the graceful shutdown timeout, and replicas or autoscaling."""
    options = dict(name=spec.name, ray_actor_options=replica_resources(args, spec),
                   max_ongoing_requests=max_ongoing,
                   health_check_period_s=_ray_setting(spec, "health_check_period_s", DEFAULT_HEALTH_CHECK_PERIOD_S),
                   health_check_timeout_s=_ray_setting(spec, "health_check_timeout_s",
                                                       DEFAULT_HEALTH_CHECK_TIMEOUT_S))
    grace = _ray_setting(spec, "graceful_shutdown_timeout_s")
    if grace is not None:
        options["graceful_shutdown_timeout_s"] = grace
    auto = autoscaling_config(spec)
    if auto is not None:
        options["autoscaling_config"] = auto
    else:
        options["num_replicas"] = spec.replicas
    return options


# ray: settings that only generative models' deployments use
GENERATIVE_ONLY_SETTINGS = ("stall_timeout_s", "routing_stats_period_s", "routing_kwargs", "placement_strategy")


def embedding_deployment_options(spec) -> dict:
    """The keyword arguments of ``Deployment.options`` for an embedding model's deployment: name, replicas or
    autoscaling, actor resources, ``max_ongoing_requests`` and health checks (Serve's default router: no
    prefix to route by). The generative-only ``ray:`` settings are warned about, not applied."""
    _check_ray_settings(spec)
    unused = [key for key in GENERATIVE_ONLY_SETTINGS if key in (getattr(spec, "ray", None) or {})]
    if unused:
        logger.warning("model %s: ray settings %s apply to generative models only; an embedding model's "
                       "deployment does not use them", spec.name, unused)
    args = spec.engine_args()
    return _common_options(spec, args, _ray_setting(spec, "max_ongoing_requests", max(16, 2 * args.max_num_seqs)))


def embedding_models(config) -> list[str]:
    """The names of the deployment's embedding models (the pooling runner), in file order."""
    from flotilla.engine.async_embedder import is_pooling_model
    return [spec.name for spec in config.models if is_pooling_model(spec.engine_args())]


def build_ray_app(config, ingress, *, graceful_shutdown_timeout_s: float | None = None, **ingress_kwargs):
    """The Serve application for a deployment: a deployment per model (``ModelServer``, or ``EmbeddingServer``
    for an embedding model) and per repository model (``RepositoryModelServer``) behind ``ingress``.

    ``ingress`` is the application's HTTP entry, a class made with ``serve.ingress`` (flotilla's OpenAI one
    is ``flotilla.entrypoints.openai.ray_ingress.OpenAIIngress``); it runs as the deployment ``INGRESS_NAME``
    with ``config.ingress_replicas`` replicas (no CPU reserved: Serve's proxy spreads requests over them and
    routes around a dead one) and is constructed with ``models`` (model name -> deployment handle),
    ``engine_args`` (model name -> EngineArgs), ``routes`` (the aliases' traffic splits), ``seed`` and
    ``ingress_kwargs``, plus ``embedding_models`` (the names of the models that are embedding models),
    ``repository`` (the ``RepositoryPlan`` of the file's ``model_repository``, or None) and
    ``repository_models`` (repository model name -> its deployment handle).
    ``graceful_shutdown_timeout_s`` (None: Serve's default) is how long Serve lets an ingress replica it stops
    finish its requests: the server's drain limit, so Serve never cuts a drain short. ValueError (before
    anything deploys) for a repository Ray cannot serve (``check_repository_on_ray``) and for a name that
    would be both a model of the file and a repository model, or both a model's and a repository model's
    deployment.
    """
    embedding = set(embedding_models(config))
    handles, engine_args = {}, {}
    for spec in config.models:
        args = spec.engine_args()
        engine_args[spec.name] = args
        if spec.name in embedding:
            handles[spec.name] = serve.deployment(EmbeddingServer).options(
                **embedding_deployment_options(spec)).bind(spec.name, args)
            continue
        stall = _ray_setting(spec, "stall_timeout_s", DEFAULT_STALL_TIMEOUT_S)
        handles[spec.name] = model_deployment(spec, config.routing, config.seed).bind(
            spec.name, args, stall)
    plan = repository_models = None
    if config.model_repository is not None:
        plan = plan_repository(config.model_repository, config.model_names)
        check_repository_names(config.model_names, plan, INGRESS_NAME)
        repository_models = repository_deployments(plan)
    options = dict(name=INGRESS_NAME, num_replicas=config.ingress_replicas, max_ongoing_requests=INGRESS_MAX_ONGOING,
                   ray_actor_options={"num_cpus": 0})
    if graceful_shutdown_timeout_s is not None:
        options["graceful_shutdown_timeout_s"] = graceful_shutdown_timeout_s
    deployment = serve.deployment(ingress).options(**options)
    return deployment.bind(models=handles, engine_args=engine_args, routes=dict(config.routes or {}),
                           seed=config.seed, embedding_models=sorted(embedding), repository=plan,
                           repository_models=repository_models, **ingress_kwargs)


# ---- the cluster ---------------------------------------------------------------------------------------

def cpus_needed(config) -> int:
    """Logical CPUs a local Ray instance needs so every replica (at its maximum count) and rank fits, the
    repository models' replicas included."""
    total = 0.0
    if config.model_repository is not None:
        total += repository_cpus(plan_repository(config.model_repository, config.model_names))
    for spec in config.models:
        args = spec.engine_args()
        auto = getattr(spec, "autoscaling", None)
        count = auto.max_replicas if auto is not None else spec.replicas
        world = args.tensor_parallel_size * args.pipeline_parallel_size
        per = replica_resources(args, spec)["num_cpus"] + (world if world > 1 and args.device == "cpu" else 0)
        total += count * per
    return max(1, int(total + 0.999))


def connect_ray(address: str | None, num_cpus: int) -> bool:
    """Connect to ``address`` (or reuse this process's connection); without one start a local Ray instance
    on loopback with no dashboard. Returns True if that local instance is ours to shut down."""
    from flotilla.executor.ray_executor import _connect_ray
    return _connect_ray(address, num_cpus)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for tests and examples)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
