"""What HTTP and gRPC share: a decoded inference request (``InferCall``), Triton's reserved request parameters,
version strings, error conversion, and the call into the ``InferenceService``.

Contracts:
- ``InferCall`` is protocol-independent: checked input arrays, the requested output names in request order
  (empty: every output), the request parameters the model receives (reserved ones removed), ``priority`` and
  ``timeout_us`` for the dynamic batcher; ``binary`` / ``default_binary`` are the HTTP output encodings and
  ``empty_final_response`` the gRPC stream's ``triton_enable_empty_final_response``.
- ``apply_parameters`` implements Triton's reserved keys: ``priority`` and ``timeout`` (integers >= 0),
  ``binary_data_output`` (HTTP, bool), ``triton_*`` refused (gRPC allows ``triton_enable_empty_final_response``),
  and the sequence keys (``sequence_id`` / ``sequence_start`` / ``sequence_end``) refused with INVALID_ARG
  because flotilla runs no stateful (sequence-batched) models: they are never accepted and ignored.
  Other parameters must be bool, int, float or string and go to the model.
- ``to_infer_error`` turns any exception raised below into ``InferError`` (an unexpected one becomes INTERNAL
  with a generic message, logged with its stack trace, never sent to the client).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from flotilla.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from flotilla.repository.errors import InferError, ModelConfigError, ModelControlError, invalid_arg
from flotilla.repository.service import InferenceService, InferOutcome, ServedModel

logger = logging.getLogger(__name__)

SEQUENCE_KEYS = ("sequence_id", "sequence_start", "sequence_end")
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"
GRPC_TRITON_KEYS = (EMPTY_FINAL_RESPONSE,)
TEXT_INPUT = "text_input"   # the prompt input of LLMs (Triton's vLLM backend convention)


@dataclass
class InferCall:
    """One decoded inference request (see the module contract)."""
    id: str = ""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    timeout_us: int = 0
    binary: dict[str, bool] = field(default_factory=dict)
    default_binary: bool = False
    empty_final_response: bool = False


def unsupported(message: str) -> InferError:
    """Triton's UNSUPPORTED (HTTP 501, gRPC UNIMPLEMENTED): a protocol feature flotilla does not run."""
    return InferError("UNSUPPORTED", message)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def apply_parameters(call: InferCall, params: Mapping[str, Any], *, protocol: str) -> None:
    """Apply a request's ``parameters`` (plain Python values) to ``call``; ``protocol`` "http" or "grpc"."""
    for key, value in params.items():
        if key in SEQUENCE_KEYS:
            if value in (0, "", False):
                continue
            raise invalid_arg(f"parameter '{key}' is for stateful models (sequence batching), which flotilla "
                              f"does not run; remove {', '.join(SEQUENCE_KEYS)} from the request")
        if key in ("priority", "timeout"):
            if not _is_uint(value):
                raise invalid_arg(f"Unable to parse '{key}': expected an integer >= 0, got {value!r}")
            if key == "priority":
                call.priority = value
            else:
                call.timeout_us = value
        elif key == "binary_data_output" and protocol == "http":
            if not isinstance(value, bool):
                raise invalid_arg(f"Unable to parse 'binary_data_output': expected a boolean, got {value!r}")
            call.default_binary = value
        elif key.startswith("triton_"):
            _triton_parameter(call, key, value, protocol)
        elif isinstance(value, (bool, int, float, str)):
            call.parameters[key] = value
        else:
            raise invalid_arg(f"parameter '{key}' has invalid type. It should be either 'int', 'bool', or "
                              f"'string'.")


def _triton_parameter(call: InferCall, key: str, value: Any, protocol: str) -> None:
    if protocol == "grpc" and key in GRPC_TRITON_KEYS:
        if not isinstance(value, bool):
            raise invalid_arg(f"invalid value type for '{key}' parameter, expected bool_param.")
        call.empty_final_response = value
        return
    if protocol == "grpc":
        raise invalid_arg("parameter keys starting with 'triton_' are reserved for Triton usage. Only the "
                          "following keys starting with 'triton_' are allowed: " + " ".join(GRPC_TRITON_KEYS))
    raise invalid_arg("parameter keys starting with 'triton_' are reserved for Triton usage and should not be "
                      "specified.")


def generation_arguments(inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any]) -> tuple[str, dict]:
    """(prompt, parameters) of a request to an LLM: ``text_input`` holds one string; every other input one
    value; ``sampling_parameters`` (a JSON object string) is merged in. INVALID_ARG otherwise."""
    params = dict(parameters)
    text = inputs.get(TEXT_INPUT)
    if text is None or text.dtype != np.object_ or text.size != 1:
        raise invalid_arg(f"a generation request needs the input '{TEXT_INPUT}': one BYTES element (the prompt)")
    for name, array in inputs.items():
        if name == TEXT_INPUT:
            continue
        if array.size != 1:
            raise invalid_arg(f"input '{name}' of a generation request must hold one value, got shape "
                              f"{list(array.shape)}")
        value = array.reshape(-1)[0]
        value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value.item()
        if name == "sampling_parameters":
            params.update(sampling_parameters(value))
        else:
            params[name] = value
    return text.reshape(-1)[0].decode("utf-8", "replace"), params


def sampling_parameters(value: Any) -> dict:
    """The object of a ``sampling_parameters`` JSON string (Triton's vLLM backend); INVALID_ARG otherwise."""
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except ValueError as e:
        raise invalid_arg(f"input 'sampling_parameters' is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise invalid_arg("input 'sampling_parameters' must be a JSON object string")
    return parsed


def generate_request_arguments(doc: Mapping[str, Any]) -> tuple[str | None, dict]:
    """(prompt, parameters) of Triton's generate extension body: ``text_input`` (a string; None when absent:
    an ensemble may take other inputs, an LLM refuses it), ``parameters`` (an object) and every other key as a
    parameter (``sampling_parameters``, a JSON string, merged in); ``id`` is the request's. INVALID_ARG
    otherwise."""
    text = doc.get(TEXT_INPUT)
    if text is not None and not isinstance(text, str):
        raise invalid_arg(f"'{TEXT_INPUT}' of a generate request must be a string (the prompt)")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise invalid_arg("Unable to parse 'parameters': expected a JSON object")
    params = dict(params)
    for key, value in doc.items():
        if key in (TEXT_INPUT, "parameters", "id"):
            continue
        if key == "sampling_parameters":
            params.update(sampling_parameters(value))
        else:
            params[key] = value
    return text, params


def parse_version(version: str | int | None) -> str | None:
    """A request's model version: None for "" (the version policy picks), else the decimal string.
    INVALID_ARG with Triton's messages for a non-integer or negative version."""
    if version is None or version == "":
        return None
    text = str(version)
    try:
        number = int(text)
    except ValueError:
        raise invalid_arg(f"failed to get model version from specified version string '{text}' (details: "
                          f"stol), version should be an integral value > 0") from None
    if number < 0:
        raise invalid_arg(f"invalid model version specified '{text}' , version should be an integral value > 0")
    return str(number)


def to_infer_error(exc: BaseException) -> InferError:
    """The InferError an exception raised while serving a v2 request stands for (see the module contract)."""
    if isinstance(exc, InferError):
        return exc
    if isinstance(exc, ModelControlError):
        code = exc.code if exc.code in ("INVALID_ARG", "UNSUPPORTED", "NOT_FOUND", "ALREADY_EXISTS",
                                        "UNAVAILABLE", "INTERNAL", "CANCELLED") else "INTERNAL"
        return InferError(code, exc.message)
    if isinstance(exc, InvalidRequestError):
        return InferError("INVALID_ARG", exc.message)
    if isinstance(exc, (ModelConfigError, ModelLoadError)):
        return InferError("INVALID_ARG", str(exc))
    if isinstance(exc, ModelNotFoundError):
        return InferError("NOT_FOUND", str(exc))
    logger.error("unexpected error while serving a KServe v2 request", exc_info=exc)
    return InferError("INTERNAL", "internal server error")


async def run_infer(service: InferenceService, model_name: str, version: str | None,
                    call: InferCall) -> tuple[ServedModel, InferOutcome]:
    """Run ``call`` on the model version; the outcome's outputs in the requested order (all: model order).
    Raises InferError (INTERNAL when the model did not return a requested output)."""
    model = service.model(model_name, version)
    outcome = await model.infer(call.inputs, requested_outputs=tuple(call.outputs), parameters=call.parameters,
                                priority=call.priority, timeout_us=call.timeout_us)
    if call.outputs:
        missing = [n for n in call.outputs if n not in outcome.outputs]
        if missing:
            raise InferError("INTERNAL", f"model '{model_name}' did not produce the requested output "
                                         f"'{missing[0]}'")
        outcome = InferOutcome({n: outcome.outputs[n] for n in call.outputs}, outcome.parameters)
    return model, outcome
