"""The python backend (Triton's ``backend: "python"``): ``<version>/model.py`` defining ``TritonPythonModel``.

Each instance executes the file as its own module (``import triton_python_backend_utils as pb_utils`` gets
``flotilla.repository.backends.pb_utils``; the version and model directories are on ``sys.path`` while the
file runs and while ``initialize`` runs, as in Triton, so helper modules next to it import; their module
names are shared by the whole process), creates the class and calls ``initialize(args)`` with Triton's args
(``model_config`` as Triton's JSON string, ``model_instance_kind`` "CPU"/"GPU", ``model_instance_name``,
``model_instance_device_id``, ``model_repository`` (the model's directory), ``model_version``,
``model_name``). A ``staticmethod auto_complete_config(config)`` on the class completes the config first.

Batching: the batcher hands the requests as they arrived (``receives_requests``): ``execute_requests``
checks each request's inputs (a bad one fails alone, before the model sees it), passes the others to the
model's ``execute(requests)`` in one call and maps the returned ``InferenceResponse``s back. A response with
an ``error`` fails only its request (the ``TritonError`` code is kept); an exception from ``execute``, a
return value that is not a list of one response per request, fails every request of that call with Triton's
message. Returned outputs are checked against the config (name, data type) and filtered to the requested
ones. ``finalize()`` calls the model's ``finalize`` (errors are logged).

Refused at load: decoupled models (``model_transaction_policy { decoupled: true }``), ``async def execute``
and the ``EXECUTION_ENV_PATH`` parameter (conda-packed environments).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import inspect
import json
import logging
import os
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from google.protobuf import json_format

from flotilla.errors import InvalidRequestError, ModelLoadError
from flotilla.repository import dtypes
from flotilla.repository.backends import pb_utils
from flotilla.repository.backends.base import (IMPORT_LOCK, Backend, BackendRequest, BackendResponse,
                                               ModelExecutionError, config_parameters, model_name_of, resolve_device)

logger = logging.getLogger(__name__)

BACKEND = "python"
DEFAULT_FILENAME = "model.py"
PB_UTILS_MODULE = "triton_python_backend_utils"


def config_dict(config) -> dict:
    """A ModelConfig in Triton's JSON form: proto field names, enum names, every scalar and repeated field
    (default or not), set sub-messages only, and 64-bit integers as numbers (as Triton prints them)."""
    value = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)
    _int64_as_numbers(config.DESCRIPTOR, value)
    return value


def config_json(config) -> str:
    return json.dumps(config_dict(config))


def config_from_dict(value: dict, config_type):
    """The inverse of ``config_dict``; ModelLoadError naming the field for anything the message lacks."""
    try:
        return json_format.ParseDict(value, config_type())
    except json_format.ParseError as e:
        raise ModelLoadError(f"auto_complete_config produced an invalid model config: {e}") from None


def _int64_as_numbers(descriptor, value: dict) -> None:
    for field in descriptor.fields:
        if field.name not in value:
            continue
        item = value[field.name]
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            entry = message.fields_by_name["value"]
            for key in item:
                if entry.message_type is not None:
                    _int64_as_numbers(entry.message_type, item[key])
                elif entry.cpp_type in (entry.CPPTYPE_INT64, entry.CPPTYPE_UINT64):
                    item[key] = int(item[key])
        elif message is not None:
            for element in item if isinstance(item, list) else [item]:
                _int64_as_numbers(message, element)
        elif field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64):
            value[field.name] = [int(x) for x in item] if isinstance(item, list) else int(item)


def model_path(config, version_dir: str) -> str:
    filename = config.default_model_filename or DEFAULT_FILENAME
    path = os.path.join(version_dir, filename)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model '{model_name_of(config, version_dir)}': no {filename} in {version_dir}")
    return path


# Directories this module put on sys.path -> how many loads (in any thread) currently need them there.
_PATH_USERS: collections.Counter[str] = collections.Counter()
_PATH_LOCK = threading.Lock()


@contextlib.contextmanager
def _model_dirs_on_path(version_dir: str) -> Iterator[None]:
    """The version directory and the model directory on sys.path for the duration (thread-safe: a directory
    stays while any load needs it; one that was there already is left alone)."""
    dirs = [version_dir, os.path.dirname(version_dir)]
    with _PATH_LOCK:
        for d in dirs:
            if _PATH_USERS[d] == 0 and d in sys.path:
                continue  # someone else's entry
            if _PATH_USERS[d] == 0:
                sys.path.insert(0, d)
            _PATH_USERS[d] += 1
        mine = [d for d in dirs if _PATH_USERS[d] > 0]
    try:
        yield
    finally:
        with _PATH_LOCK:
            for d in mine:
                _PATH_USERS[d] -= 1
                if _PATH_USERS[d] == 0:
                    del _PATH_USERS[d]
                    if d in sys.path:
                        sys.path.remove(d)


def load_model_class(path: str, model_name: str) -> tuple[type, str]:
    """Execute ``model.py`` as a fresh module; (its ``TritonPythonModel`` class, the module's name)."""
    sys.modules[PB_UTILS_MODULE] = pb_utils
    module_name = f"flotilla_python_model_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with IMPORT_LOCK, _model_dirs_on_path(os.path.dirname(os.path.abspath(path))):
            spec.loader.exec_module(module)
    except Exception as e:  # whatever the file raises is its load error
        sys.modules.pop(module_name, None)
        raise ModelLoadError(f"model '{model_name}': {path} failed to import: {type(e).__name__}: {e}") from None
    cls = getattr(module, "TritonPythonModel", None)
    if not inspect.isclass(cls):
        sys.modules.pop(module_name, None)
        raise ModelLoadError(f"model '{model_name}': {path} defines no class TritonPythonModel")
    if not callable(getattr(cls, "execute", None)):
        sys.modules.pop(module_name, None)
        raise ModelLoadError(f"model '{model_name}': TritonPythonModel in {path} has no execute(requests) method")
    return cls, module_name


def complete_config(config, cls: type, model_name: str):
    """``config`` with backend "python" and what ``TritonPythonModel.auto_complete_config`` adds."""
    completed = type(config)()
    completed.CopyFrom(config)
    if not completed.backend and not completed.platform:
        completed.backend = BACKEND
    hook = getattr(cls, "auto_complete_config", None)
    if hook is None:
        return completed
    wrapper = pb_utils.ModelConfig(config_json(completed))
    try:
        result = hook(wrapper)
    except Exception as e:  # the model's own validation failed
        raise ModelLoadError(f"model '{model_name}': auto_complete_config failed: {type(e).__name__}: {e}") from None
    if not isinstance(result, pb_utils.ModelConfig):
        raise ModelLoadError(f"model '{model_name}': auto_complete_config must return the ModelConfig it was "
                             f"given, not {type(result).__name__}")
    return config_from_dict(result.as_dict(), type(config))


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


class PythonBackend(Backend):
    """One ``TritonPythonModel`` object per instance (see the module doc)."""

    receives_requests = True

    def __init__(self, config, version_dir: str, instance_index: int):
        name = model_name_of(config, version_dir)
        path = model_path(config, version_dir)
        cls, self._module_name = load_model_class(path, name)
        self._model = None
        try:
            super().__init__(complete_config(config, cls, name), version_dir, instance_index)
            self._check_supported(cls)
            device = resolve_device(self.name, self.instance, self.instance.kind != "KIND_CPU" and _cuda_available(),
                                    "torch")
            self._model = self._initialize(cls, "MODEL" if self.instance.kind == "KIND_MODEL" else device)
        except BaseException:
            sys.modules.pop(self._module_name, None)
            raise

    @classmethod
    def auto_complete(cls, config, version_dir: str):
        name = model_name_of(config, version_dir)
        model_cls, module_name = load_model_class(model_path(config, version_dir), name)
        try:
            return complete_config(config, model_cls, name)
        finally:
            sys.modules.pop(module_name, None)

    def _check_supported(self, cls: type) -> None:
        if self.config.model_transaction_policy.decoupled:
            raise ModelLoadError(f"model '{self.name}': decoupled python models are not supported; return one "
                                 f"InferenceResponse per request")
        if inspect.iscoroutinefunction(cls.execute):
            raise ModelLoadError(f"model '{self.name}': async def execute is not supported; define a plain "
                                 f"def execute(self, requests)")
        if "EXECUTION_ENV_PATH" in config_parameters(self.config):
            raise ModelLoadError(f"model '{self.name}': parameter EXECUTION_ENV_PATH (a conda-packed "
                                 f"environment) is not supported; install the model's packages in flotilla's")

    def _initialize(self, cls: type, kind: str):
        args = {
            "model_config": config_json(self.config), "model_instance_kind": kind,
            "model_instance_name": self.instance.name, "model_instance_device_id": str(self.instance.device_id),
            "model_repository": os.path.dirname(self.version_dir),
            "model_version": os.path.basename(self.version_dir), "model_name": self.name,
        }
        try:
            model = cls()
            initialize = getattr(model, "initialize", None)
            if callable(initialize):
                with _model_dirs_on_path(self.version_dir):
                    initialize(args)
        except Exception as e:  # the model's own failure to start
            raise ModelLoadError(f"model '{self.name}' instance '{self.instance.name}': initialize failed: "
                                 f"{type(e).__name__}: {e}") from None
        return model

    def execute_requests(self, requests: Sequence[BackendRequest]) -> list[BackendResponse]:
        responses: list[BackendResponse | None] = [None] * len(requests)
        pending = []  # (index, pb_utils request, requested output names)
        for index, request in enumerate(requests):
            if request.is_cancelled is not None and request.is_cancelled():
                responses[index] = BackendResponse(error=ModelExecutionError("request was cancelled", "CANCELLED"))
                continue
            try:
                arrays, _, requested = self.check_request(request.inputs, request.requested_outputs)
            except InvalidRequestError as e:
                responses[index] = BackendResponse(error=e)
                continue
            pending.append((index, self._pb_request(request, arrays, requested), requested))
        if pending:
            results = self._run([p[1] for p in pending])
            for (index, _, requested), result in zip(pending, results):
                responses[index] = self._response(result, requested)
        return responses

    def execute(self, inputs: Mapping[str, np.ndarray],
                output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The whole batch as one request to the model."""
        response = self.execute_requests([BackendRequest(inputs, tuple(output_names or ()))])[0]
        if response.error is not None:
            raise response.error
        return response.outputs

    def _pb_request(self, request: BackendRequest, arrays: dict[str, np.ndarray], requested: list[str]):
        return pb_utils.InferenceRequest(
            request_id=request.request_id, correlation_id=request.correlation_id,
            inputs=[pb_utils.Tensor(name, array) for name, array in arrays.items()],
            requested_output_names=requested, model_name=self.name,
            model_version=_version_number(self.version_dir), flags=request.flags,
            parameters=dict(request.parameters), _is_cancelled=request.is_cancelled)

    def _run(self, py_requests: list) -> list:
        """The model's responses, one per request, or the same ModelExecutionError for each."""
        def fail(message: str) -> list:
            error = ModelExecutionError(f"Failed to process the request(s) for model '{self.name}', "
                                        f"message: {message}")
            return [error] * len(py_requests)

        if self._model is None:
            return fail(f"instance '{self.instance.name}' was finalized")
        try:
            returned = self._model.execute(py_requests)
        except Exception as e:  # the model's failure fails this call's requests, nothing else
            return fail(f"{type(e).__name__}: {e}")
        if not isinstance(returned, list):
            return fail(f"Expected a list in the execute return, found type '{type(returned).__name__}'.")
        if len(returned) != len(py_requests):
            return fail(f"Number of InferenceResponse objects do not match the number of InferenceRequest "
                        f"objects. InferenceRequest(s) size is:{len(py_requests)}, and InferenceResponse(s) "
                        f"size is:{len(returned)}")
        return returned

    def _response(self, result, requested: list[str]) -> BackendResponse:
        if isinstance(result, ModelExecutionError):
            return BackendResponse(error=result)
        if not isinstance(result, pb_utils.InferenceResponse):
            return BackendResponse(error=ModelExecutionError(
                f"model '{self.name}' returned {type(result).__name__} instead of a pb_utils.InferenceResponse"))
        if result.has_error():
            error = result.error()
            return BackendResponse(error=ModelExecutionError(error.message(), error.code_name()))
        produced = {t.name(): t for t in result.output_tensors()}
        unknown = [n for n in produced if n not in self.outputs]
        if unknown:
            return BackendResponse(error=ModelExecutionError(
                f"model '{self.name}' returned output '{unknown[0]}', which is not in its configuration "
                f"(outputs: {list(self.outputs)})"))
        outputs = {}
        for name in requested:
            if name not in produced:
                return BackendResponse(error=ModelExecutionError(
                    f"model '{self.name}' did not return requested output '{name}'"))
            try:
                outputs[name] = dtypes.as_type(produced[name].as_numpy(), self.outputs[name].type)
            except ValueError as e:
                return BackendResponse(error=ModelExecutionError(
                    f"unexpected datatype for inference output '{name}' of model '{self.name}': {e}"))
        return BackendResponse(outputs, parameters=json.loads(result.parameters()))

    def finalize(self) -> None:
        model, self._model = self._model, None
        if model is not None and callable(getattr(model, "finalize", None)):
            try:
                model.finalize()
            except Exception:  # unloading goes on; the model's error is logged
                logger.exception("model '%s' instance '%s': finalize failed", self.name, self.instance.name)
        sys.modules.pop(self._module_name, None)


def _version_number(version_dir: str) -> int:
    base = os.path.basename(version_dir)
    return int(base) if base.isdigit() else -1
