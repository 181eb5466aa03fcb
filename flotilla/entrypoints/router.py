"""``python -m flotilla.entrypoints.router --config router.yaml``: one OpenAI endpoint in front of
per-model flotilla servers (the ``plain`` Kubernetes target runs it behind the Service ``<release>``).

The config (``flotilla k8s`` writes it from the deployment file)::

    backends: {chat-v1: "http://flotilla-chat-v1:8000", chat-v2: "http://flotilla-chat-v2:8000"}
    routes: {chat: {chat-v1: 90, chat-v2: 10}}    # the deployment file's aliases
    repository: "http://flotilla-repository:8000"  # optional: the server of the file's model repository
    seed: 0                                        # optional, as in the deployment file
    api_key_env: FLOTILLA_API_KEY                  # optional: the variable holding the API key

Contract (the same names and errors as one ``flotilla serve --config``):
- ``POST /v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``, ``/tokenize``, ``/detokenize``: the
  body's ``model`` picks the backend; an alias draws a target by weight (``choose_weighted``: seeded, sticky
  per ``user``) and the body's ``model`` becomes the target, so the response names it; ``model`` may be left
  out only with one backend. The backend's response (status, headers, body; streams chunk by chunk) is
  relayed; a client that goes away closes the backend request (the server aborts it); a backend that cannot
  be reached is a JSON 503 with Retry-After; a backend that fails mid-stream cuts the client's response
  (never a truncated body that looks whole). Unknown model: 404; a body that is not a JSON object: 400.
- ``GET /v1/models[/{id}]``: the backends' models (those that answer), then the aliases whose targets all
  answered, with ``flotilla_route``. ``/v2/models/{name}/...`` (KServe v2) goes to that model's backend, or,
  for a name no backend serves, to the ``repository`` server (404 without one), as does ``/v2/repository/...``
  (the repository index and explicit loads).
- ``/health``, ``/v2/health/live``, ``/v2/health/ready``: 200 while the router runs (its backends have
  their own probes); ``/metrics``: ``flotilla_router_requests_total{model, target, code}``.
- The API key (when ``api_key_env`` is set; the variable must then be set) is checked here as by the
  server, and forwarded. SIGTERM: uvicorn stops accepting and lets requests in flight finish for up to
  ``--shutdown-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
from dataclasses import dataclass, field

import httpx
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from flotilla import envs
from flotilla.deploy.routing import choose_weighted
from flotilla.entrypoints.openai.cli_args import DEFAULT_MAX_BODY_BYTES
from flotilla.entrypoints.openai.errors import APIError, install_error_handlers
from flotilla.entrypoints.openai.listen import bind_socket
from flotilla.entrypoints.openai.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware

logger = logging.getLogger("flotilla.router")
FORWARDED_POSTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length"})


@dataclass(frozen=True)
class RouterConfig:
    """``backends``: model name -> base URL; ``routes``: alias -> {model name: weight}; ``repository``: base
    URL of the model repository's server, or None."""

    backends: dict[str, str]
    routes: dict[str, dict[str, float]] = field(default_factory=dict)
    seed: int | None = None
    api_key_env: str | None = None
    repository: str | None = None


def parse_router_config(data, source: str = "<router config>") -> RouterConfig:
    """Validate a router config mapping; ValueError naming ``source`` and the problem."""
    if not isinstance(data, dict) or set(data) - {"backends", "routes", "seed", "api_key_env", "repository"}:
        raise ValueError(f"{source}: expected a mapping with backends and optionally routes, seed, api_key_env, "
                         "repository")
    backends, routes, repository = data.get("backends") or {}, data.get("routes") or {}, data.get("repository")
    if repository is not None and not (isinstance(repository, str) and repository.startswith(("http://", "https://"))):
        raise ValueError(f"{source}: repository must be an http(s) URL")
    if not isinstance(backends, dict) or not (backends or repository) or not all(
            isinstance(k, str) and isinstance(v, str) and v.startswith(("http://", "https://"))
            for k, v in backends.items()):
        raise ValueError(f"{source}: backends must map model names to http(s) URLs (at least one, or a repository)")
    if not isinstance(routes, dict):
        raise ValueError(f"{source}: routes must map aliases to {{model: weight}}")
    for alias, weights in routes.items():
        if alias in backends or not isinstance(weights, dict) or not weights or set(weights) - set(backends):
            raise ValueError(f"{source}: route {alias!r} must be a new name with weights of known models")
        choose_weighted(weights, random.Random(0))   # ValueError for bad weights
    seed, key_env = data.get("seed"), data.get("api_key_env")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"{source}: seed must be an integer")
    if key_env is not None and not (isinstance(key_env, str) and key_env):
        raise ValueError(f"{source}: api_key_env must name an environment variable")
    return RouterConfig({k: v.rstrip("/") for k, v in backends.items()},
                        {a: dict(w) for a, w in routes.items()}, seed, key_env,
                        repository.rstrip("/") if repository else None)


class Router:
    """The routing and relaying behind the app (see the module contract)."""

    def __init__(self, config: RouterConfig, client: httpx.AsyncClient | None = None):
        self.config = config
        self.rng = random.Random(config.seed)
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
            limits=httpx.Limits(max_connections=4096, max_keepalive_connections=256))
        self.registry = CollectorRegistry()
        self.requests = Counter("flotilla_router_requests", "Requests relayed to a backend",
                                ["model", "target", "code"], registry=self.registry)

    def target(self, model: str | None, user: str | None) -> str:
        backends = self.config.backends
        if model is None:
            if len(backends) == 1:
                return next(iter(backends))
            raise APIError(400, f"the request must name a model (served: {', '.join(self.ids())})", "model")
        if model in backends:
            return model
        weights = self.config.routes.get(model)
        if weights is None:
            raise APIError(404, f"The model `{model}` does not exist.", "model")
        return choose_weighted(weights, self.rng, sticky_key=user)

    def ids(self) -> list[str]:
        return list(self.config.backends) + list(self.config.routes)

    async def generation(self, request: Request) -> Response:
        body = await request.body()
        try:
            doc = json.loads(body)
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = doc.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, f"model must be a string, got {type(model).__name__}", "model")
        user = doc.get("user") if isinstance(doc.get("user"), str) else None
        target = self.target(model, user)
        if model != target:
            body = json.dumps({**doc, "model": target}).encode()
        return await self.forward(request, target, body, model or target)

    async def forward(self, request: Request, target: str, body: bytes, model: str, base: str | None = None
                      ) -> Response:
        """Relay ``request`` to ``target``'s backend (or to ``base``, the repository's server)."""
        url = (base or self.config.backends[target]) + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        upstream = self.client.build_request(request.method, url, content=body, headers=headers)
        try:
            response = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as e:
            self.requests.labels(model, target, "503").inc()
            logger.warning("backend of %s unreachable: %s", target, e)
            raise APIError(503, f"the server of model {target!r} is unavailable; retry later",
                           headers={"Retry-After": "1"}) from None
        self.requests.labels(model, target, str(response.status_code)).inc()
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(_relay(response), status_code=response.status_code, headers=out_headers)

    async def cards(self, authorization: str | None) -> list[dict]:
        headers = {"authorization": authorization} if authorization else {}
        answers = await asyncio.gather(*(self._backend_cards(name, headers) for name in self.config.backends))
        found = {card["id"]: card for cards in answers for card in cards}
        out = [found[name] for name in self.config.backends if name in found]
        for alias, weights in self.config.routes.items():
            if all(t in found for t in weights):
                out.append({"id": alias, "object": "model", "created": min(found[t]["created"] for t in weights),
                            "owned_by": "flotilla", "root": None, "parent": None,
                            "max_model_len": min(found[t].get("max_model_len") or 0 for t in weights) or None,
                            "flotilla_route": dict(weights)})
        return out

    async def _backend_cards(self, name: str, headers: dict) -> list[dict]:
        try:
            r = await self.client.get(f"{self.config.backends[name]}/v1/models", headers=headers, timeout=10.0)
            r.raise_for_status()
            return [c for c in r.json().get("data", []) if isinstance(c, dict) and c.get("id") == name]
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            logger.warning("backend of %s did not list its model: %s", name, e)
            return []


async def _relay(response: httpx.Response):
    """The backend's body, chunk by chunk; closing it (the client left, or the stream ended) closes the
    backend request. A backend error propagates, so the client's response is cut, not ended cleanly."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


def build_router_app(config: RouterConfig, api_key: str | None = None,
                     max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, client: httpx.AsyncClient | None = None):
    """The router's ASGI app and its ``Router``."""
    router = Router(config, client)
    app = FastAPI(title="flotilla router")
    install_error_handlers(app)
    for path in FORWARDED_POSTS:
        app.add_api_route(path, router.generation, methods=["POST"])

    @app.api_route("/v2/models/{name}/{rest:path}", methods=["GET", "POST"])
    @app.api_route("/v2/models/{name}", methods=["GET"])
    async def kserve(request: Request, name: str, rest: str = "") -> Response:
        if name in config.backends:
            return await router.forward(request, name, await request.body(), name)
        if config.repository is None:
            raise APIError(404, f"Request for unknown model: '{name}' is not found")
        return await router.forward(request, "repository", await request.body(), name, base=config.repository)

    @app.api_route("/v2/repository/{rest:path}", methods=["GET", "POST"])
    async def repository(request: Request, rest: str) -> Response:
        if config.repository is None:
            raise APIError(404, "this deployment has no model repository")
        return await router.forward(request, "repository", await request.body(), "repository",
                                    base=config.repository)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await router.cards(request.headers.get("authorization"))})

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        for card in await router.cards(request.headers.get("authorization")):
            if card["id"] == model_id:
                return JSONResponse(card)
        raise APIError(404, f"The model `{model_id}` does not exist.", "model")

    for path in ("/health", "/v2/health/live", "/v2/health/ready"):
        app.add_api_route(path, _ok, methods=["GET"])

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.registry), media_type=CONTENT_TYPE_LATEST)

    asgi = BodySizeLimitMiddleware(app, max_body_bytes)
    return (ApiKeyMiddleware(asgi, api_key) if api_key else asgi), router


async def _ok() -> Response:
    return JSONResponse({"status": "ok"})


def load_router_config(path: str) -> RouterConfig:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the router config: {e}") from None
    return parse_router_config(data, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flotilla.entrypoints.router", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--shutdown-timeout", type=float, default=30.0)
    p.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    ns = p.parse_args(argv)
    logging.basicConfig(level=envs.log_level(), format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_router_config(ns.config)
        api_key = envs.named(config.api_key_env) if config.api_key_env else None
        if config.api_key_env and not api_key:
            raise ValueError(f"the environment variable {config.api_key_env} (api_key_env) is not set")
        sock = bind_socket(ns.host, ns.port)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    app, _ = build_router_app(config, api_key, ns.max_request_body_bytes)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=max(1, round(ns.shutdown_timeout))))
    print(f"flotilla router: {', '.join(config.backends)} on port {ns.port}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
