"""``inference.GRPCInferenceService`` (KServe v2 / Triton gRPC) on grpc.aio, with the stubs tritonclient ships.

Contracts:
- Thin: each RPC is one ``InferenceService`` / ``ServedModel`` call; messages come from ``grpc_codec`` and
  ``messages``. Errors end the RPC with the gRPC code of the ``InferError`` (INVALID_ARG -> INVALID_ARGUMENT,
  NOT_FOUND, UNAVAILABLE, UNSUPPORTED -> UNIMPLEMENTED, INTERNAL, ...) and Triton's message.
- ModelStreamInfer: requests are processed concurrently as they arrive (so the dynamic batcher can batch
  them); each gets its response(s) with its ``id``, a failed one a response with ``error_message`` (the stream
  goes on). Decoupled models (``model_transaction_policy.decoupled``: the LLMs) stream one response per
  ``ServedModel.generate`` chunk; every response carries ``triton_final_response`` and, when the request set
  ``triton_enable_empty_final_response``, an empty final response ends each generation. A client that goes
  away cancels its requests.
- Auth: with ``api_key`` every RPC but ServerLive / ServerReady needs ``authorization: Bearer <key>`` metadata
  (constant-time compare), else UNAUTHENTICATED.
- Lifecycle: ``GrpcServer.start()`` binds ``host:port`` on the running loop (OSError naming the address when it
  cannot), ``stop(grace)`` stops accepting and waits up to ``grace`` seconds for running RPCs. With a
  ``tracker`` (``in_flight``, ``draining``) inferences and repository changes count as in flight for the
  server's drain, and are refused (UNAVAILABLE, Triton's message) once draining starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
from typing import Any, AsyncIterator, Callable

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from flotilla.entrypoints.kserve import grpc_codec, messages
from flotilla.entrypoints.kserve.infer_call import (InferCall, generation_arguments, parse_version, run_infer,
                                                    to_infer_error, unsupported)
from flotilla.repository.config import ENSEMBLE_PLATFORM
from flotilla.repository.errors import InferError, invalid_arg
from flotilla.repository.service import InferenceService

logger = logging.getLogger(__name__)

GRPC_CODE = {
    "INVALID_ARG": grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED": grpc.StatusCode.UNIMPLEMENTED,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND, "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE, "INTERNAL": grpc.StatusCode.INTERNAL,
    "CANCELLED": grpc.StatusCode.CANCELLED,
}
SHUTTING_DOWN = "GRPC server is shutting down and has stopped accepting new requests."
PUBLIC_METHODS = frozenset({"ServerLive", "ServerReady"})
SERVICE_NAME = "inference.GRPCInferenceService"


def _rpc(fn):
    """End the RPC with the InferError's gRPC status when ``fn`` raises (see the module contract)."""
    @functools.wraps(fn)
    async def wrapped(self, request, context):
        try:
            return await fn(self, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every error becomes a status (INTERNAL is logged)
            err = to_infer_error(e)
        await context.abort(GRPC_CODE[err.code], err.message)
    return wrapped


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The RPC handlers over one ``InferenceService`` (see the module contract)."""

    def __init__(self, service: InferenceService, *, tracker=None, ready: Callable[[], bool] | None = None):
        self.service, self.tracker, self.extra_ready = service, tracker, ready

    @contextlib.contextmanager
    def _admitted(self):
        """Count one request in flight for the drain; UNAVAILABLE once the server drains."""
        if self.tracker is None:
            yield
            return
        if self.tracker.draining:
            raise InferError("UNAVAILABLE", SHUTTING_DOWN)
        self.tracker.in_flight += 1
        try:
            yield
        finally:
            self.tracker.in_flight -= 1

    # ---------------------------------------------------------------------------------------- health

    @_rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.service.live())

    @_rpc
    async def ServerReady(self, request, context):
        draining = self.tracker is not None and self.tracker.draining
        ready = not draining and self.service.ready() and (self.extra_ready is None or self.extra_ready())
        return pb.ServerReadyResponse(ready=ready)

    @_rpc
    async def ModelReady(self, request, context):
        version = parse_version(request.version)
        try:
            ready = self.service.model(request.name, version).ready()
        except InferError as e:
            if e.code not in ("NOT_FOUND", "UNAVAILABLE"):
                raise
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    # -------------------------------------------------------------------------------------- metadata

    @_rpc
    async def ServerMetadata(self, request, context):
        return messages.server_metadata_pb(self.service.server_metadata())

    @_rpc
    async def ModelMetadata(self, request, context):
        model = self.service.model(request.name, parse_version(request.version))
        return messages.model_metadata_pb(model.metadata())

    @_rpc
    async def ModelConfig(self, request, context):
        model = self.service.model(request.name, parse_version(request.version))
        return pb.ModelConfigResponse(config=model.config())

    @_rpc
    async def ModelStatistics(self, request, context):
        return messages.statistics_pb(messages.model_statistics(self.service, request.name, request.version))

    # ----------------------------------------------------------------------------------------- infer

    @_rpc
    async def ModelInfer(self, request, context):
        with self._admitted():
            call = grpc_codec.decode_infer_request(request)
            model, outcome = await run_infer(self.service, request.model_name, parse_version(request.model_version),
                                             call)
            return grpc_codec.encode_infer_response(call, model.name, model.version, outcome)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        responses: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def read_requests() -> None:
            async for request in request_iterator:
                task = asyncio.ensure_future(self._stream_one(request, responses))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)

        reader = asyncio.ensure_future(read_requests())
        reader.add_done_callback(lambda _: responses.put_nowait(None))
        try:
            while True:
                item = await responses.get()
                if item is None:
                    break
                yield item
            reader.result()     # a broken request stream ends the RPC with its error
        finally:
            for task in [reader, *tasks]:
                task.cancel()

    async def _stream_one(self, request, responses: asyncio.Queue) -> None:
        """Run one request of a stream; put its response(s), or one error response, on ``responses``."""
        call = InferCall(id=request.id)
        try:
            with self._admitted():
                call = grpc_codec.decode_infer_request(request)
                version = parse_version(request.model_version)
                model = self.service.model(request.model_name, version)
                config = model.config()
                if config.model_transaction_policy.decoupled:
                    if config.platform == ENSEMBLE_PLATFORM:      # an ensemble over an LLM: its responses
                        await self._stream_responses(model, call, responses)
                    else:
                        await self._generate(model, call, responses)
                    return
                model, outcome = await run_infer(self.service, request.model_name, version, call)
                outcome.parameters.setdefault("triton_final_response", True)
                response = grpc_codec.encode_infer_response(call, model.name, model.version, outcome)
                responses.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the error goes to the client in-stream
            err = to_infer_error(e)
            failed = pb.ModelInferResponse(id=request.id, model_name=request.model_name,
                                           model_version=request.model_version)
            failed.parameters["triton_final_response"].bool_param = True
            responses.put_nowait(pb.ModelStreamInferResponse(error_message=err.message, infer_response=failed))

    async def _stream_responses(self, model, call: InferCall, responses: asyncio.Queue) -> None:
        """A decoupled ensemble's responses (``infer_stream``), then the empty final one when asked for."""
        outcomes = model.infer_stream(call.inputs, requested_outputs=tuple(call.outputs), parameters=call.parameters,
                                      priority=call.priority, timeout_us=call.timeout_us)
        async for outcome in outcomes:
            outcome.parameters.setdefault("triton_final_response", False)
            response = grpc_codec.encode_infer_response(call, model.name, model.version, outcome)
            responses.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
        if call.empty_final_response:
            final = grpc_codec.generate_response(call, model.name, model.version, {}, final=True)
            responses.put_nowait(pb.ModelStreamInferResponse(infer_response=final))

    async def _generate(self, model, call: InferCall, responses: asyncio.Queue) -> None:
        text, params = generation_arguments(call.inputs, call.parameters)
        async for chunk in model.generate(text, params):
            response = grpc_codec.generate_response(call, model.name, model.version, chunk, final=False)
            responses.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
        if call.empty_final_response:
            final = grpc_codec.generate_response(call, model.name, model.version, {}, final=True)
            responses.put_nowait(pb.ModelStreamInferResponse(infer_response=final))

    # ------------------------------------------------------------------------------------ repository

    @_rpc
    async def RepositoryIndex(self, request, context):
        if request.repository_name:
            raise unsupported("'repository_name' specification is not supported")
        return messages.index_pb(self.service.index(ready_only=request.ready))

    @_rpc
    async def RepositoryModelLoad(self, request, context):
        if request.repository_name:
            raise unsupported("'repository_name' specification is not supported")
        config, files = None, {}
        for key, param in request.parameters.items():
            value = _repository_parameter(param)
            if key == "config" and isinstance(value, str):
                config = value
            elif key.startswith("file:") and isinstance(value, bytes):
                files[key] = value
            else:
                raise invalid_arg(f"unexpected load parameter '{key}'; expected 'config' (string_param) or "
                                  f"'file:<path>' (bytes_param)")
        with self._admitted():
            await self.service.load(request.model_name, config=config, files=files or None)
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request, context):
        if request.repository_name:
            raise unsupported("'repository_name' specification is not supported")
        dependents = False
        for key, param in request.parameters.items():
            value = _repository_parameter(param)
            if key != "unload_dependents" or not isinstance(value, bool):
                raise invalid_arg(f"unexpected unload parameter '{key}'; expected 'unload_dependents' (bool_param)")
            dependents = value
        with self._admitted():
            await self.service.unload(request.model_name, unload_dependents=dependents)
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------------------ extensions not offered

    async def _not_offered(self, request, context, what: str):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported by flotilla")

    async def SystemSharedMemoryStatus(self, request, context):
        await self._not_offered(request, context, "system shared memory")

    SystemSharedMemoryRegister = SystemSharedMemoryUnregister = SystemSharedMemoryStatus

    async def CudaSharedMemoryStatus(self, request, context):
        await self._not_offered(request, context, "CUDA shared memory")

    CudaSharedMemoryRegister = CudaSharedMemoryUnregister = CudaSharedMemoryStatus

    async def TraceSetting(self, request, context):
        await self._not_offered(request, context, "tracing (TraceSetting)")

    async def LogSettings(self, request, context):
        await self._not_offered(request, context, "changing log settings (LogSettings)")


def _repository_parameter(param) -> Any:
    which = param.WhichOneof("parameter_choice")
    if which is None:
        raise invalid_arg("a repository parameter has no value")
    return getattr(param, which)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless ``authorization: Bearer <key>`` (ServerLive / ServerReady are public)."""

    def __init__(self, api_key: str):
        self.expected = ("Bearer " + api_key).encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.rsplit("/", 1)[-1] in PUBLIC_METHODS:
            return handler
        given = next((v for k, v in (details.invocation_metadata or ()) if k.lower() == "authorization"), "")
        given = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given, self.expected):
            return handler
        return _deny(handler)


def _deny(handler):
    """A handler of the same kind as ``handler`` that ends the RPC with UNAUTHENTICATED."""
    message = "invalid or missing API key (authorization: Bearer <key>)"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(streaming if handler.response_streaming else unary,
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class GrpcServer:
    """The gRPC endpoint of ``flotilla serve`` (see the module contract)."""

    def __init__(self, service: InferenceService, host: str, port: int, *, api_key: str | None = None,
                 tracker=None, ready: Callable[[], bool] | None = None,
                 max_message_bytes: int = 32 * 1024 * 1024):
        self.service, self.host, self.port = service, host, port
        self.api_key, self.tracker, self.ready = api_key, tracker, ready
        self.max_message_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        interceptors = [ApiKeyInterceptor(self.api_key)] if self.api_key else []
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", 2**31 - 1), ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.service, tracker=self.tracker, ready=self.ready), server)
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {self.address} (gRPC): {e}") from None
        if bound == 0:
            raise OSError(f"cannot listen on {self.address} (gRPC): the address is in use or unavailable")
        await server.start()
        self._server = server
        logger.info("KServe v2 gRPC listening on %s", self.address)

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
