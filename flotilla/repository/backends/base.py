"""What every backend shares: the ``Backend`` base class, the request/response values of the request-list
path, instance groups, the config's tensor specs and the input checks (Triton's messages).

The contract itself is documented in ``flotilla.repository.backends`` (the package docstring).
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from flotilla.errors import FlotillaError, InvalidRequestError, ModelLoadError
from flotilla.repository import dtypes

# Triton's --backend-config=default-max-batch-size: the max_batch_size auto-complete gives a model that can batch.
DEFAULT_MAX_BATCH_SIZE = 4
_KIND_NAMES = {0: "KIND_AUTO", 1: "KIND_GPU", 2: "KIND_CPU", 3: "KIND_MODEL"}
_NAMED_INDEX = re.compile(r"^.+__(\d+)$")


class ModelExecutionError(FlotillaError, RuntimeError):
    """A model did not produce a request's outputs. ``code`` is a Triton error code name: ``INTERNAL`` when
    the model failed or returned something invalid, ``CANCELLED`` for a request cancelled before it ran, or
    the code a python model set on its ``TritonError`` (``INVALID_ARG`` is the client's fault: 400)."""

    def __init__(self, message: str, code: str = "INTERNAL"):
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class BackendRequest:
    """One client request as the request-list path (``Backend.execute_requests``) receives it.

    ``inputs``: name -> array (batch dim first when the model batches); ``requested_outputs``: the output
    names to return (empty: all of the config's outputs); ``parameters``: the request's v2 parameters;
    ``is_cancelled``: polled by a python model's ``request.is_cancelled()``."""

    inputs: Mapping[str, np.ndarray]
    requested_outputs: tuple[str, ...] = ()
    request_id: str = ""
    correlation_id: int | str = 0
    parameters: Mapping[str, Any] = field(default_factory=dict)
    flags: int = 0
    is_cancelled: Callable[[], bool] | None = None


@dataclass
class BackendResponse:
    """The result of one ``BackendRequest``: ``outputs`` (name -> array, the config's dtypes) or ``error``
    (``InvalidRequestError`` for bad input, ``ModelExecutionError`` otherwise); ``parameters`` as a python
    model's ``InferenceResponse(parameters=...)`` set them."""

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: Exception | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InstanceSpec:
    """One model instance of the config's ``instance_group``s: Triton's instance ``name``
    (``<group name>_<index in group>``, the group name defaulting to ``<model>_<group index>``), ``kind``
    (``KIND_CPU``/``KIND_GPU``/``KIND_AUTO``/``KIND_MODEL``), ``device_id`` (the GPU of a KIND_GPU instance)."""

    name: str
    kind: str
    device_id: int
    group_index: int


def instance_specs(config) -> list[InstanceSpec]:
    """Every instance the config asks for, in order: each group's ``count`` (default 1) instances, times its
    ``gpus`` for KIND_GPU. No ``instance_group`` is one KIND_AUTO instance. Index i of this list is the
    ``instance_index`` that a backend is created with."""
    groups = list(config.instance_group)
    if not groups:
        return [InstanceSpec(f"{config.name}_0_0", "KIND_AUTO", 0, 0)]
    specs = []
    for g_index, group in enumerate(groups):
        kind = _KIND_NAMES.get(group.kind, "KIND_AUTO")
        group_name = group.name or f"{config.name}_{g_index}"
        devices = list(group.gpus) if kind == "KIND_GPU" and group.gpus else [0]
        count = group.count if group.count > 0 else 1
        for i in range(count * len(devices)):
            specs.append(InstanceSpec(f"{group_name}_{i}", kind, devices[i // count], g_index))
    return specs


def resolve_device(model_name: str, instance: InstanceSpec, gpu_available: bool, what: str) -> str:
    """``"GPU"`` or ``"CPU"`` for an instance: KIND_GPU needs ``gpu_available`` (else a ModelLoadError naming
    ``what`` lacks a GPU); KIND_AUTO and KIND_MODEL take the GPU when there is one, as Triton does."""
    if instance.kind == "KIND_CPU":
        return "CPU"
    if instance.kind == "KIND_GPU" and not gpu_available:
        raise ModelLoadError(f"model '{model_name}': instance '{instance.name}' is KIND_GPU but {what} has no "
                             f"GPU here; use instance_group {{ kind: KIND_CPU }}")
    return "GPU" if gpu_available else "CPU"


@dataclass(frozen=True)
class TensorSpec:
    """One config input/output: ``dims`` as clients see them (no batch dim), ``model_dims`` as the model sees
    them (the config's ``reshape``, else ``dims``); -1 is a variable dim."""

    name: str
    type: dtypes.TritonType
    dims: tuple[int, ...]
    model_dims: tuple[int, ...]
    optional: bool = False

    @property
    def reshaped(self) -> bool:
        return self.model_dims != self.dims


def io_specs(config, model_name: str) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """The config's inputs and outputs by name, in config order; ModelLoadError for an invalid data type, a
    duplicate name or a field no backend here honours (shape tensors, non-linear formats)."""
    result = []
    for kind, entries in (("input", config.input), ("output", config.output)):
        specs: dict[str, TensorSpec] = {}
        for entry in entries:
            if entry.name in specs:
                raise ModelLoadError(f"model '{model_name}': {kind} '{entry.name}' appears twice in the config")
            if entry.is_shape_tensor or entry.is_non_linear_format_io:
                raise ModelLoadError(f"model '{model_name}': {kind} '{entry.name}' sets is_shape_tensor or "
                                     f"is_non_linear_format_io (TensorRT only); not supported")
            try:
                triton_type = dtypes.from_config(entry.data_type)
            except ValueError as e:
                raise ModelLoadError(f"model '{model_name}': {kind} '{entry.name}': {e}") from None
            dims = tuple(int(d) for d in entry.dims)
            model_dims = tuple(int(d) for d in entry.reshape.shape) if entry.HasField("reshape") else dims
            specs[entry.name] = TensorSpec(entry.name, triton_type, dims, model_dims,
                                           bool(getattr(entry, "optional", False)))
        result.append(specs)
    return result[0], result[1]


def config_parameters(config) -> dict[str, str]:
    """The config's ``parameters { key, value { string_value } }`` as a plain dict."""
    return {key: value.string_value for key, value in config.parameters.items()}


def check_parameters(model_name: str, params: Mapping[str, str], supported: Sequence[str],
                     prefixes: Sequence[str] = ()) -> None:
    """ModelLoadError naming every parameter key a backend does not implement (none is silently ignored)."""
    unknown = sorted(k for k in params if k not in supported and not k.startswith(tuple(prefixes)))
    if unknown:
        allowed = ", ".join([*supported, *(f"{p}*" for p in prefixes)]) or "none"
        raise ModelLoadError(f"model '{model_name}': unsupported parameters {unknown}; this backend "
                             f"supports: {allowed}")


def model_name_of(config, version_dir: str) -> str:
    """The config's name, else the model directory's name (Triton's default)."""
    return config.name or os.path.basename(os.path.dirname(os.path.abspath(version_dir)))


def check_inputs(model_name: str, specs: Mapping[str, TensorSpec], inputs: Mapping[str, np.ndarray],
                 max_batch_size: int) -> tuple[dict[str, np.ndarray], int | None]:
    """Inputs checked against the config (names, data types, shapes, batch size) with Triton's messages as
    InvalidRequestError; returns them normalised (BYTES as object arrays of bytes) and the batch size (None
    when the model does not batch)."""
    unknown = [n for n in inputs if n not in specs]
    if unknown:
        raise InvalidRequestError(f"unexpected inference input '{unknown[0]}' for model '{model_name}'",
                                  param=unknown[0])
    missing = [n for n, s in specs.items() if n not in inputs and not s.optional]
    if missing:
        raise InvalidRequestError(f"expected {len(specs)} inputs but got {len(inputs)} inputs for model "
                                  f"'{model_name}'. Got input(s) {sorted(inputs)}, but missing required "
                                  f"input(s) {missing}. Please provide all required input(s).", param=missing[0])
    out, batch = {}, None
    for name, array in inputs.items():
        spec = specs[name]
        try:
            array = dtypes.as_type(array, spec.type)
        except ValueError:
            actual = _type_name(array)
            raise InvalidRequestError(f"inference input '{name}' data-type is '{actual}', but model "
                                      f"'{model_name}' expects '{spec.type.v2_name}'", param=name) from None
        shape = tuple(array.shape)
        if max_batch_size > 0:
            if not shape:
                raise InvalidRequestError(f"input '{name}' for model '{model_name}' has no batch dimension",
                                          param=name)
            if batch is not None and shape[0] != batch:
                raise InvalidRequestError(f"inputs of model '{model_name}' have different batch sizes "
                                          f"({batch} and {shape[0]} for '{name}')", param=name)
            batch = shape[0]
        if not _dims_match(shape[1:] if max_batch_size > 0 else shape, spec.dims):
            expected = ([-1] if max_batch_size > 0 else []) + list(spec.dims)
            raise InvalidRequestError(f"unexpected shape for input '{name}' for model '{model_name}'. "
                                      f"Expected {expected}, got {list(shape)}", param=name)
        out[name] = array
    if batch is not None and batch > max_batch_size:
        raise InvalidRequestError(f"inference request batch-size must be <= {max_batch_size} for "
                                  f"'{model_name}'", param="inputs")
    return out, batch


def _type_name(array) -> str:
    try:
        return dtypes.from_numpy(np.asarray(array).dtype).v2_name
    except ValueError:
        return str(np.asarray(array).dtype)


def _dims_match(shape: Sequence[int], dims: Sequence[int]) -> bool:
    return len(shape) == len(dims) and all(d == -1 or d == s for s, d in zip(shape, dims))


def select_outputs(model_name: str, specs: Mapping[str, TensorSpec], requested: Sequence[str] | None) -> list[str]:
    """The output names to compute: ``requested`` (checked to exist; InvalidRequestError otherwise) or all."""
    if not requested:
        return list(specs)
    for name in requested:
        if name not in specs:
            raise InvalidRequestError(f"unexpected inference output '{name}' for model '{model_name}'",
                                      param=name)
    return list(dict.fromkeys(requested))


def to_model_shape(array: np.ndarray, spec: TensorSpec, batch: int | None) -> np.ndarray:
    """An input in the shape the model takes (the config's ``reshape``); unchanged without one."""
    if not spec.reshaped:
        return array
    return array.reshape(((batch,) if batch is not None else ()) + spec.model_dims)


def from_model_shape(array: np.ndarray, spec: TensorSpec, batch: int | None, model_name: str) -> np.ndarray:
    """A model output in the shape clients see (the config's ``dims`` when it has a ``reshape``); a
    ModelExecutionError when a batching model's output does not have one row per input row."""
    if batch is not None and (array.ndim == 0 or array.shape[0] != batch):
        raise ModelExecutionError(f"model '{model_name}' returned output '{spec.name}' with shape "
                                  f"{list(array.shape)} for a batch of {batch}; its first dim must be the batch")
    if not spec.reshaped:
        return array
    return array.reshape(((batch,) if batch is not None else ()) + spec.dims)


def naming_convention(names: Sequence[str], argument_names: Sequence[str] | None) -> str:
    """Triton's pytorch-backend convention for mapping config tensor names to positions: ``FORWARD_ARGUMENT``
    (every name is an argument of forward), ``NAMED_INDEX`` (every name is ``<anything>__<index>`` with
    distinct indices) or ``STRICT_CONFIG_ORDERING`` (the config's order)."""
    if argument_names is not None and names and all(n in argument_names for n in names):
        return "FORWARD_ARGUMENT"
    indices = [_NAMED_INDEX.match(n) for n in names]
    if names and all(indices) and len({int(m.group(1)) for m in indices}) == len(names):
        return "NAMED_INDEX"
    return "STRICT_CONFIG_ORDERING"


def named_index(name: str) -> int:
    """The ``<index>`` of a ``<name>__<index>`` tensor name."""
    return int(_NAMED_INDEX.match(name).group(1))


class Backend(abc.ABC):
    """One instance of one model version. Subclasses load in ``__init__`` (raising ModelLoadError with a
    message naming the problem) and implement ``execute``; ``execute_requests`` runs a list of client
    requests (here one ``execute`` each, every failure confined to its request)."""

    #: True when the batcher should hand this backend its requests unconcatenated (``execute_requests``),
    #: as Triton's python backend receives them; False when it concatenates them and calls ``execute``.
    receives_requests: ClassVar[bool] = False

    def __init__(self, config, version_dir: str, instance_index: int):
        self.version_dir = os.path.abspath(version_dir)
        self.name = model_name_of(config, version_dir)
        self.config = config
        specs = instance_specs(config)
        if not 0 <= instance_index < len(specs):
            raise ModelLoadError(f"model '{self.name}': instance index {instance_index} is outside the "
                                 f"{len(specs)} instance(s) of its instance_group")
        self.instance_index = instance_index
        self.instance = specs[instance_index]
        self.instance_count = len(specs)
        self.max_batch_size = int(config.max_batch_size)
        self.inputs, self.outputs = io_specs(config, self.name)

    @classmethod
    def auto_complete(cls, config, version_dir: str):
        """A copy of ``config`` with what the model file tells filled in (Triton's auto-complete)."""
        completed = type(config)()
        completed.CopyFrom(config)
        return completed

    @abc.abstractmethod
    def execute(self, inputs: Mapping[str, np.ndarray],
                output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one (already concatenated) batch: config input name -> array, batch dim first when
        max_batch_size > 0; returns the requested outputs (default: all of the config's), config dtypes.
        Raises InvalidRequestError for bad inputs, ModelExecutionError when the model fails."""

    def execute_requests(self, requests: Sequence[BackendRequest]) -> list[BackendResponse]:
        """One response per request, in order; a failure is that request's ``error`` only."""
        responses = []
        for request in requests:
            if request.is_cancelled is not None and request.is_cancelled():
                responses.append(BackendResponse(error=ModelExecutionError("request was cancelled", "CANCELLED")))
                continue
            try:
                outputs = self.execute(request.inputs, request.requested_outputs or None)
                responses.append(BackendResponse(outputs))
            except (InvalidRequestError, ModelExecutionError) as e:
                responses.append(BackendResponse(error=e))
            except Exception as e:  # a model bug: the request fails, the batch and the server go on
                responses.append(BackendResponse(error=ModelExecutionError(
                    f"model '{self.name}' failed: {type(e).__name__}: {e}")))
        return responses

    @abc.abstractmethod
    def finalize(self) -> None:
        """Release the instance's resources; idempotent, never raises. ``execute`` fails afterwards."""
