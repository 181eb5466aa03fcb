"""The KServe v2 / Open Inference Protocol REST routes (Triton's HTTP endpoint), as a FastAPI ``APIRouter``
mounted on the same app and port as the OpenAI routes.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{m}[/versions/{v}]`` (metadata),
``.../ready``, ``POST .../infer``, ``POST .../generate`` and ``.../generate_stream`` (Triton's generate
extension, SSE), ``GET .../config``, ``GET .../stats``, ``GET /v2/models/stats``, ``POST /v2/repository/index``,
``POST /v2/repository/models/{m}/load|unload``.

Contracts:
- Thin: every route translates the request into one ``InferenceService`` / ``ServedModel`` call and its
  result into Triton's JSON (``messages``, ``http_codec``); nothing here knows a model.
- Errors are Triton's ``{"error": "<message>"}`` with Triton's status for the ``InferError`` code (400
  INVALID_ARG, 404 NOT_FOUND, 501 UNSUPPORTED, 503 UNAVAILABLE, 500 INTERNAL without internals); health
  answers 200 or 400 with an empty body, model readiness 200 or 400 ``Model version not ready``.
- Bodies: JSON needs no Content-Type; ``Content-Encoding: gzip|deflate`` is inflated within the body limit
  (413 past it) and responses are compressed when ``Accept-Encoding`` asks; binary tensors per ``http_codec``.
- Statistics: a service with ``async refresh_statistics()`` (models served elsewhere, e.g. on Ray Serve) is
  asked to collect them before ``.../stats`` answers.
- ``tracker`` (``draining``: bool) makes infer and repository changes answer 503 while the server drains, and
  ``/v2/health/ready`` 400; ``ready`` adds a condition of the rest of the server (e.g. its LLM engines).
- A client that disconnects during an inference cancels it: a queued request leaves the batcher's queue, an
  LLM generation is aborted in the engine.
"""

from __future__ import annotations

import base64
import binascii
import functools
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from flotilla.entrypoints.kserve import compression, http_codec, messages
from flotilla.entrypoints.kserve.infer_call import (generate_request_arguments, parse_version, run_infer,
                                                    to_infer_error)
from flotilla.entrypoints.openai.cancellation import Disconnected, run_unless_disconnected
from flotilla.entrypoints.openai.errors import PayloadTooLarge
from flotilla.entrypoints.openai.sse import SSEResponse, sse_data
from flotilla.repository.errors import InferError, invalid_arg
from flotilla.repository.service import InferenceService

JSON_TYPE = "application/json"
SHUTTING_DOWN = "the server is shutting down and admits no new requests"
NOT_READY = "Model version not ready"
CLIENT_CLOSED_REQUEST = 499   # nginx's status for a client that left; nobody reads it


def triton_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _errors_as_triton_json(handler):
    """Answer any exception of ``handler`` as Triton's error JSON (see the module contract)."""
    @functools.wraps(handler)
    async def wrapped(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except (PayloadTooLarge, compression.InflatedTooLarge) as e:
            return triton_error(413, str(e))
        except Exception as e:   # noqa: BLE001 - every error becomes Triton's JSON (INTERNAL is logged)
            err = to_infer_error(e)
            headers = {"Accept-Encoding": "gzip, deflate"} if "compression type" in err.message else None
            return triton_error(err.http_status, err.message, headers)
    return wrapped


class KServeHttp:
    """The route handlers over one ``InferenceService`` (see the module contract)."""

    def __init__(self, service: InferenceService, *, tracker=None, ready: Callable[[], bool] | None = None,
                 max_body_bytes: int = 32 * 1024 * 1024):
        self.service, self.tracker, self.extra_ready = service, tracker, ready
        self.max_body_bytes = max_body_bytes

    @property
    def draining(self) -> bool:
        return bool(self.tracker is not None and self.tracker.draining)

    def _admit(self) -> None:
        if self.draining:
            raise InferError("UNAVAILABLE", SHUTTING_DOWN)

    async def _body(self, request: Request) -> bytes:
        body = await request.body()
        return compression.decompress(body, request.headers.get("content-encoding"), self.max_body_bytes)

    async def _json_body(self, request: Request, what: str) -> dict:
        body = await self._body(request)
        return http_codec.parse_json_object(body, what) if body.strip() else {}

    # ------------------------------------------------------------------------------------------ server

    async def server_metadata(self) -> Response:
        return JSONResponse(self.service.server_metadata())

    async def live(self) -> Response:
        return Response(status_code=200 if self.service.live() else 400)

    async def ready(self) -> Response:
        ok = not self.draining and self.service.ready() and (self.extra_ready is None or self.extra_ready())
        return Response(status_code=200 if ok else 400)

    # ------------------------------------------------------------------------------------------ models

    async def model_metadata(self, model: str, version: str | None) -> Response:
        served = self.service.model(model, parse_version(version))
        return JSONResponse(messages.model_metadata_json(served.metadata()))

    async def model_ready(self, model: str, version: str | None) -> Response:
        version = parse_version(version)
        try:
            ready = self.service.model(model, version).ready()
        except InferError as e:
            if e.code not in ("NOT_FOUND", "UNAVAILABLE"):
                raise
            ready = False
        return Response(status_code=200) if ready else triton_error(400, NOT_READY)

    async def model_config(self, model: str, version: str | None) -> Response:
        served = self.service.model(model, parse_version(version))
        return JSONResponse(messages.config_json(served.config()))

    async def model_stats(self, model: str, version: str | None) -> Response:
        await self._fresh_statistics()
        return JSONResponse({"model_stats": messages.model_statistics(self.service, model, version)})

    async def all_stats(self) -> Response:
        await self._fresh_statistics()
        return JSONResponse({"model_stats": messages.model_statistics(self.service)})

    async def _fresh_statistics(self) -> None:
        """A service whose models run elsewhere (on Ray Serve) collects their statistics first."""
        refresh = getattr(self.service, "refresh_statistics", None)
        if refresh is not None:
            await refresh()

    async def infer(self, request: Request, model: str, version: str | None) -> Response:
        self._admit()
        version = parse_version(version)
        body = await self._body(request)
        call = http_codec.decode_infer_request(body, request.headers.get(http_codec.INFER_HEADER), model)
        done = await run_unless_disconnected(request.receive, run_infer(self.service, model, version, call))
        if done is Disconnected:        # the client left: the request was cancelled (dequeued / aborted)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        served, outcome = done
        payload, header_length = http_codec.encode_infer_response(call, served.name, served.version, outcome)
        headers = {"Content-Type": JSON_TYPE}
        if header_length is not None:
            headers = {"Content-Type": "application/octet-stream",
                       http_codec.INFER_HEADER: str(header_length)}
        encoding = compression.response_encoding(request.headers.get("accept-encoding"))
        if encoding is not None:
            payload = compression.compress(payload, encoding)
            headers["Content-Encoding"] = encoding
        return Response(payload, headers=headers)

    async def generate(self, request: Request, model: str, version: str | None, stream: bool = False) -> Response:
        """Triton's generate extension: one JSON response, or (``stream``) server-sent events, one per chunk
        of ``ServedModel.generate``; an error after the stream started is a ``data: {"error": ...}`` event."""
        self._admit()
        doc = await self._json_body(request, "generate")
        text, params = generate_request_arguments(doc)
        served = self.service.model(model, parse_version(version))
        request_id = doc.get("id")
        head = {"id": request_id} if isinstance(request_id, str) and request_id else {}
        if not stream:
            if params.get("stream"):
                raise invalid_arg("'stream' needs the generate_stream endpoint")
            done = await run_unless_disconnected(request.receive, _collect(served.generate(text, params)))
            if done is Disconnected:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            return JSONResponse({**head, **_merged(done, served)})
        chunks = served.generate(text, params)

        async def events():
            try:
                async for chunk in chunks:
                    yield sse_data({**head, "model_name": served.name, "model_version": served.version, **chunk})
            except Exception as e:  # noqa: BLE001 - the stream has started: the error is an event
                yield sse_data({"error": to_infer_error(e).message})
        return SSEResponse(events(), on_close=chunks.aclose)

    # -------------------------------------------------------------------------------------- repository

    async def repository_index(self, request: Request) -> Response:
        doc = await self._json_body(request, "registry index")
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise invalid_arg("Invalid value for 'ready': expected a boolean")
        return JSONResponse(messages.index_json(self.service.index(ready_only=ready)))

    async def load(self, request: Request, model: str) -> Response:
        self._admit()
        doc = await self._json_body(request, "load model")
        config, files = load_parameters(doc.get("parameters", {}))
        await self.service.load(model, config=config, files=files or None)
        return Response(status_code=200)

    async def unload(self, request: Request, model: str) -> Response:
        self._admit()
        doc = await self._json_body(request, "unload model")
        params = doc.get("parameters", {})
        if not isinstance(params, dict):
            raise invalid_arg("Unable to parse 'parameters': expected a JSON object")
        dependents = params.get("unload_dependents", False)
        if not isinstance(dependents, bool):
            raise invalid_arg("Unable to parse 'unload_dependents': expected a boolean")
        unknown = sorted(set(params) - {"unload_dependents"})
        if unknown:
            raise invalid_arg(f"unexpected unload parameter '{unknown[0]}'; expected 'unload_dependents'")
        await self.service.unload(model, unload_dependents=dependents)
        return Response(status_code=200)


async def _collect(chunks) -> list[dict]:
    return [chunk async for chunk in chunks]


def _merged(chunks: list[dict], served) -> dict:
    """One generate response from a generation's chunks: their ``text_output`` joined, other values the last."""
    out: dict[str, Any] = {"model_name": served.name, "model_version": served.version}
    text = []
    for chunk in chunks:
        for key, value in chunk.items():
            if key == "text_output":
                text.append(value)
            else:
                out[key] = value
    if text:
        out["text_output"] = "".join(text)
    return out


def load_parameters(params: Any) -> tuple[str | None, dict[str, bytes]]:
    """(config JSON, {"file:<path>": content}) of a load request's parameters (file contents base64)."""
    if not isinstance(params, dict):
        raise invalid_arg("Unable to parse 'parameters': expected a JSON object")
    config, files = None, {}
    for key, value in params.items():
        if not isinstance(value, str):
            raise invalid_arg(f"Unable to parse '{key}': expected a string")
        if key == "config":
            config = value
        elif key.startswith("file:"):
            try:
                files[key] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise invalid_arg(f"Unable to decode base64 content of '{key}'") from None
        else:
            raise invalid_arg(f"unexpected load parameter '{key}'; expected 'config' or 'file:<path>'")
    return config, files


def kserve_router(service: InferenceService, *, tracker=None, ready: Callable[[], bool] | None = None,
                  max_body_bytes: int = 32 * 1024 * 1024) -> APIRouter:
    """The v2 routes over ``service`` (see the module contract)."""
    h = KServeHttp(service, tracker=tracker, ready=ready, max_body_bytes=max_body_bytes)
    router = APIRouter()
    add = router.add_api_route

    def route(path: str, fn, method: str = "GET") -> None:
        add(path, _errors_as_triton_json(fn), methods=[method], include_in_schema=False)

    route("/v2", h.server_metadata)
    route("/v2/health/live", h.live)
    route("/v2/health/ready", h.ready)
    route("/v2/models/stats", h.all_stats)
    for suffix, with_version in (("", False), ("/versions/{version}", True)):
        base = "/v2/models/{model}" + suffix
        route(base, _versioned(h.model_metadata, with_version))
        route(base + "/ready", _versioned(h.model_ready, with_version))
        route(base + "/config", _versioned(h.model_config, with_version))
        route(base + "/stats", _versioned(h.model_stats, with_version))
        route(base + "/infer", _versioned(h.infer, with_version, takes_request=True), "POST")
        route(base + "/generate", _versioned(h.generate, with_version, takes_request=True), "POST")
        route(base + "/generate_stream", _versioned(functools.partial(h.generate, stream=True), with_version,
                                                    takes_request=True), "POST")
    route("/v2/repository/index", h.repository_index, "POST")
    route("/v2/repository/models/{model}/load", h.load, "POST")
    route("/v2/repository/models/{model}/unload", h.unload, "POST")
    return router


def _versioned(fn, with_version: bool, takes_request: bool = False):
    """A FastAPI endpoint calling ``fn(model, version)`` (``version`` from the path, digits only, or None)."""
    if takes_request and with_version:
        async def endpoint(request: Request, model: str, version: str):
            return await fn(request, model, _digits(version))
    elif takes_request:
        async def endpoint(request: Request, model: str):
            return await fn(request, model, None)
    elif with_version:
        async def endpoint(model: str, version: str):
            return await fn(model, _digits(version))
    else:
        async def endpoint(model: str):
            return await fn(model, None)
    return endpoint


def _digits(version: str) -> str:
    """Triton's routes only match numeric versions; anything else is its 404 ``Not Found``."""
    if not version.isdigit():
        raise InferError("NOT_FOUND", "Not Found")
    return version
