"""The Ray Serve ingress <-> model replica messages: ``WireStruct``s as bytes (``flotilla.wire``), never pickle.

``ModelServer.generate`` takes the bytes of a ``GenerateRequest`` and yields the bytes of one
``GenerateOutput`` per ``RequestOutput`` of the replica's engine; ``RemoteEngine`` (the ingress side) encodes
the one and decodes the others. They carry the engine's own types (``SamplingParams``, ``CompletionOutput``,
``Logprob``), validated on decode; a malformed message raises ``WireError``.
"""

from __future__ import annotations

from flotilla.engine.output_processor import OutputKind
from flotilla.outputs import CompletionOutput, RequestOutput
from flotilla.sampling_params import SamplingParams
from flotilla.wire import Codec, WireError, WireStruct


class GenerateRequest(WireStruct):
    """Ingress -> replica: one request, tokenized and validated by the ingress.

    ``request_id``: the engine request id; ``prompt``: the prompt text when there was one (echoed in the
    outputs), else None; ``prompt_token_ids``: the prompt the engine runs (and the prefix the request router
    matches); ``sampling_params``: how to decode; ``output_kind``: deltas (the default), cumulative outputs
    or the final output only; ``cache_salt``: the request's prefix-cache salt (None: unsalted).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    output_kind: OutputKind = OutputKind.DELTA
    cache_salt: str | None = None


class GenerateOutput(WireStruct):
    """Replica -> ingress: one ``RequestOutput`` without what the ingress already has (id and prompt).

    ``outputs``: the samples that changed (deltas) or all of them, as ``RequestOutput.outputs``;
    ``finished``: every sample is done; ``num_cached_tokens``: prompt tokens served from the prefix cache;
    ``metrics``: the replica's ``time.monotonic()`` stamps (``arrival_time``, ``first_scheduled_time``,
    ``first_token_time``; None until they happen).
    """

    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int
    metrics: dict[str, float | None]


GENERATE_REQUEST: Codec[GenerateRequest] = Codec(GenerateRequest, "Ray Serve generate request")
GENERATE_OUTPUT: Codec[GenerateOutput] = Codec(GenerateOutput, "Ray Serve generate output")


def encode_output(out: RequestOutput) -> bytes:
    return GENERATE_OUTPUT.encode(GenerateOutput(out.outputs, out.finished, out.num_cached_tokens, out.metrics))


def decode_output(data: bytes, request: GenerateRequest) -> RequestOutput:
    """The ``RequestOutput`` of ``request`` that ``data`` (a ``GenerateOutput``) describes."""
    out = GENERATE_OUTPUT.decode(data)
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, out.outputs, out.finished,
                         num_cached_tokens=out.num_cached_tokens, metrics=out.metrics)


def prompt_token_ids_of(data) -> list[int] | None:
    """The prompt token ids of an encoded ``GenerateRequest``; None for anything else (the router then
    routes without a prefix)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None
    try:
        return GENERATE_REQUEST.decode(data).prompt_token_ids
    except WireError:
        return None
