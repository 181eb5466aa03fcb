"""The v2 HTTP inference body, JSON and Triton's binary tensor extension: pure functions over bytes.

Request (``decode_infer_request``): the body is a JSON object, optionally followed by binary tensor data;
``Inference-Header-Content-Length`` gives the JSON part's length (without it the whole body is JSON, and no
input may be binary). Each input carries exactly one of ``data`` (flat or nested, see ``tensors``) or
``parameters.binary_data_size`` (its bytes follow the JSON, in input order). Outputs may ask for
``parameters.binary_data``; with no ``outputs`` every output is returned, binary when the request parameter
``binary_data_output`` is true. ``classification`` and the shared-memory parameters are refused
(UNSUPPORTED), as is any field the protocol does not define (INVALID_ARG naming it): nothing is accepted and
ignored.

Response (``encode_infer_response``): ``{"id"?, "model_name", "model_version", "parameters"?, "outputs"}``,
each output with ``data`` or ``parameters.binary_data_size``; the binary outputs' bytes follow the JSON and
the returned header length is then the JSON's length (else None: a plain JSON body). This is the format
``tritonclient.http.InferenceServerClient.parse_response_body`` reads.
"""

from __future__ import annotations

import json
from typing import Any

from flotilla.entrypoints.kserve import tensors
from flotilla.entrypoints.kserve.infer_call import InferCall, apply_parameters, unsupported
from flotilla.repository import dtypes
from flotilla.repository.errors import invalid_arg
from flotilla.repository.service import InferOutcome

INFER_HEADER = "Inference-Header-Content-Length"
_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})
_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def header_length(value: str | None, body_length: int) -> int | None:
    """The JSON part's length from the ``Inference-Header-Content-Length`` header (None when absent)."""
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        raise invalid_arg(f"Unable to parse {INFER_HEADER}, got: {value}") from None
    if length < 0 or length > body_length:
        raise invalid_arg(f"inference header size should be in range (0, {body_length}), got: {value}")
    if length == 0:
        raise unsupported(f"raw binary requests ({INFER_HEADER}: 0) are not supported; send the JSON inference "
                          f"header first")
    return length


def parse_json_object(data: bytes, what: str) -> dict:
    """A JSON object from ``data``; INVALID_ARG (Triton's wording) for anything else."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise invalid_arg(f"failed to parse the {what} JSON buffer: {e}") from None
    if not isinstance(doc, dict):
        raise invalid_arg(f"failed to parse the {what} JSON buffer: expected a JSON object, got "
                          f"{type(doc).__name__}")
    return doc


def _unknown_keys(entry: dict, allowed: frozenset, where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise invalid_arg(f"unexpected field '{unknown[0]}' in {where}; allowed: {', '.join(sorted(allowed))}")


def decode_infer_request(body: bytes, header: str | None, model: str) -> InferCall:
    """Decode an ``.../infer`` body (see the module contract); raises InferError."""
    json_end = header_length(header, len(body))
    doc = parse_json_object(body if json_end is None else body[:json_end], "request")
    _unknown_keys(doc, _REQUEST_KEYS, "the inference request")
    call = InferCall()
    if "id" in doc:
        if not isinstance(doc["id"], str):
            raise invalid_arg("Unable to parse 'id': expected a string")
        call.id = doc["id"]
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise invalid_arg("Unable to parse 'parameters': expected a JSON object")
    apply_parameters(call, params, protocol="http")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise invalid_arg("Unable to parse 'inputs': expected an array of input tensors")
    binary = memoryview(body)[json_end:] if json_end is not None else None
    offset = 0
    for entry in inputs:
        name, array, used = _decode_input(entry, binary, offset, model)
        if name in call.inputs:
            raise invalid_arg(f"input '{name}' already exists in request")
        call.inputs[name] = array
        offset += used
    if binary is not None and offset != len(binary):
        raise invalid_arg(f"the request body holds {len(binary) - offset} bytes after the binary data of its "
                          f"inputs (their binary_data_size values add up to {offset})")
    if "outputs" in doc:
        _decode_outputs(doc["outputs"], call)
    return call


def _decode_input(entry: Any, binary: memoryview | None, offset: int, model: str):
    """(name, array, binary bytes consumed) of one request input."""
    if not isinstance(entry, dict):
        raise invalid_arg("Unable to parse 'inputs': each input must be a JSON object")
    name = entry.get("name")
    if not isinstance(name, str):
        raise invalid_arg("Unable to parse 'name' of an input: expected a string")
    _unknown_keys(entry, _INPUT_KEYS, f"input '{name}'")
    datatype = entry.get("datatype")
    if not isinstance(datatype, str):
        raise invalid_arg(f"Unable to parse 'datatype' of input '{name}': expected a string")
    shape = tensors.check_shape(entry.get("shape"), name)
    params = entry.get("parameters", {})
    if not isinstance(params, dict):
        raise invalid_arg(f"Unable to parse 'parameters' of input '{name}': expected a JSON object")
    if any(k in params for k in _SHM_KEYS):
        raise unsupported(f"input '{name}': shared memory inputs are not supported by flotilla; send the data "
                          f"in the request")
    _unknown_keys(params, frozenset({"binary_data_size"}), f"the parameters of input '{name}'")
    has_data, has_binary = "data" in entry, "binary_data_size" in params
    if has_data == has_binary:
        which = "no field is set" if not has_data else "set 'data' 'binary_data_size'"
        raise invalid_arg(f"Input must set only one of the following fields: 'data', 'binary_data_size' in "
                          f"'parameters', 'shared_memory_region' in 'parameters'. But {which}")
    if has_data:
        values = tensors.flatten(entry["data"], name)
        return name, tensors.from_values(values, datatype, shape, name, model), 0
    size = params["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise invalid_arg(f"Unable to parse 'binary_data_size' of input '{name}': expected an integer >= 0")
    if binary is None:
        raise invalid_arg(f"must specify valid '{INFER_HEADER}' in request header and 'binary_data_size' when "
                          f"passing inputs in binary data format")
    chunk = binary[offset:offset + size]
    if len(chunk) < size:
        raise invalid_arg(f"unexpected size for input '{name}', expecting {size - len(chunk)} additional bytes "
                          f"for model '{model}'")
    return name, tensors.from_raw(chunk, datatype, shape, name, model), size


def _decode_outputs(outputs: Any, call: InferCall) -> None:
    if not isinstance(outputs, list):
        raise invalid_arg("Unable to parse 'outputs': expected an array of requested outputs")
    for entry in outputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise invalid_arg("Unable to parse 'outputs': each requested output must be a JSON object with a "
                              "string 'name'")
        name = entry["name"]
        _unknown_keys(entry, _OUTPUT_KEYS, f"requested output '{name}'")
        if name in call.binary:
            raise invalid_arg(f"output '{name}' is requested more than once")
        params = entry.get("parameters", {})
        if not isinstance(params, dict):
            raise invalid_arg(f"Unable to parse 'parameters' of output '{name}': expected a JSON object")
        if "classification" in params:
            raise unsupported(f"output '{name}': the classification extension is not supported by flotilla; "
                              f"request the tensor and take its top-k on the client")
        if any(k in params for k in _SHM_KEYS):
            raise unsupported(f"output '{name}': shared memory outputs are not supported by flotilla")
        _unknown_keys(params, frozenset({"binary_data"}), f"the parameters of output '{name}'")
        binary = params.get("binary_data", False)
        if not isinstance(binary, bool):
            raise invalid_arg(f"Unable to parse 'binary_data' of output '{name}': expected a boolean")
        call.binary[name] = binary
        call.outputs.append(name)


def response_parameter(value: Any) -> Any:
    """A response parameter as JSON carries it (bool, int, float, str; anything else as its string)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def encode_infer_response(call: InferCall, model_name: str, model_version: str,
                          outcome: InferOutcome) -> tuple[bytes, int | None]:
    """(body, JSON header length or None); see the module contract."""
    doc: dict[str, Any] = {}
    if call.id:
        doc["id"] = call.id
    doc["model_name"] = model_name
    doc["model_version"] = model_version
    if outcome.parameters:
        doc["parameters"] = {k: response_parameter(v) for k, v in outcome.parameters.items()}
    outputs, chunks = [], []
    for name, array in outcome.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": dtypes.from_numpy(array.dtype).v2_name,
                                 "shape": [int(d) for d in array.shape]}
        if call.binary.get(name, call.default_binary):
            raw = tensors.to_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            if raw:
                chunks.append(raw)
        else:
            entry["data"] = tensors.to_json_data(array, name)
        outputs.append(entry)
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if chunks:
        return header + b"".join(chunks), len(header)
    return header, None
