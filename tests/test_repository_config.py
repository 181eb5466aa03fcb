"""Model configuration of the Triton-style repository: config.pbtxt and config.yaml into tritonclient's
ModelConfig, Triton's defaults, and validation with clear (Triton's) messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from flotilla.repository import (
    ModelConfigError, instance_count, load_model_config, parse_model_config, read_model_config,
)

SIMPLE_PBTXT = """
name: "simple"
backend: "onnxruntime"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "TOKENS" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true }
]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  default_queue_policy { max_queue_size: 32 timeout_action: DELAY default_timeout_microseconds: 5000 }
}
instance_group [ { count: 3 kind: KIND_CPU } ]
"""

SIMPLE_YAML = """
name: simple
backend: onnxruntime
max_batch_size: 8
input:
  - {name: INPUT0, data_type: TYPE_FP32, dims: [16]}
  - {name: TOKENS, data_type: TYPE_INT64, dims: [-1], allow_ragged_batch: true}
output:
  - {name: OUTPUT0, data_type: TYPE_FP32, dims: [16]}
dynamic_batching:
  preferred_batch_size: [4, 8]
  max_queue_delay_microseconds: 100
  default_queue_policy: {max_queue_size: 32, timeout_action: DELAY, default_timeout_microseconds: 5000}
instance_group: [{count: 3, kind: KIND_CPU}]
"""


def make_model(repo: Path, name: str, config: str | None = None, *, fmt: str = "pbtxt",
               versions: dict[int, str] | None = None) -> Path:
    """A model directory: ``config`` in config.pbtxt / config.yaml, version dirs with the named file."""
    model = repo / name
    model.mkdir(parents=True)
    if config is not None:
        (model / ("config.pbtxt" if fmt == "pbtxt" else "config.yaml")).write_text(config)
    for version, filename in (versions if versions is not None else {1: "model.onnx"}).items():
        (model / str(version)).mkdir()
        (model / str(version) / filename).write_bytes(b"weights")
    return model


def test_pbtxt_and_yaml_give_the_same_config(tmp_path):
    a = load_model_config(make_model(tmp_path / "a", "simple", SIMPLE_PBTXT))
    b = load_model_config(make_model(tmp_path / "b", "simple", SIMPLE_YAML, fmt="yaml"))
    assert isinstance(a, mc.ModelConfig)
    assert a == b
    assert a.input[1].allow_ragged_batch and a.input[0].data_type == mc.TYPE_FP32
    assert list(a.dynamic_batching.preferred_batch_size) == [4, 8]
    assert a.dynamic_batching.default_queue_policy.timeout_action == mc.ModelQueuePolicy.DELAY
    assert a.platform == "onnxruntime_onnx" and a.default_model_filename == "model.onnx"
    assert instance_count(a) == 3


def test_yaml_accepts_camel_case_keys_like_json_format(tmp_path):
    text = SIMPLE_YAML.replace("max_batch_size", "maxBatchSize").replace("data_type", "dataType")
    config = load_model_config(make_model(tmp_path, "simple", text, fmt="yaml"))
    assert config.max_batch_size == 8 and config.input[0].data_type == mc.TYPE_FP32


@pytest.mark.parametrize("filename, backend, platform, default", [
    ("model.onnx", "onnxruntime", "onnxruntime_onnx", "model.onnx"),
    ("model.pt", "pytorch", "pytorch_libtorch", "model.pt"),
    ("model.pt2", "pytorch", "torch_aoti", "model.pt2"),
    ("model.py", "python", "", "model.py"),
])
def test_triton_fills_name_backend_platform_from_the_directory(tmp_path, filename, backend, platform, default):
    config = load_model_config(make_model(tmp_path, "mymodel", 'max_batch_size: 4', versions={1: filename}))
    assert (config.name, config.backend, config.platform, config.default_model_filename) == (
        "mymodel", backend, platform, default)
    assert config.version_policy.latest.num_versions == 1          # Triton's default policy: latest 1
    assert len(config.instance_group) == 1
    group = config.instance_group[0]
    assert group.kind == mc.ModelInstanceGroup.KIND_CPU and group.name == "mymodel"
    assert group.count == (2 if backend == "onnxruntime" else 1)     # Triton's SetDefaultInstanceCount


def test_no_config_file_is_an_auto_completed_config(tmp_path):
    config = load_model_config(make_model(tmp_path, "bare", None, versions={3: "model.py"}))
    assert config.name == "bare" and config.backend == "python"


def test_dynamic_batching_defaults_preferred_to_max_batch_size(tmp_path):
    config = load_model_config(make_model(tmp_path, "m", "max_batch_size: 16 dynamic_batching { }"))
    assert list(config.dynamic_batching.preferred_batch_size) == [16]


def test_platform_alone_selects_the_backend(tmp_path):
    config = load_model_config(make_model(tmp_path, "m", 'platform: "pytorch_libtorch"', versions={1: "x.bin"}))
    assert config.backend == "pytorch" and config.default_model_filename == "model.pt"


def test_instance_groups_sum_and_kind_gpu_needs_gpus(tmp_path):
    text = 'backend: "python" instance_group [ { count: 2 }, { count: 3 kind: KIND_CPU } ]'
    config = load_model_config(make_model(tmp_path, "m", text, versions={1: "model.py"}))
    assert [g.name for g in config.instance_group] == ["m_0", "m_1"]
    assert instance_count(config) == 5
    gpu = 'backend: "python" instance_group [ { count: 2 kind: KIND_GPU } ]'
    with pytest.raises(ModelConfigError, match="has kind KIND_GPU but no GPUs are available"):
        load_model_config(make_model(tmp_path, "g", gpu, versions={1: "model.py"}))
    on_gpus = load_model_config(tmp_path / "g", gpu_count=2)
    assert list(on_gpus.instance_group[0].gpus) == [0, 1] and instance_count(on_gpus) == 4


BAD_CONFIGS = [
    ('name: "other"', "unexpected directory name 'm' for model 'other', directory name must equal model name"),
    ('max_batch_size: -1', "'max_batch_size' must be non-negative value for m"),
    ('input [ { data_type: TYPE_FP32 dims: [ 1 ] } ]', "model input must specify 'name' for m"),
    ('input [ { name: "x" dims: [ 1 ] } ]', "model input 'x' must specify 'data_type' for m"),
    ('input [ { name: "x" data_type: TYPE_FP32 } ]', "model input 'x' must specify 'dims' for m"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 0 ] } ]',
     "model input 'x' dimension must be integer >= 1, or -1 to indicate a variable-size dimension for m"),
    ('output [ { name: "y" data_type: TYPE_FP32 dims: [ -2 ] } ]', "model output 'y' dimension must be integer"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape { shape: [ 5 ] } } ]',
     "model input 'x' has different size for dims and reshape"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] }, { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]',
     "model input 'x' is specified more than once"),
    ('max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 8 ] }',
     "dynamic batching preferred size must be <= max batch size for m"),
    ('max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 0 ] }',
     "dynamic batching preferred size must be positive for m"),
    ('max_batch_size: 4 dynamic_batching { priority_levels: 2 default_priority_level: 3 }',
     r"default priority level must be in range \[1, 2\] for m"),
    ('max_batch_size: 4 dynamic_batching { priority_levels: 2 default_priority_level: 1 '
     'priority_queue_policy { key: 5 value { max_queue_size: 1 } } }',
     r"priority queue policy must have priority level in range \[1, 2\] for m"),
    ('max_batch_size: 4 dynamic_batching { preserve_ordering: true priority_levels: 2 default_priority_level: 1 }',
     "Only one priority level is allowed when 'preserve_ordering' is true for m"),
    ('max_batch_size: 4 dynamic_batching { preserve_ordering: true default_queue_policy { timeout_action: DELAY '
     'default_timeout_microseconds: 10 } }', "Queue policy can not have DELAY as timeout action"),
    ('version_policy { latest { num_versions: 0 } }', "'num_versions' must be >= 1 for m"),
    ('backend: "tensorrt"', "backend 'tensorrt' is not supported by flotilla"),
    ('platform: "tensorflow_savedmodel"', "backend 'tensorflow' is not supported by flotilla"),
    ('platform: "no_such_platform"', "unexpected platform type 'no_such_platform' for m"),
    ('backend: "onnxruntime" platform: "pytorch_libtorch"', "unexpected 'platform' and 'backend' pair"),
    ('platform: "ensemble"', "ensemble scheduling must be set for ensemble m"),
    ('platform: "ensemble" backend: "python"', "must have platform type 'ensemble' and empty backend type"),
    ('sequence_batching { }', "flotilla does not support 'sequence_batching'"),
    ('model_transaction_policy { decoupled: true }', "flotilla does not support 'model_transaction_policy"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ] batch_input [ { kind: BATCH_ELEMENT_COUNT '
     'target_name: "n" data_type: TYPE_INT32 source_input: "x" } ]', "flotilla does not support 'batch_input'"),
    ('instance_group [ { count: 1 kind: KIND_CPU gpus: [ 0 ] } ]', "has kind KIND_CPU but specifies one or more GPUs"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_bad_configs_fail_with_a_clear_message(tmp_path, text, message):
    model = make_model(tmp_path, "m", text)
    with pytest.raises(ModelConfigError, match=message):
        load_model_config(model)


def test_no_backend_and_nothing_to_infer_it_from(tmp_path):
    with pytest.raises(ModelConfigError, match="must specify 'platform' or 'backend' for 'm'"):
        load_model_config(make_model(tmp_path, "m", "max_batch_size: 1", versions={1: "weights.bin"}))


def test_a_foreign_model_file_names_its_backend(tmp_path):
    with pytest.raises(ModelConfigError, match="backend 'tensorrt' is not supported"):
        load_model_config(make_model(tmp_path, "m", None, versions={1: "model.plan"}))


def test_a_bad_dtype_name_lists_the_valid_ones(tmp_path):
    model = make_model(tmp_path, "m", 'input [ { name: "x"\n data_type: TYPE_FLOAT32 dims: [ 1 ] } ]')
    with pytest.raises(ModelConfigError) as info:
        load_model_config(model)
    message = str(info.value)
    assert "config.pbtxt:2:" in message and "TYPE_FLOAT32" in message and "TYPE_FP32" in message
    yaml_model = make_model(tmp_path, "y", "input: [{name: x, data_type: FLOAT, dims: [1]}]", fmt="yaml")
    with pytest.raises(ModelConfigError, match=r"config.yaml.*FLOAT.*valid data types: .*TYPE_BF16"):
        load_model_config(yaml_model)


def test_unknown_fields_and_malformed_files(tmp_path):
    with pytest.raises(ModelConfigError, match='has no field named "inputs"'):
        load_model_config(make_model(tmp_path, "a", "inputs: []", fmt="yaml"))
    with pytest.raises(ModelConfigError, match="config.yaml: the configuration must be a mapping"):
        load_model_config(make_model(tmp_path, "b", "- 1\n- 2", fmt="yaml"))
    with pytest.raises(ModelConfigError, match="config.pbtxt:1:"):
        load_model_config(make_model(tmp_path, "c", "max_batch_size: {"))
    both = make_model(tmp_path, "d", "max_batch_size: 1")
    (both / "config.yaml").write_text("max_batch_size: 1")
    with pytest.raises(ModelConfigError, match="both config.pbtxt and config.yaml exist"):
        read_model_config(both)


def test_json_override_as_triton_load_api_passes_it(tmp_path):
    model = make_model(tmp_path, "m", SIMPLE_PBTXT.replace('"simple"', '"m"'))
    override = parse_model_config('{"max_batch_size": 2, "backend": "onnxruntime"}', "json")
    config = load_model_config(model, override=override)
    assert config.max_batch_size == 2 and not config.input and config.name == "m"


def test_reshape_with_variable_dims_and_empty_reshape(tmp_path):
    text = """max_batch_size: 4
    input [ { name: "a" data_type: TYPE_FP32 dims: [ 2, 4, -1, 6 ] reshape { shape: [ 8, -1, 1, 6 ] } },
            { name: "s" data_type: TYPE_INT32 dims: [ 1 ] reshape { shape: [ ] } } ]"""
    config = load_model_config(make_model(tmp_path, "m", text))
    assert list(config.input[0].reshape.shape) == [8, -1, 1, 6]


def test_the_normalised_config_round_trips_through_text_format(tmp_path):
    config = load_model_config(make_model(tmp_path, "simple", SIMPLE_PBTXT))
    again = text_format.Parse(text_format.MessageToString(config), mc.ModelConfig())
    assert again == config
