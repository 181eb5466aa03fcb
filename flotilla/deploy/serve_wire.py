"""The Ray Serve ingress <-> model replica messages: ``WireStruct``s as bytes (``flotilla.wire``), never pickle.

``ModelServer.generate`` takes the bytes of a ``GenerateRequest`` and yields the bytes of frames
(``ReplicaFrame``): first one ``Accepted`` (which replica took the request), then one ``GenerateOutput`` per
``RequestOutput`` of the replica's engine, or a ``GenerateFailure`` (the replica's engine died) as the last
frame. ``RemoteEngine`` (the ingress side) encodes the request and decodes the frames. They carry the engine's
own types (``SamplingParams``, ``CompletionOutput``, ``Logprob``), validated on decode; a malformed message
raises ``WireError``.
"""

from __future__ import annotations

from flotilla.engine.output_processor import OutputKind
from flotilla.outputs import CompletionOutput, Logprob, RequestOutput
from flotilla.sampling_params import SamplingParams
from flotilla.wire import Codec, WireError, WireStruct


class GenerateRequest(WireStruct):
    """Ingress -> replica: one request, tokenized and validated by the ingress.

    ``request_id``: the engine request id; ``prompt``: the prompt text when there was one (echoed in the
    outputs), else None; ``prompt_token_ids``: the prompt the engine runs (and the prefix the request router
    matches); ``sampling_params``: how to decode; ``output_kind``: deltas (the default), cumulative outputs
    or the final output only; ``cache_salt``: the request's prefix-cache salt (None: unsalted);
    ``priority``: the engine request's scheduling priority (lower is served earlier); ``exclude_replicas``:
    replica ids this request must not be routed to (those it already failed on; the request router honours it,
    waiting for another replica rather than using one of them).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    output_kind: OutputKind = OutputKind.DELTA
    cache_salt: str | None = None
    exclude_replicas: list[str] = []
    priority: int = 0


class Accepted(WireStruct, tag="accepted"):
    """Replica -> ingress, the first frame of every ``generate`` stream: ``replica_id`` (Serve's unique id of
    the replica) took the request."""

    replica_id: str


class GenerateOutput(WireStruct, tag="output"):
    """Replica -> ingress: one ``RequestOutput`` without what the ingress already has (id and prompt).

    ``outputs``: the samples that changed (deltas) or all of them, as ``RequestOutput.outputs``;
    ``finished``: every sample is done; ``num_cached_tokens``: prompt tokens served from the prefix cache;
    ``metrics``: the replica's ``time.monotonic()`` stamps (``arrival_time``, ``first_scheduled_time``,
    ``first_token_time``; None until they happen); ``prompt_logprobs``: ``RequestOutput.prompt_logprobs``.
    """

    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int
    metrics: dict[str, float | None]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class GenerateFailure(WireStruct, tag="failure"):
    """Replica -> ingress, the last frame of a stream the replica could not complete.

    ``kind``: ``ENGINE_DEAD`` (the replica's engine died: the replica leaves routing and exits);
    ``message``: plain words fit for a client (no stack, no Ray internals); ``replica_id``: the replica that
    failed; ``started``: outputs of the request had already been sent (so re-running it elsewhere would
    repeat them).
    """

    kind: str
    message: str
    replica_id: str
    started: bool


ENGINE_DEAD = "engine_dead"
ReplicaFrame = Accepted | GenerateOutput | GenerateFailure

GENERATE_REQUEST: Codec[GenerateRequest] = Codec(GenerateRequest, "Ray Serve generate request")
GENERATE_OUTPUT: Codec[GenerateOutput] = Codec(GenerateOutput, "Ray Serve generate output")
REPLICA_FRAME: Codec[ReplicaFrame] = Codec(ReplicaFrame, "Ray Serve generate frame")


def encode_output(out: RequestOutput) -> bytes:
    return GENERATE_OUTPUT.encode(GenerateOutput(out.outputs, out.finished, out.num_cached_tokens, out.metrics,
                                                 out.prompt_logprobs))


def encode_frame(frame: Accepted | GenerateFailure) -> bytes:
    return REPLICA_FRAME.encode(frame)


def decode_frame(data: bytes, request: GenerateRequest) -> RequestOutput | Accepted | GenerateFailure:
    """One frame of ``request``'s stream: its ``RequestOutput`` (for a ``GenerateOutput``), or the
    ``Accepted`` / ``GenerateFailure`` itself."""
    frame = REPLICA_FRAME.decode(data)
    if isinstance(frame, GenerateOutput):
        return _request_output(frame, request)
    return frame


def decode_output(data: bytes, request: GenerateRequest) -> RequestOutput:
    """The ``RequestOutput`` of ``request`` that ``data`` (a ``GenerateOutput``) describes."""
    return _request_output(GENERATE_OUTPUT.decode(data), request)


def _request_output(out: GenerateOutput, request: GenerateRequest) -> RequestOutput:
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, out.outputs, out.finished,
                         num_cached_tokens=out.num_cached_tokens, metrics=out.metrics,
                         prompt_logprobs=out.prompt_logprobs)


def request_of(data) -> GenerateRequest | None:
    """The ``GenerateRequest`` encoded in ``data``; None for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None
    try:
        return GENERATE_REQUEST.decode(data)
    except WireError:
        return None


def prompt_token_ids_of(data) -> list[int] | None:
    """The prompt token ids of an encoded ``GenerateRequest``; None for anything else (the router then
    routes without a prefix)."""
    request = request_of(data)
    return None if request is None else request.prompt_token_ids
