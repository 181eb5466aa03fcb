"""``inference.ModelInferRequest`` <-> ``InferCall`` and outcomes -> ``ModelInferResponse``, as Triton does it.

Request: each input's data comes from its typed ``contents`` (``bool_contents`` for BOOL, ``int_contents``
for INT8/16/32, ``int64_contents``, ``uint_contents`` for UINT8/16/32, ``uint64_contents``, ``fp32_contents``,
``fp64_contents``, ``bytes_contents``; FP16 and BF16 have none) or, in input order, from
``raw_input_contents`` (then no input may carry ``contents``). Parameters are ``InferParameter`` values.
Errors are InferError with Triton's messages (``unexpected explicit tensor data ...``, ``contents field must
not be specified when using raw_input_contents ...``, ``unable to find data for input tensor ...``).

Response: every output's metadata in ``outputs`` and its bytes in ``raw_output_contents`` (same order),
response parameters as ``InferParameter`` values.

Generation (decoupled models: LLMs through ``ServedModel.generate``, arguments from
``infer_call.generation_arguments``): ``generate_response`` turns one yielded dict into a response whose
outputs are its values (``text_output`` a BYTES tensor of shape [1]).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from flotilla.entrypoints.kserve import tensors
from flotilla.entrypoints.kserve.infer_call import InferCall, apply_parameters, unsupported
from flotilla.repository import dtypes
from flotilla.repository.errors import invalid_arg
from flotilla.repository.service import InferOutcome

# contents field -> the v2 datatypes it may carry
_CONTENTS = {
    "bool_contents": ("BOOL",), "int_contents": ("INT8", "INT16", "INT32"), "int64_contents": ("INT64",),
    "uint_contents": ("UINT8", "UINT16", "UINT32"), "uint64_contents": ("UINT64",),
    "fp32_contents": ("FP32",), "fp64_contents": ("FP64",), "bytes_contents": ("BYTES",),
}
_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
# keys of a generate() chunk that describe the response, not outputs
_RESPONSE_KEYS = frozenset({"model_name", "model_version", "id"})


def parameter_value(param: pb.InferParameter) -> Any:
    which = param.WhichOneof("parameter_choice")
    if which is None:
        raise invalid_arg("a request parameter has no value (set bool_param, int64_param, uint64_param, "
                          "double_param or string_param)")
    return getattr(param, which)


def set_parameter(target: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def decode_infer_request(request: pb.ModelInferRequest) -> InferCall:
    """Decode a ModelInferRequest (see the module contract); raises InferError."""
    model = request.model_name
    call = InferCall(id=request.id)
    apply_parameters(call, {k: parameter_value(v) for k, v in request.parameters.items()}, protocol="grpc")
    raw = list(request.raw_input_contents)
    raw_index = 0
    for tensor in request.inputs:
        name = tensor.name
        if any(k in tensor.parameters for k in _SHM_KEYS):
            raise unsupported(f"input '{name}': shared memory inputs are not supported by flotilla")
        if tensor.parameters:
            raise invalid_arg(f"unexpected parameter '{next(iter(tensor.parameters))}' for input '{name}'")
        if name in call.inputs:
            raise invalid_arg(f"input '{name}' already exists in request")
        shape = tensors.check_shape(list(tensor.shape), name)
        if tensor.HasField("contents"):
            if raw:
                raise invalid_arg(f"contents field must not be specified when using raw_input_contents for "
                                  f"'{name}' for model '{model}'")
            call.inputs[name] = _from_contents(tensor, shape, model)
        elif raw_index < len(raw):
            call.inputs[name] = tensors.from_raw(raw[raw_index], tensor.datatype, shape, name, model)
            raw_index += 1
        else:
            raise invalid_arg(f"unable to find data for input tensor '{name}' for model '{model}' in request.")
    if raw_index != len(raw):
        raise invalid_arg(f"the request has {len(raw)} raw_input_contents but {raw_index} inputs without "
                          f"contents for model '{model}'")
    for output in request.outputs:
        if output.parameters:
            key = next(iter(output.parameters))
            if key == "classification":
                raise unsupported(f"output '{output.name}': the classification extension is not "
                                            f"supported by flotilla")
            raise invalid_arg(f"unexpected parameter '{key}' for requested output '{output.name}'")
        if output.name in call.outputs:
            raise invalid_arg(f"output '{output.name}' is requested more than once")
        call.outputs.append(output.name)
    return call


def _from_contents(tensor, shape: tuple[int, ...], model: str) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    tensors.triton_type(datatype, name)
    present = [f for f in _CONTENTS if len(getattr(tensor.contents, f))]
    if len(present) > 1:
        raise invalid_arg(f"unexpected explicit tensor data for input tensor '{name}' for model '{model}', binary "
                          f"data was already supplied.")
    if not present:
        return tensors.from_values([], datatype, shape, name, model, field="contents")
    field = present[0]
    if datatype not in _CONTENTS[field]:
        shown = _CONTENTS[field][-1]
        raise invalid_arg(f"unexpected explicit tensor data for input tensor '{name}' for model '{model}' of type "
                          f"'{shown}', expected datatype '{datatype}'")
    return tensors.from_values(list(getattr(tensor.contents, field)), datatype, shape, name, model,
                               field="contents")


def encode_infer_response(call: InferCall, model_name: str, model_version: str,
                          outcome: InferOutcome) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=call.id)
    for key, value in outcome.parameters.items():
        set_parameter(response.parameters[key], value)
    for name, array in outcome.outputs.items():
        response.outputs.add(name=name, datatype=dtypes.from_numpy(array.dtype).v2_name,
                             shape=[int(d) for d in array.shape])
        response.raw_output_contents.append(tensors.to_raw(array))
    return response


def generate_response(call: InferCall, model_name: str, model_version: str, chunk: Mapping[str, Any],
                      final: bool | None = None) -> pb.ModelInferResponse:
    """One streamed response of a generation: each value of ``chunk`` (other than model_name, model_version
    and id) becomes a [1]-shaped output (str -> BYTES, bool -> BOOL, int -> INT64, float -> FP64)."""
    outputs = {}
    for key, value in chunk.items():
        if key in _RESPONSE_KEYS or value is None:
            continue
        if isinstance(value, str):
            outputs[key] = np.array([value.encode("utf-8")], dtype=np.object_)
        elif isinstance(value, bool):
            outputs[key] = np.array([value], dtype=np.bool_)
        elif isinstance(value, int):
            outputs[key] = np.array([value], dtype=np.int64)
        elif isinstance(value, float):
            outputs[key] = np.array([value], dtype=np.float64)
        else:
            outputs[key] = np.array([json.dumps(value).encode("utf-8")], dtype=np.object_)
    params = {} if final is None else {"triton_final_response": final}
    return encode_infer_response(call, model_name, model_version, InferOutcome(outputs, params))
