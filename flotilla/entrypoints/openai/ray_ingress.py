"""The OpenAI ingress of flotilla's Ray Serve application: the same FastAPI app as embedded mode
(``build_app``), given a ``RemoteEngine`` per generative model, a ``RemoteEmbedder`` per embedding model and,
with a model repository, a ``RemoteRepository`` over its models' deployments, so completions, chat,
streaming, embeddings, the KServe v2 routes, errors, API key and metrics behave identically. The model
deployments behind it are ``flotilla.deploy.ray_serve``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses

from ray import serve

from flotilla.deploy.ray_serve import build_ray_app
from flotilla.distributed.ray_compat import bind_replica_grpc_to_node_ip
from flotilla.entrypoints.openai.cli_args import ServerConfig


def build_openai_app(engines: dict, routes: dict, server_config, seed: int | None = None, repository=None):
    """The OpenAI app over these engines (model name -> engine client) and ``repository`` (an
    ``InferenceService`` or None), as ``build_app`` builds it embedded; returns ``(asgi_app, served_models)``."""
    from flotilla.entrypoints.openai.api_server import build_app
    return build_app(engines, server_config, routes=routes, seed=seed, repository=repository)


@serve.ingress()
class OpenAIIngress:
    """The HTTP entry of the application: flotilla's OpenAI app over one ``RemoteEngine`` per model.

    Contract: ``models`` maps model name -> that model's deployment handle, ``engine_args`` model name ->
    its EngineArgs (tokenizer and limits are built here from config files, no weights), ``embedding_models``
    names the embedding models among them; ``routes`` are the aliases' traffic splits (drawn with ``seed``);
    ``server_config`` the HTTP settings (API key, queue bound, body limit). ``repository`` (a
    ``RepositoryPlan`` or None) and ``repository_models`` (repository model name -> deployment handle) serve
    the model repository's models on the KServe v2 routes. Model names and aliases are resolved exactly as in
    embedded mode (unknown: 404).

    Drain (``run_on_ray`` broadcasts these on SIGTERM): ``drain()`` makes this replica answer new requests
    and ``/health`` with a JSON 503, as embedded mode does after SIGTERM, and returns its HTTP requests in
    flight; ``abort_all()`` aborts its engine requests (their responses end with ``finish_reason: "abort"``).
    Both run on the app's event loop.
    """

    def __init__(self, models: dict, engine_args: dict, routes: dict, server_config, seed: int | None = None,
                 embedding_models=(), repository=None, repository_models: dict | None = None):
        bind_replica_grpc_to_node_ip()
        self._handles, self._engine_args = models, engine_args
        self._routes, self._server_config, self._seed = routes or {}, server_config, seed
        self._embedding = set(embedding_models)
        self._plan, self._repository_handles = repository, repository_models or {}
        self.engines: dict = {}
        self.repository = None
        self.served = None

    async def __serve_build_asgi_app__(self):
        from flotilla.deploy.remote_embedder import RemoteEmbedder
        from flotilla.deploy.remote_engine import RemoteEngine
        self.engines = {name: (RemoteEmbedder if name in self._embedding else RemoteEngine)(
            name, handle, self._engine_args[name]) for name, handle in self._handles.items()}
        for engine in self.engines.values():
            engine.ensure_stats_task()
        if self._plan is not None:
            from flotilla.deploy.remote_repository import RemoteRepository
            self.repository = RemoteRepository(self._plan, self._repository_handles)
            self.repository.start()
        app, self.served = build_openai_app(self.engines, self._routes, self._server_config, self._seed,
                                            repository=self.repository)
        return app if self.repository is None else FreshRepositoryMetrics(app, self.repository)

    async def drain(self) -> int:
        self.served.tracker.draining = True
        return self.served.tracker.in_flight

    async def abort_all(self) -> int:
        return self.served.abort_all()

    def __del__(self):
        for engine in getattr(self, "engines", {}).values():
            engine.shutdown()
        if getattr(self, "repository", None) is not None:
            self.repository.close()


class FreshRepositoryMetrics:
    """ASGI middleware: before ``GET /metrics`` answers, the repository collects its replicas' statistics (the
    Triton ``nv_inference_*`` metrics then count every request answered before the scrape)."""

    def __init__(self, app, repository):
        self.app, self.repository = app, repository

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") == "/metrics":
            with contextlib.suppress(Exception):     # a replica that does not answer: its last report
                await self.repository.refresh_statistics()
        await self.app(scope, receive, send)


def server_config_for(config, api_key: str | None, host: str = "127.0.0.1", port: int = 8000, base=None):
    """HTTP settings (``base``'s, e.g. the queue bound and body limit, else the defaults) with this host,
    port and API key: ``api_key`` if given, else the one ``config.api_key_env`` names (None: no key)."""
    if api_key is None:
        api_key = config.api_key()
    return dataclasses.replace(base or ServerConfig(), host=host, port=port,
                               served_model_name=config.models[0].name if config.models else "model",
                               api_key=api_key)


def build_openai_ray_app(config, *, api_key: str | None = None, server_config=None):
    """The Serve application for a deployment file: a ``ModelServer`` deployment per model behind the
    ``OpenAIIngress`` (``config.ingress_replicas`` replicas). ``api_key`` (else the variable
    ``config.api_key_env`` names) protects the API. Serve gives an ingress replica it stops the server's
    ``shutdown_timeout`` to finish its requests."""
    server_config = server_config or server_config_for(config, api_key)
    return build_ray_app(config, OpenAIIngress, server_config=server_config,
                         graceful_shutdown_timeout_s=server_config.shutdown_timeout)
