"""Triton model configuration: ``REPO/<model>/config.pbtxt`` (or ``config.yaml``) -> a validated ``ModelConfig``.

The message type is the ``inference.ModelConfig`` that tritonclient ships (``tritonclient.grpc.model_config_pb2``),
so a Triton repository loads unchanged and the KServe layer can hand the same message to Triton's clients.

Contract of ``load_model_config(model_dir)``:
- reads ``config.pbtxt`` (protobuf text format) or ``config.yaml`` (the same fields as YAML, through
  ``json_format.ParseDict``; snake_case or lowerCamelCase keys); both present is an error; neither is allowed
  (an empty config that Triton's auto-completion fills);
- fills what Triton fills (``AutoCompleteBackendFields`` + ``NormalizeModelConfig`` + ``NormalizeInstanceGroup``):
  ``name`` from the directory, ``backend``/``platform``/``default_model_filename`` from the model file in the
  first version directory (model.onnx -> onnxruntime, model.pt -> pytorch, model.pt2 -> pytorch/torch_aoti,
  model.py -> python), ``version_policy`` latest 1, ``preferred_batch_size`` [max_batch_size] when dynamic
  batching is on, one instance group (count 1; 2 for onnxruntime on CPU, as Triton), KIND_AUTO resolved;
- validates with Triton's messages (``ValidateModelConfig`` / ``ValidateModelIOConfig`` /
  ``ValidateInstanceGroup``) and rejects, naming the field, every feature flotilla does not run (sequence
  batching, batch inputs, decoupled models, response cache, warmup, ...) instead of silently ignoring it;
- raises ``ModelConfigError`` with the file, model and field in the message; never returns a half-valid config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Collection

import yaml
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from flotilla.repository.errors import ModelConfigError

ModelConfig = mc.ModelConfig

CONFIG_PBTXT = "config.pbtxt"
CONFIG_YAML = "config.yaml"
ENSEMBLE_PLATFORM = "ensemble"
WILDCARD_DIM = -1

# backend -> (platforms it answers to, default model file per platform); Triton's constants.h.
_BACKEND_PLATFORMS = {
    "onnxruntime": {"onnxruntime_onnx": "model.onnx"},
    "pytorch": {"pytorch_libtorch": "model.pt", "libtorch": "model.pt", "torch_aoti": "model.pt2"},
    "python": {"": "model.py"},
}
SUPPORTED_BACKENDS = frozenset(_BACKEND_PLATFORMS)
# model file in a version directory -> (backend, platform) Triton infers from it.
_MODEL_FILES = {
    "model.onnx": ("onnxruntime", "onnxruntime_onnx"),
    "model.pt": ("pytorch", "pytorch_libtorch"),
    "model.pt2": ("pytorch", "torch_aoti"),
    "model.py": ("python", ""),
}
# Triton backends and platforms flotilla does not run (named so the error says what the model needs).
_FOREIGN_PLATFORMS = {
    "tensorrt_plan": "tensorrt", "tensorflow_graphdef": "tensorflow", "tensorflow_savedmodel": "tensorflow",
}
_FOREIGN_FILES = {"model.plan": "tensorrt", "model.graphdef": "tensorflow", "model.savedmodel": "tensorflow",
                  "model.xml": "openvino"}
# Sub-directories of a model directory that are never versions (Triton's kWarmupDataFolder & co.).
NON_VERSION_DIRS = frozenset({"warmup", "initial_state", "configs"})

DATA_TYPE_NAMES = tuple(v.name for v in mc.DataType.DESCRIPTOR.values if v.name != "TYPE_INVALID")


# ----------------------------------------------------------------------------------------------- parsing

def parse_model_config(text: str, fmt: str = "pbtxt", source: str = "<config>") -> ModelConfig:
    """Parse one configuration text. ``fmt``: "pbtxt" (protobuf text format), "yaml" or "json" (the JSON
    that Triton's load API accepts as a config override). Raises ModelConfigError naming ``source``, the
    line and column (pbtxt) or the field path (yaml/json), with the valid DataType names on a bad dtype."""
    config = ModelConfig()
    try:
        if fmt == "pbtxt":
            text_format.Parse(text, config)
        elif fmt in ("yaml", "json"):
            data = _load_mapping(text, fmt, source)
            json_format.ParseDict(data, config)
        else:
            raise ValueError(f"unknown config format {fmt!r} (pbtxt, yaml, json)")
    except (text_format.ParseError, json_format.ParseError) as e:
        where, message = source, str(e)
        if isinstance(e, text_format.ParseError) and e.GetLine() is not None:
            where = f"{source}:{e.GetLine()}:{e.GetColumn()}"
            message = message.split(" : ", 1)[-1]
        hint = " (valid data types: " + ", ".join(DATA_TYPE_NAMES) + ")" if "DataType" in message else ""
        raise ModelConfigError(f"{where}: {message}{hint}") from None
    return config


def _load_mapping(text: str, fmt: str, source: str) -> dict:
    import json
    try:
        data = yaml.safe_load(text) if fmt == "yaml" else json.loads(text)
    except (yaml.YAMLError, ValueError) as e:
        raise ModelConfigError(f"{source}: not valid {fmt.upper()}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ModelConfigError(f"{source}: the configuration must be a mapping of ModelConfig fields, "
                               f"got {type(data).__name__}")
    return data


def read_model_config(model_dir: Path | str) -> ModelConfig:
    """The configuration as written in ``model_dir`` (no defaults filled): config.pbtxt or config.yaml; an
    empty ModelConfig when there is neither (Triton auto-completes such models)."""
    model_dir = Path(model_dir)
    pbtxt, yml = model_dir / CONFIG_PBTXT, model_dir / CONFIG_YAML
    if pbtxt.is_file() and yml.is_file():
        raise ModelConfigError(f"{model_dir}: both {CONFIG_PBTXT} and {CONFIG_YAML} exist; keep one")
    for path, fmt in ((pbtxt, "pbtxt"), (yml, "yaml")):
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ModelConfigError(f"{path}: cannot read: {e}") from None
            return parse_model_config(text, fmt, source=str(path))
    return ModelConfig()


def load_model_config(model_dir: Path | str, *, gpu_count: int = 0,
                      backends: Collection[str] = SUPPORTED_BACKENDS,
                      override: ModelConfig | None = None) -> ModelConfig:
    """Read, auto-complete, normalise and validate the configuration of the model in ``model_dir``.
    ``override`` replaces the file's configuration (Triton's load API with a ``config`` parameter).
    ``gpu_count`` resolves KIND_AUTO instance groups (0: CPU). Raises ModelConfigError."""
    model_dir = Path(model_dir)
    config = ModelConfig()
    config.CopyFrom(override if override is not None else read_model_config(model_dir))
    autocomplete(config, model_dir)
    if config.name != model_dir.name:
        raise ModelConfigError(f"unexpected directory name '{model_dir.name}' for model '{config.name}', "
                               "directory name must equal model name")
    normalize(config, gpu_count=gpu_count)
    validate_model_config(config, backends=backends, gpu_count=gpu_count)
    return config


# ------------------------------------------------------------------------------------------ auto-complete

def version_dirs(model_dir: Path) -> list[Path]:
    """The version directories of a model: sub-directories named by an integer >= 0 without leading zeros
    (Triton ignores others, and warmup/, initial_state/, configs/), sorted by version number."""
    found = []
    if model_dir.is_dir():
        for child in model_dir.iterdir():
            name = child.name
            if (child.is_dir() and name.isascii() and name.isdigit() and name not in NON_VERSION_DIRS
                    and (name == "0" or not name.startswith("0"))):
                found.append(child)
    return sorted(found, key=lambda p: int(p.name))


def autocomplete(config: ModelConfig, model_dir: Path) -> None:
    """Fill name, backend, platform and default_model_filename as Triton's AutoCompleteBackendFields does,
    looking at the first version directory for a model file when the config names neither."""
    if not config.name:
        config.name = model_dir.name
    if config.platform == ENSEMBLE_PLATFORM:
        return
    if not config.backend:
        if config.platform:
            config.backend = _backend_of_platform(config.platform, config.name)
        elif config.default_model_filename in _MODEL_FILES:
            config.backend, config.platform = _MODEL_FILES[config.default_model_filename]
        elif not config.default_model_filename:
            versions = version_dirs(model_dir)
            contents = {p.name for p in versions[0].iterdir()} if versions else set()
            for filename, (backend, platform) in _MODEL_FILES.items():
                if filename in contents:
                    config.backend, config.platform = backend, platform
                    break
            else:
                foreign = sorted(_FOREIGN_FILES[f] for f in contents & set(_FOREIGN_FILES))
                if foreign:
                    config.backend = foreign[0]
    platforms = _BACKEND_PLATFORMS.get(config.backend)
    if platforms is None:
        return
    if not config.platform:           # Triton's default platform of the backend (pytorch: libtorch)
        config.platform = next(iter(platforms))
    if not config.default_model_filename and config.platform in platforms:
        config.default_model_filename = platforms[config.platform]


def _backend_of_platform(platform: str, name: str) -> str:
    for backend, platforms in _BACKEND_PLATFORMS.items():
        if platform in platforms:
            return backend
    if platform in _FOREIGN_PLATFORMS:
        return _FOREIGN_PLATFORMS[platform]
    raise ModelConfigError(f"unexpected platform type '{platform}' for {name}")


# -------------------------------------------------------------------------------------------- normalise

def default_instance_count(backend: str, kind: int) -> int:
    """Triton's SetDefaultInstanceCount: 2 for onnxruntime (and tensorflow) on CPU, else 1."""
    return 2 if kind == mc.ModelInstanceGroup.KIND_CPU and backend in ("onnxruntime", "tensorflow") else 1


def normalize(config: ModelConfig, *, gpu_count: int = 0) -> None:
    """Triton's NormalizeModelConfig and NormalizeInstanceGroup (without GPU preference lists)."""
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    if config.HasField("dynamic_batching") and not config.dynamic_batching.preferred_batch_size:
        if config.max_batch_size > 0:
            config.dynamic_batching.preferred_batch_size.append(config.max_batch_size)
    if config.HasField("ensemble_scheduling") or config.platform == ENSEMBLE_PLATFORM:
        return
    if not config.optimization.HasField("input_pinned_memory"):
        config.optimization.input_pinned_memory.enable = True
    if not config.optimization.HasField("output_pinned_memory"):
        config.optimization.output_pinned_memory.enable = True
    if not config.instance_group:
        config.instance_group.add().name = config.name
    for i, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{i}"
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
            usable = gpu_count > 0 and all(0 <= g < gpu_count for g in group.gpus)
            group.kind = mc.ModelInstanceGroup.KIND_GPU if usable else mc.ModelInstanceGroup.KIND_CPU
        if group.count < 1:
            group.count = default_instance_count(config.backend, group.kind)
        if group.kind == mc.ModelInstanceGroup.KIND_GPU and not group.gpus:
            group.gpus.extend(range(gpu_count))


def instance_count(config: ModelConfig) -> int:
    """How many executors of the model run concurrently: the sum of its (normalised) instance groups'
    counts, times the GPUs listed for GPU groups (Triton creates ``count`` instances per listed GPU)."""
    total = 0
    for group in config.instance_group:
        per = max(group.count, 1)
        total += per * len(group.gpus) if group.kind == mc.ModelInstanceGroup.KIND_GPU and group.gpus else per
    return max(total, 1)


# --------------------------------------------------------------------------------------------- validate

# Fields flotilla does not run: setting them is an error that names them (never accepted and ignored).
_UNSUPPORTED_MESSAGES = (("sequence_batching", "stateful models (sequence batching)"),
                         ("model_repository_agents", "repository agents"),
                         ("model_operations", "model operations (op libraries)"),
                         ("model_metrics", "custom metric histograms"))


def _unsupported_fields(config: ModelConfig) -> list[str]:
    found = [f"'{field}' ({what})" for field, what in _UNSUPPORTED_MESSAGES if config.HasField(field)]
    if config.model_warmup:
        found.append("'model_warmup' (model warmup)")
    if config.metric_tags:
        found.append("'metric_tags' (extra metric labels)")
    if config.batch_input:
        found.append("'batch_input' (flotilla pads ragged inputs instead)")
    for out in config.batch_output:
        if out.kind != mc.BatchOutput.BATCH_SCATTER_WITH_INPUT_SHAPE:
            found.append(f"'batch_output' kind {mc.BatchOutput.Kind.Name(out.kind)}")
    if config.model_transaction_policy.decoupled:
        found.append("'model_transaction_policy { decoupled: true }' (decoupled models)")
    if config.response_cache.enable:
        found.append("'response_cache' (the response cache)")
    if config.cc_model_filenames:
        found.append("'cc_model_filenames' (per-GPU model files)")
    for group in config.instance_group:
        if group.HasField("rate_limiter"):
            found.append(f"'rate_limiter' of instance group '{group.name}'")
        if group.secondary_devices:
            found.append(f"'secondary_devices' of instance group '{group.name}'")
    return found


def validate_model_config(config: ModelConfig, *, backends: Collection[str] = SUPPORTED_BACKENDS,
                          gpu_count: int = 0) -> None:
    """Raise ModelConfigError (Triton's message where Triton has one) unless ``config`` is a normalised
    configuration that flotilla can serve."""
    name = config.name
    if not name:
        raise ModelConfigError("model configuration must specify 'name'")
    _validate_platform(config, backends)
    unsupported = _unsupported_fields(config)
    if unsupported:
        raise ModelConfigError(f"model '{name}': flotilla does not support " + "; ".join(unsupported))
    if config.max_batch_size < 0:
        raise ModelConfigError(f"'max_batch_size' must be non-negative value for {name}")
    _validate_version_policy(config)
    if config.HasField("dynamic_batching"):
        _validate_dynamic_batching(config)
    if config.platform == ENSEMBLE_PLATFORM and not config.HasField("ensemble_scheduling"):
        raise ModelConfigError(f"ensemble scheduling must be set for ensemble {name} whose platform is "
                               f"{ENSEMBLE_PLATFORM}")
    if config.HasField("ensemble_scheduling") and config.platform != ENSEMBLE_PLATFORM:
        raise ModelConfigError(f"model '{name}': 'ensemble_scheduling' requires platform '{ENSEMBLE_PLATFORM}'")
    _validate_io(config)
    if config.platform != ENSEMBLE_PLATFORM:
        _validate_instance_groups(config, gpu_count)


def _validate_platform(config: ModelConfig, backends: Collection[str]) -> None:
    name = config.name
    if config.platform == ENSEMBLE_PLATFORM:
        if config.backend:
            raise ModelConfigError(f"Ensemble model '{name}' must have platform type '{config.platform}' "
                                   "and empty backend type")
        return
    if not config.backend and not config.platform:
        raise ModelConfigError(
            f"must specify 'platform' or 'backend' for '{name}' (or put model.onnx, model.pt, model.pt2 or "
            "model.py in a version directory so they can be inferred)")
    if not config.backend:
        raise ModelConfigError(f"unexpected platform type '{config.platform}' for {name}")
    if config.backend not in backends:
        raise ModelConfigError(f"model '{name}': backend '{config.backend}' is not supported by flotilla "
                               f"(supported: {', '.join(sorted(backends))}, and platform '{ENSEMBLE_PLATFORM}')")
    platforms = _BACKEND_PLATFORMS.get(config.backend, {})
    if config.platform and platforms and config.platform not in platforms:
        raise ModelConfigError(f"unexpected 'platform' and 'backend' pair, got:{config.platform}, "
                               f"{config.backend}")


def _validate_version_policy(config: ModelConfig) -> None:
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which is None:
        raise ModelConfigError(f"must specify 'version policy' for {config.name}")
    if which == "latest" and policy.latest.num_versions < 1:
        raise ModelConfigError(f"version_policy latest: 'num_versions' must be >= 1 for {config.name}")
    if which == "specific":
        if not policy.specific.versions:
            raise ModelConfigError(f"version_policy specific: list at least one version for {config.name}")
        if any(v < 0 for v in policy.specific.versions):
            raise ModelConfigError(f"version_policy specific: versions must be >= 0 for {config.name}")


def _validate_dynamic_batching(config: ModelConfig) -> None:
    name, db = config.name, config.dynamic_batching
    for size in db.preferred_batch_size:
        if size <= 0:
            raise ModelConfigError(f"dynamic batching preferred size must be positive for {name}")
        if size > config.max_batch_size:
            raise ModelConfigError(f"dynamic batching preferred size must be <= max batch size for {name}")
    levels = db.priority_levels
    if levels != 0:
        if db.default_priority_level == 0 or db.default_priority_level > levels:
            raise ModelConfigError(f"default priority level must be in range [1, {levels}] for {name}")
        for level in db.priority_queue_policy:
            if level == 0 or level > levels:
                raise ModelConfigError(
                    f"priority queue policy must have priority level in range [1, {levels}] for {name}")
    elif db.default_priority_level != 0 or db.priority_queue_policy:
        raise ModelConfigError(f"'default_priority_level' and 'priority_queue_policy' need 'priority_levels' "
                               f"> 0 for {name}")
    if db.preserve_ordering:
        if levels > 1:
            raise ModelConfigError(
                f"Only one priority level is allowed when 'preserve_ordering' is true for {name}")
        policies = [db.default_queue_policy, *db.priority_queue_policy.values()]
        if any(p.default_timeout_microseconds != 0 and p.timeout_action == mc.ModelQueuePolicy.DELAY
               for p in policies):
            raise ModelConfigError(
                f"Queue policy can not have DELAY as timeout action when 'preserve_ordering' is true for {name}")


def _validate_io(config: ModelConfig) -> None:
    for kind, ios in (("input", config.input), ("output", config.output)):
        seen: set[str] = set()
        for io in ios:
            _validate_io_shape(io, kind, config)
            if io.name in seen:
                raise ModelConfigError(f"model {kind} '{io.name}' is specified more than once for {config.name}")
            seen.add(io.name)
        if kind == "input":
            for io in ios:
                if io.format in (mc.ModelInput.FORMAT_NHWC, mc.ModelInput.FORMAT_NCHW) and len(io.dims) != 3:
                    raise ModelConfigError(f"model input NHWC/NCHW require 3 dims for {config.name}")
    inputs = {io.name for io in config.input}
    outputs = {io.name: io for io in config.output}
    for bo in config.batch_output:
        if len(bo.source_input) != 1:
            raise ModelConfigError(f"batch output kind 'BATCH_SCATTER_WITH_INPUT_SHAPE' expects 1 source input, "
                                   f"got {len(bo.source_input)} for {config.name}")
        for src in bo.source_input:
            if src not in inputs:
                raise ModelConfigError(f"unknown source input name '{src}' for {config.name}")
        for target in bo.target_name:
            if target not in outputs:
                raise ModelConfigError(f"unknown target output name '{target}' for {config.name}")


def _validate_io_shape(io, kind: str, config: ModelConfig) -> None:
    prefix = f"model {kind} "
    suffix = f" for {config.name}"
    if not io.name:
        raise ModelConfigError(prefix + "must specify 'name'" + suffix)
    named = f"{prefix}'{io.name}' "
    if io.data_type == mc.TYPE_INVALID:
        raise ModelConfigError(named + "must specify 'data_type'" + suffix)
    if not io.dims:
        raise ModelConfigError(named + "must specify 'dims'" + suffix)
    if io.is_shape_tensor or io.is_non_linear_format_io:
        raise ModelConfigError(named + "shape tensors and non-linear IO formats are only supported for the "
                               "TensorRT platform" + suffix)
    if io.HasField("reshape") and not io.reshape.shape and config.max_batch_size == 0:
        raise ModelConfigError(named + "cannot have empty reshape for non-batching model as scalar tensors "
                               "are not supported" + suffix)
    for dim in io.dims:
        if dim < 1 and dim != WILDCARD_DIM:
            raise ModelConfigError(named + f"dimension must be integer >= 1, or {WILDCARD_DIM} to indicate a "
                                   "variable-size dimension" + suffix)
    if io.HasField("reshape"):
        _validate_reshape(io, named, suffix)


def _validate_reshape(io, named: str, suffix: str) -> None:
    for dim in io.reshape.shape:
        if dim < 1 and dim != WILDCARD_DIM:
            raise ModelConfigError(named + f"reshape dimensions must be integer >= 1, or {WILDCARD_DIM} to "
                                   "indicate a variable-size dimension" + suffix)

    def chunks(dims) -> list[int]:   # element counts between wildcards: [2, 4, -1, 6] -> [8, 6]
        out, cur = [], 1
        for d in dims:
            if d == WILDCARD_DIM:
                out.append(cur)
                cur = 1
            else:
                cur *= d
        return out + [cur]

    dims, reshape = list(io.dims), list(io.reshape.shape)
    if not reshape:          # empty reshape: a scalar per batch item, so dims must hold one element
        if WILDCARD_DIM in dims or math.prod(dims) != 1:
            raise ModelConfigError(named + "has different size for dims and reshape" + suffix)
        return
    a, b = chunks(dims), chunks(reshape)
    if len(a) != len(b):
        raise ModelConfigError(named + "has different number of variable-size dimensions for dims and reshape"
                               + suffix)
    if a != b:
        raise ModelConfigError(named + "has different size for dims and reshape" + suffix)


def _validate_instance_groups(config: ModelConfig, gpu_count: int) -> None:
    name = config.name
    if not config.instance_group:
        raise ModelConfigError(f"must specify one or more 'instance group's for {name}")
    for group in config.instance_group:
        where = f"instance group {group.name} of model {name}"
        if group.count < 1:
            raise ModelConfigError(f"{where} must have 'count' >= 1")
        if group.kind in (mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_MODEL) and group.gpus:
            kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
            raise ModelConfigError(f"{where} has kind {kind} but specifies one or more GPUs")
        if group.kind == mc.ModelInstanceGroup.KIND_GPU:
            if gpu_count == 0:
                raise ModelConfigError(f"{where} has kind KIND_GPU but no GPUs are available")
            bad = [g for g in group.gpus if not 0 <= g < gpu_count]
            if bad:
                raise ModelConfigError(f"{where} specifies invalid or unsupported gpu id {bad[0]}. "
                                       f"GPUs available: {', '.join(map(str, range(gpu_count)))}")
        if group.profile:
            raise ModelConfigError(f"{where} specifies profile field which is only supported for TensorRT models")
