"""The deployment file's pydantic schema (``flotilla.deploy.schema``): every number finite, closed sections
(``ray:`` included), null as the default, the ``engine:`` section derived from ``EngineArgs``. The messages
name the file and the key path, as in tests/test_deploy_config.py."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from flotilla.deploy.config import DeploymentConfigError, load_deployment_config
from flotilla.deploy.engine_args import ENGINE_KEYS_SET_ELSEWHERE
from flotilla.engine.arg_utils import EngineArgs
from flotilla.entrypoints.cli import main


def write(tmp_path, text: str, name: str = "deploy.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_error(tmp_path, text: str) -> DeploymentConfigError:
    path = write(tmp_path, text)
    with pytest.raises(DeploymentConfigError) as e:
        load_deployment_config(path)
    assert str(e.value).startswith(f"{path}: {e.value.key}: "), str(e.value)
    return e.value


M = "models: [{name: a, model: m, %s}]\n"
NON_FINITE = [
    (M % "engine: {kv_cache_memory: .nan}", "models[0].engine.kv_cache_memory", "nan"),
    (M % "engine: {kv_cache_memory: .inf}", "models[0].engine.kv_cache_memory", "inf"),
    (M % "engine: {kv_cache_memory: -.inf}", "models[0].engine.kv_cache_memory", "-inf"),
    (M % "autoscaling: {min: 1, max: 2, target_ongoing_requests: .nan}",
     "models[0].autoscaling.target_ongoing_requests", "nan"),
    (M % "autoscaling: {min: 1, max: 2, downscale_delay_s: .inf}", "models[0].autoscaling.downscale_delay_s", "inf"),
    (M % "ray: {num_cpus: .nan}", "models[0].ray.num_cpus", "nan"),
    (M % "ray: {health_check_period_s: .inf}", "models[0].ray.health_check_period_s", "inf"),
    (M % "ray: {stall_timeout_s: .nan}", "models[0].ray.stall_timeout_s", "nan"),
    (M % "ray: {ray_actor_options: {resources: {accel: .inf}}}", "models[0].ray.ray_actor_options.resources.accel",
     "inf"),
    (M % "ray: {autoscaling_config: {look_back_period_s: .nan}}",
     "models[0].ray.autoscaling_config.look_back_period_s", "nan"),
    ("models: [{name: a, model: m}, {name: b, model: m}]\nroutes: {chat: {a: .nan, b: 1}}", "routes.chat.a", "nan"),
]


@pytest.mark.parametrize("text, key, shown", NON_FINITE, ids=[k for _, k, _ in NON_FINITE])
def test_every_number_in_the_file_must_be_finite(tmp_path, text, key, shown):
    error = load_error(tmp_path, text)
    assert (error.key, error.reason) == (key, f"expected a finite number, got float {shown}")


def test_non_finite_kv_cache_memory_is_a_usage_error_before_any_model_loads(tmp_path, capsys):
    path = write(tmp_path, M % "engine: {kv_cache_memory: .nan}")
    assert main(["serve", "--config", path, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: models[0].engine.kv_cache_memory: expected a finite number, got float nan\n"


def test_ray_section_is_closed_and_typed(tmp_path):
    error = load_error(tmp_path, M % "ray: {num_cpu: 2}")
    assert error.key == "models[0].ray.num_cpu"
    assert error.reason.startswith("unknown key (expected one of: num_cpus, num_gpus, ray_actor_options")
    assert load_error(tmp_path, M % "ray: {max_ongoing_requests: 0}").reason == "must be >= 1, got 0"
    assert load_error(tmp_path, M % "ray: {num_gpus: -1}").reason == "must be >= 0, got -1"
    assert load_error(tmp_path, M % "ray: {ray_actor_options: [1]}").reason == "expected a mapping, got list"
    spec = load_deployment_config(write(tmp_path, M % "ray: {num_cpus: 2, routing_kwargs: {load_factor: 2}}")).models[0]
    assert spec.ray == {"num_cpus": 2.0, "routing_kwargs": {"load_factor": 2}}


def test_null_takes_the_default_of_an_optional_key_only(tmp_path):
    cfg = load_deployment_config(write(tmp_path, """\
        routing: null
        models:
          - {name: a, model: m, replicas: null, parallel: null, engine: null, ray: null}
        """))
    assert cfg.routing == "power_of_two"
    assert (cfg.models[0].replicas, cfg.models[0].tensor_parallel_size, cfg.models[0].engine, cfg.models[0].ray) == (
        1, 1, {}, {})
    error = load_error(tmp_path, "models: [{name: null, model: m}]")
    assert (error.key, error.reason) == ("models[0].name", "expected a non-empty string, got nothing (null)")


def test_types_are_strict(tmp_path):
    assert load_error(tmp_path, M % "replicas: '2'").reason == "expected an integer, got str '2'"
    assert load_error(tmp_path, M % "replicas: 2.0").reason == "expected an integer, got float 2.0"
    assert load_error(tmp_path, M % "engine: {kv_cache_memory: '1'}").reason == "expected a finite number, got str '1'"
    assert load_error(tmp_path, M % "engine: {kv_cache_memory: 0}").reason == "must be > 0, got 0"
    error = load_error(tmp_path, "models: [{name: a, model: m}]\nroutes: {7: {a: 1}}")
    assert (error.key, error.reason) == ("routes[7]", "keys must be strings, got int 7")
    error = load_error(tmp_path, "models: [{name: a, model: m}]\nroutes: {'a b': {a: 1}}")
    assert (error.key, error.reason) == ("routes['a b']", "invalid route name 'a b'")


def test_engine_section_accepts_every_engine_args_field_with_its_type(tmp_path):
    settable = [f.name for f in dataclasses.fields(EngineArgs) if f.name not in ENGINE_KEYS_SET_ELSEWHERE]
    error = load_error(tmp_path, M % "engine: {nope: 1}")
    assert error.reason == f"unknown key (expected one of: {', '.join(settable)})"
    engine = {"seed": 3, "num_threads": 2, "ray_address": "head:6379", "device": "cpu", "distributed_backend": "gloo",
              "distributed_executor_backend": "mp", "quantization": "int8", "max_model_len": None,
              "enable_chunked_prefill": False, "kv_cache_memory": 0.5}
    text = M % ("engine: {" + ", ".join(f"{k}: {'null' if v is None else str(v).lower()}" for k, v in engine.items())
                + "}")
    spec = load_deployment_config(write(tmp_path, text)).models[0]
    assert spec.engine == engine
    args = spec.engine_args()
    assert all(getattr(args, k) == v for k, v in engine.items())
