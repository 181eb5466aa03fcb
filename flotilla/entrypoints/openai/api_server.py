"""The FastAPI app: routes, and the ASGI middleware stack around them.

Contract: ``build_app(engines, config, routes=None, seed=None, repository=None, batches=None)`` returns
``(asgi_app, served)`` where
``served`` is the app's ``ServedModels``. ``engines`` is one ``EngineClient`` (served as
``config.served_model_name``), a mapping ``{model name: EngineClient}`` (AsyncLLM, ReplicaSet or a remote
proxy), or a ready ``ServedModels``; ``routes`` maps aliases to ``{model name: weight}``. The app owns its
metrics registry (so several apps can live in one process) and never shuts the engines down. Routes:
``POST /v1/completions``, ``POST /v1/chat/completions`` (``model`` picks the model or alias; generative
models), ``POST /v1/embeddings`` (embedding models; ``serving_embedding``),
``GET /v1/models[/{id}]`` (models, then aliases with their ``flotilla_route``), ``GET /health`` (200 while
every engine is alive and ready and the server admits requests, else 503; from cached state, never a call
to an engine), ``GET /version``, ``POST /tokenize``,
``POST /detokenize`` (both take ``model``; ``serving_tokenization``), ``GET /tokenizer_info`` (only with
``config.enable_tokenizer_info_endpoint``), ``GET /metrics``, and the KServe v2 / Triton routes under ``/v2``
(``flotilla.entrypoints.kserve.http``) for every served model and, with ``repository``, the repository's
models; ``/metrics`` then also carries Triton's ``nv_inference_*`` per model and version. With ``batches`` (a
``serving_batches.BatchAPI``) the Files and Batches API: ``/v1/files`` (``serving_files``) and ``/v1/batches``
(``serving_batches``). No CORS headers.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import flotilla
# The app serves both protocols: this module composes the OpenAI routes with the KServe v2 ones (kserve/ uses
# the OpenAI side's shared HTTP pieces: errors, SSE, disconnect handling, admission; never this module).
from flotilla.entrypoints.kserve.embedding_model import EmbeddingModel
from flotilla.entrypoints.kserve.http import kserve_router
from flotilla.entrypoints.kserve.llm_model import LLMModel
from flotilla.entrypoints.kserve.metrics import TritonMetrics
from flotilla.entrypoints.kserve.service import KServeService
from flotilla.entrypoints.openai.cli_args import ServerConfig
from flotilla.entrypoints.openai.errors import error_response, install_error_handlers
from flotilla.entrypoints.openai.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware, InFlightMiddleware
from flotilla.entrypoints.openai.models import ServedModels
from flotilla.entrypoints.openai.serving_chat import create_chat_completion
from flotilla.entrypoints.openai.serving_completion import create_completion
from flotilla.entrypoints.openai.serving_embedding import create_embedding
from flotilla.entrypoints.openai.serving_tokenization import detokenize, tokenize, tokenizer_info


def build_app(engines, config: ServerConfig, routes=None, seed: int | None = None, repository=None, batches=None):
    """The ASGI app serving ``engines`` (see the module contract) and its ``ServedModels``; every model also
    answers the KServe v2 routes (``served.kserve``: the app's ``InferenceService``), and with ``repository``
    (a model repository's ``InferenceService``) its models too (``engines`` may then be empty); with
    ``batches`` the Files and Batches API."""
    if isinstance(engines, ServedModels):
        served = engines
    else:
        served = ServedModels(engines, config, routes, seed, allow_empty=repository is not None)
    app = FastAPI(title="flotilla", version=flotilla.__version__)
    app.state.served = served
    install_error_handlers(app)
    _add_generation_routes(app, served)
    _add_info_routes(app, served)
    _add_token_routes(app, served)
    _add_kserve_routes(app, served, repository, config)
    if batches is not None:
        from flotilla.entrypoints.openai.serving_batches import batches_router
        from flotilla.entrypoints.openai.serving_files import files_router
        app.include_router(files_router(batches))
        app.include_router(batches_router(batches))
    asgi = BodySizeLimitMiddleware(app, config.max_body_bytes)
    if config.api_key:
        asgi = ApiKeyMiddleware(asgi, config.api_key)
    return InFlightMiddleware(asgi, served.tracker), served


def _add_generation_routes(app: FastAPI, served: ServedModels) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(served, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(served, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await create_embedding(served, request)


def _add_info_routes(app: FastAPI, served: ServedModels) -> None:
    @app.get("/health")
    async def health() -> Response:
        if served.is_dead:
            return error_response(503, f"an engine is not running ({served.dead_error})")
        if served.tracker.draining:
            return error_response(503, "the server is shutting down")
        waiting = served.not_ready
        if waiting:
            return error_response(503, f"no ready replica (starting or being replaced) for model(s): "
                                       f"{', '.join(waiting)}")
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": flotilla.__version__})

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": served.cards()})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        return JSONResponse(served.card(model_id))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(served.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def engines_ready(served: ServedModels) -> bool:
    """Every LLM engine of the app is alive, ready, and the server is not draining."""
    return not served.is_dead and not served.not_ready and not served.tracker.draining


def _add_kserve_routes(app: FastAPI, served: ServedModels, repository, config: ServerConfig) -> None:
    models = {name: (EmbeddingModel(ctx) if ctx.runner == "pooling" else LLMModel(ctx))
              for name, ctx in served.contexts.items()}
    served.kserve = KServeService(models, repository)
    app.include_router(kserve_router(served.kserve, tracker=served.tracker, ready=lambda: engines_ready(served),
                                     max_body_bytes=config.max_body_bytes))
    served.metrics.text_sources.append(TritonMetrics(served.kserve, config.metrics_prefixes).render)


def _add_token_routes(app: FastAPI, served: ServedModels) -> None:
    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        return await tokenize(served, request)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        return await detokenize(served, request)

    if served.config.enable_tokenizer_info_endpoint:
        @app.get("/tokenizer_info")
        async def tokenizer_info_route(request: Request) -> Response:
            return await tokenizer_info(served, request)
