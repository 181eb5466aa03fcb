"""Backends: one instance of one model version, as Triton's backends run them (onnxruntime, pytorch, python).

Contract (what the repository and the dynamic batcher rely on)
--------------------------------------------------------------
- Creation: ``load_backend(config, version_dir, instance_index)`` with a
  ``tritonclient.grpc.model_config_pb2.ModelConfig`` message, the version directory (``REPO/<model>/<version>``)
  and the instance's index in ``instance_specs(config)`` (every ``instance_group``'s ``count`` instances, in
  order). The backend is chosen by ``backend``, else ``platform``, else the model file present
  (``model.onnx`` -> onnxruntime, ``model.pt``/``model.pt2`` -> pytorch, ``model.py`` -> python). Loading
  auto-completes the config from the model (``backend.config`` is the completed copy; the repository can get
  it once, before creating instances, from ``auto_complete_config(config, version_dir)``) and checks the
  config against the model. Any problem is a ``flotilla.errors.ModelLoadError`` whose message names the
  model, the tensor and the mismatch; pickled PyTorch files are refused before they are opened.
- ``backend.execute(inputs, output_names=None) -> outputs``: one batch the batcher already concatenated.
  ``inputs`` maps config input names to numpy arrays, batch dim first when ``max_batch_size > 0`` (at most
  ``max_batch_size`` rows); outputs map config output names (the requested ones, default all) to arrays of
  the config's data type, batch dim first. BYTES tensors are numpy object arrays of ``bytes``; BF16 is
  ``ml_dtypes.bfloat16``; the type names and numpy forms are in ``flotilla.repository.dtypes``. Bad inputs
  (unknown/missing name, data type, shape, batch size) raise ``InvalidRequestError`` with Triton's message;
  a failing model raises ``ModelExecutionError`` (``code``: a Triton error code name).
- ``backend.receives_requests``: False for onnxruntime and pytorch (the batcher concatenates, pads ragged
  inputs, calls ``execute`` and splits the outputs by rows); True for python, whose model receives the client
  requests as they arrived, as in Triton: the batcher then calls ``backend.execute_requests(requests)`` with a
  list of ``BackendRequest`` and gets one ``BackendResponse`` per request, in order, each with its outputs or
  its own ``error`` (a bad request never fails the others). ``execute_requests`` works on every backend
  (one ``execute`` per request) and ``execute`` on python too (the batch as one request).
- ``backend.finalize()``: release the instance (calls a python model's ``finalize``); idempotent. After it,
  ``execute`` raises ``ModelExecutionError`` (code ``UNAVAILABLE``).
- Instances are independent objects; the batcher may run different instances in different threads at the
  same time, but calls one instance from one thread at a time.

Modules: ``base`` (the base class, request/response values, instance groups, tensor specs, input checks),
``ort_backend``, ``torch_backend`` (+ ``torch_archive``: which PyTorch files are safe to open),
``python_backend`` (+ ``pb_utils``: the ``triton_python_backend_utils`` module a model.py imports).
"""

from __future__ import annotations

import importlib
import os

from flotilla.errors import ModelLoadError
from flotilla.repository.backends.base import (DEFAULT_MAX_BATCH_SIZE, IMPORT_LOCK, Backend, BackendRequest,
                                               BackendResponse, InstanceSpec, ModelExecutionError, TensorSpec,
                                               instance_specs, model_name_of)

_BACKENDS = {
    "onnxruntime": ("flotilla.repository.backends.ort_backend", "OnnxRuntimeBackend"),
    "pytorch": ("flotilla.repository.backends.torch_backend", "PyTorchBackend"),
    "python": ("flotilla.repository.backends.python_backend", "PythonBackend"),
}
_PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}
_FILE_SUFFIXES = {".onnx": "onnxruntime", ".pt": "pytorch", ".pt2": "pytorch", ".py": "python"}
_DEFAULT_FILES = ("model.onnx", "model.pt", "model.pt2", "model.py")


def backend_name(config, version_dir: str) -> str:
    """``onnxruntime``, ``pytorch`` or ``python`` for a config (see the contract); ModelLoadError otherwise."""
    name = model_name_of(config, version_dir)
    if config.runtime:
        raise ModelLoadError(f"model '{name}': runtime {config.runtime!r} is not supported (flotilla runs the "
                             f"onnxruntime, pytorch and python backends in-process)")
    from_platform = None
    if config.platform:
        if config.platform == "ensemble":
            raise ModelLoadError(f"model '{name}' is an ensemble: it has no backend of its own")
        from_platform = _PLATFORMS.get(config.platform)
        if from_platform is None:
            raise ModelLoadError(f"model '{name}': platform {config.platform!r} is not supported; supported: "
                                 f"{', '.join(_PLATFORMS)} (or backend: {', '.join(_BACKENDS)})")
    if config.backend:
        if config.backend not in _BACKENDS:
            raise ModelLoadError(f"model '{name}': backend {config.backend!r} is not supported; supported: "
                                 f"{', '.join(_BACKENDS)}")
        if from_platform is not None and from_platform != config.backend:
            raise ModelLoadError(f"model '{name}': backend {config.backend!r} does not match platform "
                                 f"{config.platform!r}")
        return config.backend
    if from_platform is not None:
        return from_platform
    return _backend_from_files(config, version_dir, name)


def _backend_from_files(config, version_dir: str, name: str) -> str:
    if config.default_model_filename:
        suffix = os.path.splitext(config.default_model_filename)[1]
        if suffix in _FILE_SUFFIXES:
            return _FILE_SUFFIXES[suffix]
        raise ModelLoadError(f"model '{name}': cannot tell the backend of default_model_filename "
                             f"{config.default_model_filename!r}; set backend")
    found = {_FILE_SUFFIXES[os.path.splitext(f)[1]] for f in _DEFAULT_FILES
             if os.path.exists(os.path.join(version_dir, f))}
    if len(found) == 1:
        return found.pop()
    if not found:
        raise ModelLoadError(f"model '{name}': {version_dir} holds none of {', '.join(_DEFAULT_FILES)} and the "
                             f"config sets no backend or platform")
    raise ModelLoadError(f"model '{name}': {version_dir} holds model files of several backends "
                         f"({', '.join(sorted(found))}); set backend in the config")


def backend_class(config, version_dir: str) -> type[Backend]:
    module, cls = _BACKENDS[backend_name(config, version_dir)]
    with IMPORT_LOCK:  # loads run on worker threads (base.IMPORT_LOCK)
        return getattr(importlib.import_module(module), cls)


def auto_complete_config(config, version_dir: str):
    """A copy of ``config`` completed from the model in ``version_dir`` (Triton's auto-complete)."""
    return backend_class(config, version_dir).auto_complete(config, version_dir)


def load_backend(config, version_dir: str, instance_index: int = 0) -> Backend:
    """Load instance ``instance_index`` of the model version in ``version_dir`` (see the contract)."""
    return backend_class(config, version_dir)(config, version_dir, instance_index)


__all__ = ["Backend", "BackendRequest", "BackendResponse", "DEFAULT_MAX_BATCH_SIZE", "InstanceSpec",
           "ModelExecutionError", "TensorSpec", "auto_complete_config", "backend_class", "backend_name",
           "instance_specs", "load_backend"]
