"""What every backend shares: the ``Backend`` base class, the request/response values of the request-list
path, instance groups, and the config's tensor specs and request check, which are the repository's own
(``flotilla.repository.tensors.ModelIO``: one check with Triton's messages for the batcher and the backends).

The contract itself is documented in ``flotilla.repository.backends`` (the package docstring).
"""

from __future__ import annotations

import abc
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from flotilla.errors import FlotillaError, InvalidRequestError, ModelLoadError
from flotilla.repository.errors import ModelConfigError
from flotilla.repository.tensors import (BATCHER_PARAMETER_PREFIXES, BATCHER_PARAMETERS, ModelIO, TensorSpec,
                                         from_model_view, to_model_view)

# Held around the imports a version load triggers (a backend's module, onnxruntime, a Python model's model.py):
# versions load on worker threads at once, and when two threads import overlapping packages CPython may hand one
# of them a partially initialized module (an ImportError). One import at a time; the loads themselves still run
# in parallel. Re-entrant: an import under it may start another.
IMPORT_LOCK = threading.RLock()

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


def io_specs(config, model_name: str) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """The config's inputs and outputs by name, in config order (``tensors.ModelIO``); ModelLoadError for an
    invalid data type, a duplicate name or a field no backend here honours (shape tensors, non-linear formats)."""
    io = model_io(config, model_name)
    return dict(io.inputs), dict(io.outputs)


def model_io(config, model_name: str) -> ModelIO:
    """``tensors.ModelIO`` of the config (the one request check), its errors as ModelLoadError."""
    try:
        return ModelIO.from_config(config)
    except ModelConfigError as e:
        raise ModelLoadError(f"model '{model_name}': {e}") from None


def config_parameters(config) -> dict[str, str]:
    """The config's ``parameters { key, value { string_value } }`` as a plain dict."""
    return {key: value.string_value for key, value in config.parameters.items()}


def check_parameters(model_name: str, params: Mapping[str, str], supported: Sequence[str],
                     prefixes: Sequence[str] = ()) -> None:
    """ModelLoadError naming every parameter key a backend does not implement (none is silently ignored).
    The dynamic batcher's own parameters (``pad_value``, ``pad_value.<INPUT>``) are accepted everywhere."""
    supported = (*supported, *BATCHER_PARAMETERS)
    prefixes = (*prefixes, *BATCHER_PARAMETER_PREFIXES)
    unknown = sorted(k for k in params if k not in supported and not k.startswith(tuple(prefixes)))
    if unknown:
        allowed = ", ".join([*supported, *(f"{p}*" for p in prefixes)]) or "none"
        raise ModelLoadError(f"model '{model_name}': unsupported parameters {unknown}; this backend "
                             f"supports: {allowed}")


def model_name_of(config, version_dir: str) -> str:
    """The config's name, else the model directory's name (Triton's default)."""
    return config.name or os.path.basename(os.path.dirname(os.path.abspath(version_dir)))


def to_model_shape(array: np.ndarray, spec: TensorSpec, batch: int | None) -> np.ndarray:
    """An input in the shape the model takes (the config's ``reshape``); unchanged without one."""
    return to_model_view(spec, array, batched=batch is not None)


def from_model_shape(array: np.ndarray, spec: TensorSpec, batch: int | None, model_name: str) -> np.ndarray:
    """A model output in the shape clients see (the config's ``dims`` when it has a ``reshape``); a
    ModelExecutionError when a batching model's output does not have one row per input row."""
    if batch is not None and (array.ndim == 0 or array.shape[0] != batch):
        raise ModelExecutionError(f"model '{model_name}' returned output '{spec.name}' with shape "
                                  f"{list(array.shape)} for a batch of {batch}; its first dim must be the batch")
    return from_model_view(spec, array, batched=batch is not None)


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
        self.io = model_io(config, self.name)
        self.inputs, self.outputs = dict(self.io.inputs), dict(self.io.outputs)

    def check_request(self, inputs: Mapping[str, np.ndarray],
                      output_names: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], int | None, list[str]]:
        """The repository's one request check (``tensors.ModelIO``): the inputs normalised, the batch size (None
        when the model does not batch) and the output names to compute. Raises ``InvalidArgError`` (an
        ``InvalidRequestError``) with Triton's message."""
        checked = self.io.check_request(inputs)
        names = self.io.select_outputs(output_names or ())
        return checked.inputs, (checked.batch_size if self.io.batching else None), names

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
