"""flotilla's ``triton_python_backend_utils``: what a Triton python model imports as ``pb_utils``.

The python backend registers this module in ``sys.modules`` under that name before it runs a ``model.py``,
so ``import triton_python_backend_utils as pb_utils`` works unchanged. It implements the parts of Triton's
module that a non-decoupled model uses: ``Tensor``, ``InferenceRequest`` (inputs, ids, parameters, requested
outputs, cancellation), ``InferenceResponse``, ``TritonError`` (with Triton's codes), ``TritonModelException``,
``Logger``, the config helpers (``get_input_config_by_name``, ``get_output_config_by_name``,
``triton_string_to_numpy``, ...), the BYTES (de)serialisers and ``ModelConfig`` for ``auto_complete_config``.

Not supported, each raising ``TritonModelException`` with a message that says so: decoupled responses
(``get_response_sender``), BLS (``InferenceRequest(...).exec()``; chain models with an ensemble instead) and
request rescheduling (``set_release_flags``).
"""

from __future__ import annotations

import json
import logging
import struct

import numpy as np

from flotilla.repository import dtypes

_logger = logging.getLogger("flotilla.repository.python_model")

TRITON_STRING_TO_NUMPY = {t.config_name: (bool if t.v2_name == "BOOL" else t.numpy.type)
                          for t in dtypes.TYPES if t.v2_name != "BF16"}

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2


class TritonModelException(Exception):
    """The exception pb_utils raises (and a model may raise); ``message()`` is its text."""

    def __init__(self, msg: str):
        super().__init__(msg)
        self._msg = msg

    def message(self) -> str:
        return self._msg


class TritonError:
    """A request's error, put in ``InferenceResponse(error=...)``; ``code`` is one of Triton's codes."""

    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)
    CODE_NAMES = ("UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG", "UNAVAILABLE", "UNSUPPORTED",
                  "ALREADY_EXISTS", "CANCELLED")

    def __init__(self, message: str, code: int = 1):
        if message is None:
            raise TritonModelException("TritonError needs a message")
        self._message, self._code = str(message), int(code)

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def code_name(self) -> str:
        return self.CODE_NAMES[self._code] if 0 <= self._code < len(self.CODE_NAMES) else "UNKNOWN"

    def __str__(self) -> str:
        return self._message


class Tensor:
    """A named tensor of a request or response, backed by a numpy array (always in CPU memory)."""

    def __init__(self, name: str, numpy_array):
        if not isinstance(numpy_array, np.ndarray):
            raise TritonModelException(f"Tensor '{name}' must be created from a numpy array, "
                                       f"got {type(numpy_array).__name__}")
        if numpy_array.dtype.kind == "U" or numpy_array.dtype == np.void:
            raise TritonModelException("Tensor dtype used for numpy_array is not supported by Python backend. "
                                       "Please use np.object_ instead.")
        self._name = name
        self._array = numpy_array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def triton_dtype(self) -> int:
        """The data type's number (TRITONSERVER_DataType, the same numbering as the config's TYPE_*)."""
        return dtypes.from_numpy(self._array.dtype).config_value

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self):
        return self._array.__dlpack__()

    def __dlpack__(self, stream=None):
        return self._array.__dlpack__()

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()

    @staticmethod
    def from_dlpack(name: str, capsule) -> "Tensor":
        """A Tensor from an object with ``__dlpack__`` (a torch tensor, a numpy array) or a DLPack capsule."""
        if hasattr(capsule, "__dlpack__"):
            return Tensor(name, np.from_dlpack(capsule))
        import torch.utils.dlpack
        return Tensor(name, torch.utils.dlpack.from_dlpack(capsule).cpu().numpy())


class InferenceRequest:
    """A request: the model receives these in ``execute(requests)``. Constructing one in a model (BLS) is
    possible but ``exec`` is not supported in flotilla."""

    def __init__(self, request_id: str = "", correlation_id: int | str = 0, inputs=(),
                 requested_output_names=(), model_name: str = "", model_version: int = -1, flags: int = 0,
                 timeout: int = 0, preferred_memory=None, trace=None, parameters=None, *, _is_cancelled=None):
        self._request_id, self._correlation_id = request_id, correlation_id
        self._inputs = list(inputs)
        self._requested = list(requested_output_names)
        self._model_name, self._model_version = model_name, model_version
        self._flags, self._timeout = flags, timeout
        self._parameters = json.dumps(parameters or {})
        self._is_cancelled = _is_cancelled

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def requested_output_names(self) -> list[str]:
        return self._requested

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        """The request's parameters as a JSON object string (as Triton gives them)."""
        return self._parameters

    def model_name(self) -> str:
        return self._model_name

    def is_cancelled(self) -> bool:
        return bool(self._is_cancelled and self._is_cancelled())

    def get_response_sender(self):
        raise TritonModelException("decoupled models (get_response_sender) are not supported by flotilla's "
                                   "python backend; return one InferenceResponse per request from execute")

    def exec(self, decoupled: bool = False):
        raise TritonModelException("BLS (InferenceRequest.exec) is not supported by flotilla's python backend; "
                                   "chain models with an ensemble (platform: \"ensemble\") instead")

    async def async_exec(self, decoupled: bool = False):
        self.exec(decoupled)

    def set_release_flags(self, flags: int):
        raise TritonModelException("request rescheduling (set_release_flags) is not supported by flotilla's "
                                   "python backend")


class InferenceResponse:
    """The response to one request: output tensors, or an error (then the outputs are ignored)."""

    def __init__(self, output_tensors=None, error: TritonError | None = None, parameters=None):
        tensors = [] if output_tensors is None else output_tensors
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, Tensor) for t in tensors):
            raise TritonModelException("InferenceResponse output_tensors must be a list of pb_utils.Tensor")
        if error is not None and not isinstance(error, TritonError):
            raise TritonModelException("InferenceResponse error must be a pb_utils.TritonError")
        self._tensors, self._error = list(tensors), error
        self._parameters = json.dumps(parameters or {})

    def output_tensors(self) -> list[Tensor]:
        return self._tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return self._parameters


class Logger:
    """Triton's model logger, writing to the ``flotilla.repository.python_model`` logger."""

    INFO, WARNING, ERROR, VERBOSE = 0, 1, 2, 3
    _LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.DEBUG}

    @staticmethod
    def log(message: str, level: int = 0) -> None:
        _logger.log(Logger._LEVELS.get(level, logging.INFO), "%s", message)

    @staticmethod
    def log_info(message: str) -> None:
        _logger.info("%s", message)

    @staticmethod
    def log_warn(message: str) -> None:
        _logger.warning("%s", message)

    @staticmethod
    def log_error(message: str) -> None:
        _logger.error("%s", message)

    @staticmethod
    def log_verbose(message: str) -> None:
        _logger.debug("%s", message)


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in inference_request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in inference_response.output_tensors() if t.name() == name), None)


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((e for e in model_config.get("input", []) if e["name"] == name), None)


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    return next((e for e in model_config.get("output", []) if e["name"] == name), None)


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def triton_to_numpy_type(data_type: int):
    try:
        triton_type = dtypes.from_config(int(data_type))
    except ValueError:
        return None
    return np.bool_ if triton_type.v2_name == "BOOL" else triton_type.numpy.type


def numpy_to_triton_type(data_type) -> int | None:
    try:
        return dtypes.from_numpy(data_type).config_value
    except (ValueError, TypeError):
        return None


def triton_string_to_numpy(triton_type_string: str):
    """``"TYPE_FP32"`` -> ``numpy.float32`` (``TYPE_STRING`` -> ``numpy.object_``, ``TYPE_BOOL`` -> ``bool``)."""
    if triton_type_string == "TYPE_BF16":
        return dtypes.from_v2("BF16").numpy.type
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def serialize_byte_tensor(input_tensor: np.ndarray) -> bytes | None:
    """A BYTES tensor in Triton's wire form (each element as a 4-byte little-endian length, then its bytes,
    in C order); None for a tensor that is not object/bytes."""
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        return None
    parts = []
    for item in input_tensor.reshape(-1):
        data = bytes(item) if isinstance(item, (bytes, np.bytes_)) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def deserialize_bytes_tensor(encoded_tensor) -> np.ndarray:
    """The inverse of ``serialize_byte_tensor``: a 1-D object array of bytes."""
    data, items, offset = bytes(encoded_tensor), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        items.append(data[offset:offset + length])
        offset += length
    return np.array(items, dtype=np.object_)


class ModelConfig:
    """The config handed to ``TritonPythonModel.auto_complete_config``: a dict in Triton's JSON form that the
    model may extend (max_batch_size, dynamic batching, inputs, outputs, transaction policy)."""

    def __init__(self, model_config: str):
        self._config = json.loads(model_config)
        self._config.setdefault("input", [])
        self._config.setdefault("output", [])

    def as_dict(self) -> dict:
        return self._config

    def _name(self) -> str:
        return self._config.get("name", "")

    def set_max_batch_size(self, max_batch_size: int) -> None:
        current = int(self._config.get("max_batch_size", 0))
        if current > max_batch_size:
            raise ValueError(f"configuration specified max_batch_size {current}, but in auto-complete-config "
                             f"function for model '{self._name()}' specified max_batch_size {max_batch_size}")
        self._config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        for other in ("sequence_batching", "ensemble_scheduling"):
            if other in self._config:
                raise ValueError(f"Configuration specified scheduling_choice as '{other}', but auto-complete-config "
                                 f"function for model '{self._name()}' tries to set scheduling_choice as "
                                 f"'dynamic_batching'")
        self._config.setdefault("dynamic_batching", {})

    def add_input(self, input: dict) -> None:
        self._add("input", input, ("name", "data_type", "dims", "optional"))

    def add_output(self, output: dict) -> None:
        self._add("output", output, ("name", "data_type", "dims"))

    def _add(self, kind: str, tensor: dict, allowed: tuple[str, ...]) -> None:
        extra = [k for k in tensor if k not in allowed]
        if extra:
            raise ValueError(f"{kind} '{tensor.get('name')}' in auto-complete-config function for model "
                             f"'{self._name()}' contains property other than {', '.join(allowed)}: {extra}")
        for required in ("name", "data_type", "dims"):
            if required not in tensor:
                raise ValueError(f"{kind} in auto-complete-config function for model '{self._name()}' is "
                                 f"missing '{required}' property.")
        for current in self._config[kind]:
            if current["name"] != tensor["name"]:
                continue
            if current.get("data_type", "TYPE_INVALID") not in ("TYPE_INVALID", tensor["data_type"]):
                raise ValueError(f"unable to load model '{self._name()}', configuration expects datatype "
                                 f"{current['data_type']} for {kind} '{tensor['name']}', model provides "
                                 f"{tensor['data_type']}")
            if current.get("dims") and list(current["dims"]) != list(tensor["dims"]):
                raise ValueError(f"model '{self._name()}', tensor '{tensor['name']}': the model expects dims "
                                 f"{list(tensor['dims'])} but the model configuration specifies dims "
                                 f"{list(current['dims'])}")
            current.update(tensor)
            return
        self._config[kind].append(dict(tensor))

    def set_model_transaction_policy(self, transaction_policy_dict: dict) -> None:
        extra = [k for k in transaction_policy_dict if k != "decoupled"]
        if extra:
            raise ValueError(f"model transaction property in auto-complete-config function for model "
                             f"'{self._name()}' contains property other than 'decoupled'.")
        policy = self._config.setdefault("model_transaction_policy", {})
        if "decoupled" in transaction_policy_dict:
            if "decoupled" in policy and policy["decoupled"] != transaction_policy_dict["decoupled"]:
                raise ValueError(f"trying to change decoupled property in auto-complete-config for model "
                                 f"'{self._name()}', which is already set to '{policy['decoupled']}'.")
            policy["decoupled"] = transaction_policy_dict["decoupled"]
