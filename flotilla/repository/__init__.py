"""Triton-style model repository (DESIGN.md layer ``repository/``: below deploy/ and entrypoints/, above engine/).

Modules, one job each:
- ``config``: config.pbtxt / config.yaml -> a validated, normalised ``ModelConfig`` (tritonclient's message).
- ``control``: version discovery and version policies; model control modes none / poll / explicit over
  repository scans (what should be loaded).
- ``tensors``: per-model tensor specs, the request check with Triton's messages, concatenation / padding /
  splitting of batches.
- ``batch_policy``: the dynamic batcher as a pure policy (queue + clock -> next batch, timeouts, waits).
- ``dynamic_batcher``: the asyncio runner that executes batches on N model instances in worker threads.
- ``errors``: ``InferError`` (Triton status code + message), ``ModelConfigError``, ``ModelControlError``.
- ``dtypes``: Triton's TYPE_* / v2 datatype names <-> numpy (BYTES as object arrays of bytes).
- ``backends``: one model version's instances (onnxruntime, PyTorch programs, Python models via pb_utils).
- ``instances``: a version's instance_group instances as the batcher's executors.
- ``served``: one loaded version (instances + batcher) as a ``ServedModel``: metadata, config, statistics.
- ``ensemble``: ensemble validation (Triton's messages) and the DAG that runs the steps through their batchers.
- ``overrides``: the load API's config override and ``file:`` model files.
- ``manager``: ``ModelRepository``, the ``InferenceService`` over repository directories (load, unload,
  reload without losing requests, poll, index).
- ``service``: the ``InferenceService`` / ``ServedModel`` protocols the KServe v2 layer calls.
"""

from flotilla.repository.batch_policy import BatcherSettings, BatchQueue, Decision, OrderedRelease, QueuePolicy
from flotilla.repository.config import (
    ModelConfig, instance_count, load_model_config, parse_model_config, read_model_config, validate_model_config,
)
from flotilla.repository.control import (
    ModelChange, ModelControl, ModelControlMode, ModelSnapshot, ModelTarget, RepositoryScan, diff_scans,
    resolve_target, scan_repositories, versions_to_load,
)
from flotilla.repository.dynamic_batcher import (
    BatchExecutor, BatcherStats, DynamicBatcher, InferRequest, TensorExecutor,
)
from flotilla.repository.errors import InferError, InvalidArgError, ModelConfigError, ModelControlError
from flotilla.repository.manager import ModelRepository
from flotilla.repository.tensors import CheckedRequest, ModelIO, TensorSpec, concat_inputs, split_outputs

__all__ = [
    "BatchExecutor", "BatchQueue", "BatcherSettings", "BatcherStats", "CheckedRequest", "Decision", "DynamicBatcher",
    "InferError", "InferRequest", "InvalidArgError", "ModelChange", "ModelConfig", "ModelConfigError",
    "ModelControl", "ModelControlError", "ModelControlMode", "ModelIO", "ModelRepository", "ModelSnapshot",
    "ModelTarget", "OrderedRelease", "QueuePolicy", "RepositoryScan", "TensorExecutor", "TensorSpec",
    "concat_inputs", "diff_scans", "instance_count", "load_model_config", "parse_model_config", "read_model_config",
    "resolve_target", "scan_repositories", "split_outputs", "validate_model_config", "versions_to_load",
]
