"""The onnxruntime backend (Triton's ``backend: "onnxruntime"`` / ``platform: "onnxruntime_onnx"``).

``<version>/model.onnx`` (or ``default_model_filename``; a directory of that name holding ``model.onnx`` with
external data also works) runs in one ``onnxruntime.InferenceSession`` per instance. At load the config is
auto-completed from the model (all inputs when the config lists none, all outputs likewise, and
``max_batch_size: 4`` plus ``dynamic_batching {}`` when the config gives no max_batch_size and every tensor
has a dynamic first dim), then checked against it: names, data types and dims, each mismatch a
ModelLoadError naming the tensor.

Threads: ``intra_op_num_threads`` defaults to this process's CPUs divided by the model's instance count (the
instances run concurrently), ``inter_op_num_threads`` to 1, and idle intra-op threads do not spin (a small
shared machine). Config ``parameters`` honoured: ``intra_op_thread_count``, ``inter_op_thread_count``,
``execution_mode`` (0 sequential, 1 parallel), ``enable_mem_arena``, ``enable_mem_pattern`` and any
``session.*`` key (an onnxruntime session config entry); ``optimization { graph { level } }`` maps -1/0/1 to
basic/all/extended graph optimisation. Anything else is a load error.

BYTES tensors are onnxruntime string tensors (utf-8 text); BF16 inputs are passed as OrtValues; a BF16 output
is refused at load (onnxruntime's Python API cannot return one as an array).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from flotilla.errors import InvalidRequestError, ModelLoadError
from flotilla.repository import dtypes
from flotilla.repository.backends.base import (DEFAULT_MAX_BATCH_SIZE, IMPORT_LOCK, Backend, ModelExecutionError,
                                               TensorSpec, check_parameters, config_parameters,
                                               from_model_shape, instance_specs, model_name_of,
                                               resolve_device, to_model_shape)

logger = logging.getLogger(__name__)

PLATFORM, BACKEND = "onnxruntime_onnx", "onnxruntime"
DEFAULT_FILENAME = "model.onnx"
PARAMETERS = ("intra_op_thread_count", "inter_op_thread_count", "execution_mode", "enable_mem_arena",
              "enable_mem_pattern")
_ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16", "tensor(bfloat16)": "BF16",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


@dataclass(frozen=True)
class ModelTensor:
    """An input/output as the ONNX model declares it: ``ort_type`` ("tensor(float)"), ``type`` (None when
    Triton has no such type) and ``shape`` (-1 for a symbolic or unknown dim)."""

    name: str
    ort_type: str
    type: dtypes.TritonType | None
    shape: tuple[int, ...]


def _model_tensors(args) -> list[ModelTensor]:
    tensors = []
    for arg in args:
        v2 = _ORT_TYPES.get(arg.type)
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
        tensors.append(ModelTensor(arg.name, arg.type, dtypes.from_v2(v2) if v2 else None, shape))
    return tensors


def model_path(config, version_dir: str) -> str:
    """The ONNX file of a version directory; ModelLoadError when it is missing."""
    filename = config.default_model_filename or DEFAULT_FILENAME
    path = os.path.join(version_dir, filename)
    if os.path.isdir(path):
        path = os.path.join(path, DEFAULT_FILENAME)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model '{model_name_of(config, version_dir)}': no {filename} in {version_dir}")
    return path


def _import_ort():
    """``onnxruntime``, imported under ``base.IMPORT_LOCK``; ModelLoadError naming the import's own error when
    it fails (a missing package, or a broken install)."""
    with IMPORT_LOCK:
        try:
            import onnxruntime
        except ImportError as e:
            raise ModelLoadError(f"the onnxruntime backend needs the onnxruntime package (pip install "
                                 f"'flotilla[onnx]'); importing it failed: {type(e).__name__}: {e}") from e
    return onnxruntime


def _int_parameter(model_name: str, params: Mapping[str, str], key: str, default: int) -> int:
    if key not in params:
        return default
    try:
        return int(params[key])
    except ValueError:
        raise ModelLoadError(f"model '{model_name}': parameter {key}={params[key]!r} is not an integer") from None


def default_intra_op_threads(instance_count: int) -> int:
    """This process's CPUs shared out among the model's concurrently running instances (at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, instance_count))


def session_options(ort, config, model_name: str, instance_count: int):
    """``SessionOptions`` from the config's parameters and graph optimisation level (see the module doc)."""
    params = config_parameters(config)
    check_parameters(model_name, params, PARAMETERS, prefixes=("session.",))
    accelerators = config.optimization.execution_accelerators
    if len(accelerators.gpu_execution_accelerator) or len(accelerators.cpu_execution_accelerator):
        raise ModelLoadError(f"model '{model_name}': optimization.execution_accelerators are not supported "
                             f"by flotilla's onnxruntime backend")
    options = ort.SessionOptions()
    options.intra_op_num_threads = _int_parameter(model_name, params, "intra_op_thread_count",
                                                  default_intra_op_threads(instance_count))
    options.inter_op_num_threads = _int_parameter(model_name, params, "inter_op_thread_count", 1)
    mode = _int_parameter(model_name, params, "execution_mode", 0)
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if mode == 1 else ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = _int_parameter(model_name, params, "enable_mem_arena", 1) != 0
    options.enable_mem_pattern = _int_parameter(model_name, params, "enable_mem_pattern", 1) != 0
    level = config.optimization.graph.level
    options.graph_optimization_level = {-1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}.get(
                                            level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for key, value in params.items():
        if key.startswith("session."):
            options.add_session_config_entry(key, value)
    options.log_severity_level = 3  # errors only
    return options


def open_session(ort, path: str, options, providers: list, model_name: str):
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for bad files and graphs
        raise ModelLoadError(f"model '{model_name}': onnxruntime cannot load {path}: {e}") from None


def complete_config(config, model_inputs: list[ModelTensor], model_outputs: list[ModelTensor]):
    """A copy of ``config`` auto-completed as Triton's onnxruntime backend does (see the module doc)."""
    completed = type(config)()
    completed.CopyFrom(config)
    completed.platform = completed.platform or PLATFORM
    completed.backend = completed.backend or BACKEND
    if completed.max_batch_size == 0 and _batching_possible(config, model_inputs, model_outputs):
        completed.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        if not (completed.HasField("sequence_batching") or completed.HasField("ensemble_scheduling")):
            completed.dynamic_batching.SetInParent()
    skip = 1 if completed.max_batch_size > 0 else 0
    for entries, tensors in ((completed.input, model_inputs), (completed.output, model_outputs)):
        if len(entries) == 0:
            for tensor in tensors:
                if tensor.type is None:
                    continue  # an input: validate() names it; an output: not served
                entry = entries.add(name=tensor.name, data_type=tensor.type.config_value)
                entry.dims.extend(tensor.shape[skip:])
    return completed


def _batching_possible(config, model_inputs: list[ModelTensor], model_outputs: list[ModelTensor]) -> bool:
    """Every model tensor has a dynamic first dim, and no tensor the config lists includes that dim in its
    dims (a config that spells out the batch dim with max_batch_size 0 does not batch)."""
    tensors = model_inputs + model_outputs
    if not tensors or any(not t.shape or t.shape[0] != -1 for t in tensors):
        return False
    ranks = {t.name: len(t.shape) for t in tensors}
    listed = [e for e in (*config.input, *config.output) if e.name in ranks and not e.HasField("reshape")]
    return all(len(e.dims) == ranks[e.name] - 1 for e in listed)


def validate(model_name: str, config, inputs: Mapping[str, TensorSpec], outputs: Mapping[str, TensorSpec],
             model_inputs: list[ModelTensor], model_outputs: list[ModelTensor]) -> None:
    """ModelLoadError for each way the config and the ONNX model disagree (the first found)."""
    by_name = {t.name: t for t in model_inputs}
    unsupported = [t for t in model_inputs if t.type is None]
    if unsupported:
        raise ModelLoadError(f"model '{model_name}': input '{unsupported[0].name}' has ONNX type "
                             f"{unsupported[0].ort_type}, which has no Triton data type")
    missing = [n for n in by_name if n not in inputs]
    if missing:
        raise ModelLoadError(f"model '{model_name}': the ONNX model's input(s) {missing} are not in the "
                             f"configuration (it lists {list(inputs)}); add them, or list no inputs to have "
                             f"them auto-completed")
    outputs_by_name = {t.name: t for t in model_outputs}
    for kind, specs, tensors in (("input", inputs, by_name), ("output", outputs, outputs_by_name)):
        for name, spec in specs.items():
            tensor = tensors.get(name)
            if tensor is None:
                raise ModelLoadError(f"model '{model_name}': configuration {kind} '{name}' is not an {kind} of "
                                     f"the ONNX model (its {kind}s: {list(tensors)})")
            if tensor.type is None:
                raise ModelLoadError(f"model '{model_name}': {kind} '{name}' has ONNX type {tensor.ort_type}, "
                                     f"which has no Triton data type")
            if tensor.type != spec.type:
                raise ModelLoadError(f"unable to load model '{model_name}', configuration expects datatype "
                                     f"{spec.type.config_name} for {kind} '{name}', model provides "
                                     f"{tensor.type.config_name}")
            if kind == "output" and spec.type.v2_name == "BF16":
                raise ModelLoadError(f"model '{model_name}': output '{name}' is BF16, which onnxruntime's "
                                     f"Python API cannot return; cast it to FP32 in the graph")
            _check_dims(model_name, config.max_batch_size, spec, tensor)


def _check_dims(model_name: str, max_batch_size: int, spec: TensorSpec, tensor: ModelTensor) -> None:
    shape = tensor.shape
    if max_batch_size > 0:
        if not shape or shape[0] != -1:
            raise ModelLoadError(
                f"model '{model_name}': max_batch_size is {max_batch_size} but tensor '{spec.name}' has shape "
                f"{list(shape)} in the ONNX model, whose first (batch) dim is not dynamic; export it with a "
                f"dynamic batch axis, or set max_batch_size: 0 and give the full dims")
        shape = shape[1:]
    same_rank = len(shape) == len(spec.model_dims)
    if not same_rank or any(m != -1 and c != -1 and m != c for m, c in zip(shape, spec.model_dims)):
        raise ModelLoadError(f"model '{model_name}', tensor '{spec.name}': the model expects dims {list(shape)} "
                             f"but the model configuration specifies dims {list(spec.model_dims)}")


class OnnxRuntimeBackend(Backend):
    """One onnxruntime session per instance (see the module doc)."""

    def __init__(self, config, version_dir: str, instance_index: int):
        ort = _import_ort()
        name = model_name_of(config, version_dir)
        path = model_path(config, version_dir)
        instances = instance_specs(config)
        instance = instances[instance_index] if 0 <= instance_index < len(instances) else instances[0]
        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        device = resolve_device(name, instance, cuda, "onnxruntime (no CUDAExecutionProvider)")
        providers = ([("CUDAExecutionProvider", {"device_id": instance.device_id})] if device == "GPU"
                     else []) + ["CPUExecutionProvider"]
        options = session_options(ort, config, name, len(instances))
        self._ort = ort
        self._session = open_session(ort, path, options, providers, name)
        model_inputs = _model_tensors(self._session.get_inputs())
        model_outputs = _model_tensors(self._session.get_outputs())
        completed = complete_config(config, model_inputs, model_outputs)
        super().__init__(completed, version_dir, instance_index)
        validate(self.name, completed, self.inputs, self.outputs, model_inputs, model_outputs)
        logger.info("model '%s' instance '%s': onnxruntime session on %s, %d intra-op thread(s)", self.name,
                    self.instance.name, device, options.intra_op_num_threads)

    @classmethod
    def auto_complete(cls, config, version_dir: str):
        ort = _import_ort()
        name = model_name_of(config, version_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = open_session(ort, model_path(config, version_dir), options, ["CPUExecutionProvider"], name)
        return complete_config(config, _model_tensors(session.get_inputs()), _model_tensors(session.get_outputs()))

    def execute(self, inputs: Mapping[str, np.ndarray],
                output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        if self._session is None:
            raise ModelExecutionError(f"model '{self.name}' instance '{self.instance.name}' was finalized",
                                      "UNAVAILABLE")
        arrays, batch, names = self.check_request(inputs, output_names)
        feed = {name: self._to_ort(self.inputs[name], array, batch) for name, array in arrays.items()}
        try:
            results = self._session.run(names, feed)
        except Exception as e:  # onnxruntime's own error types (bad dims, kernel failures)
            raise ModelExecutionError(f"onnxruntime failed to run model '{self.name}': {e}") from None
        return {name: self._from_ort(self.outputs[name], result, batch) for name, result in zip(names, results)}

    def _to_ort(self, spec: TensorSpec, array: np.ndarray, batch: int | None):
        array = to_model_shape(array, spec, batch)
        if spec.type.is_bytes:
            try:
                text = [b.decode("utf-8") for b in array.reshape(-1)]
            except UnicodeDecodeError:
                raise InvalidRequestError(f"input '{spec.name}' of model '{self.name}' holds bytes that are not "
                                          f"utf-8; onnxruntime string tensors hold text", param=spec.name) from None
            return np.array(text, dtype=np.object_).reshape(array.shape)
        if spec.type.v2_name == "BF16":
            return self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(array).view(np.uint16), onnx_element_type=_ONNX_BFLOAT16)
        return array

    def _from_ort(self, spec: TensorSpec, result: np.ndarray, batch: int | None) -> np.ndarray:
        if spec.type.is_bytes:
            result = dtypes.as_bytes_array(result)
        return from_model_shape(result, spec, batch, self.name)

    def finalize(self) -> None:
        self._session = None

