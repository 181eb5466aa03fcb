"""The deployment file (``flotilla.deploy.config``): schema, errors that name the file and key, CLI shorthand."""

from __future__ import annotations

import textwrap

import pytest

from flotilla.deploy.config import (AutoscalingSpec, DeploymentConfig, DeploymentConfigError, ModelSpec,
                                    deployment_from_cli, load_deployment_config, parse_deployment_config)
from flotilla.entrypoints.cli import build_parser, main

FULL = """\
api_key_env: FLOTILLA_TEST_DEPLOY_KEY
seed: 7
models:
  - name: chat-v1
    model: smollm2-135m-instruct
    parallel: {tensor: 1, pipeline: 1}
    replicas: 2
    engine: {max_num_seqs: 32, kv_cache_memory: 1}
    ray: {placement_strategy: PACK}
  - name: chat-v2
    model: smollm2-135m-instruct
    autoscaling: {min: 1, max: 4, target_ongoing_requests: 8, downscale_delay_s: 30}
  - name: tiny
    model: ./models/tiny-llama
routes:
  chat: {chat-v1: 90, chat-v2: 10}
routing: prefix_aware
ingress: {replicas: 2}
"""


def write(tmp_path, text: str, name: str = "deploy.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_valid_file_parses(tmp_path):
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    cfg = load_deployment_config(write(tmp_path, FULL))
    assert cfg.model_names == ["chat-v1", "chat-v2", "tiny"]
    assert cfg.routes == {"chat": {"chat-v1": 90.0, "chat-v2": 10.0}}
    assert cfg.routing == "prefix_aware" and cfg.seed == 7 and cfg.api_key_env == "FLOTILLA_TEST_DEPLOY_KEY"
    assert cfg.ingress_replicas == 2
    v1, v2, tiny = cfg.models
    assert v1 == ModelSpec(name="chat-v1", model="smollm2-135m-instruct", replicas=2,
                           engine={"max_num_seqs": 32, "kv_cache_memory": 1.0}, ray={"placement_strategy": "PACK"})
    assert isinstance(v1.engine["kv_cache_memory"], float)
    assert v2.autoscaling == AutoscalingSpec(1, 4, 8.0, None, 30.0) and v2.replicas == 1
    assert tiny.model == str(tmp_path / "models" / "tiny-llama")  # relative to the file, since it exists there
    args = v1.engine_args()
    assert args.served_model_name == "chat-v1" and args.max_num_seqs == 32 and args.tensor_parallel_size == 1


def test_relative_model_path_that_does_not_exist_next_to_the_file_is_kept(tmp_path):
    cfg = load_deployment_config(write(tmp_path, "models: [{name: m, model: ./nowhere}]"))
    assert cfg.models[0].model == "./nowhere"
    assert cfg.routing == "power_of_two" and cfg.routes == {} and cfg.api_key_env is None and cfg.seed is None
    assert cfg.ingress_replicas == 1


def test_error_names_the_file_and_the_key_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "models:\n  - {name: a, model: m, parallel: {tensr: 2}}\n")
    with pytest.raises(DeploymentConfigError) as e:
        load_deployment_config("deploy.yaml")
    assert str(e.value) == ("deploy.yaml: models[0].parallel.tensr: unknown key "
                            "(expected one of: tensor, pipeline, auto)")
    assert e.value.key == "models[0].parallel.tensr" and e.value.source == "deploy.yaml"


M = "models: [{name: a, model: m}, {name: b, model: m}]\n"
BAD = [
    ("modles: []", "modles", "unknown key"),
    ("routes: {}", "models", "required key is missing"),
    ("models: []", "models", "non-empty list"),
    ("models: {a: 1}", "models", "non-empty list"),
    ("- a\n- b", "", "expected a mapping, got list"),
    ("models: [{model: m}]", "models[0].name", "required key is missing"),
    ("models: [{name: a}]", "models[0].model", "required key is missing"),
    ("models: [{name: '', model: m}]", "models[0].name", "non-empty string"),
    ("models: [{name: 'a b', model: m}]", "models[0].name", "invalid name"),
    ("models: [{name: a, model: 3}]", "models[0].model", "non-empty string"),
    ("models: [{name: a, model: m}, {name: a, model: n}]", "models[1].name", "duplicate model name 'a'"),
    ("models: [{name: a, model: m, replicas: 0}]", "models[0].replicas", "must be >= 1"),
    ("models: [{name: a, model: m, replicas: two}]", "models[0].replicas", "expected an integer"),
    ("models: [{name: a, model: m, replicas: true}]", "models[0].replicas", "expected an integer"),
    ("models: [{name: a, model: m, replicas: 2, autoscaling: {min: 1, max: 2}}]", "models[0].replicas",
     "either replicas or autoscaling"),
    ("models: [{name: a, model: m, autoscaling: {min: 3, max: 2}}]", "models[0].autoscaling.min",
     "must not exceed max"),
    ("models: [{name: a, model: m, autoscaling: {min: 0, max: 2}}]", "models[0].autoscaling.min", ">= 1"),
    ("models: [{name: a, model: m, autoscaling: {max: 2}}]", "models[0].autoscaling.min", "missing"),
    ("models: [{name: a, model: m, autoscaling: {min: 1, max: 2, target: 3}}]", "models[0].autoscaling.target",
     "unknown key"),
    ("models: [{name: a, model: m, autoscaling: {min: 1, max: 2, target_ongoing_requests: 0}}]",
     "models[0].autoscaling.target_ongoing_requests", "> 0"),
    ("models: [{name: a, model: m, parallel: [1]}]", "models[0].parallel", "expected a mapping"),
    ("models: [{name: a, model: m, parallel: {tensor: 0}}]", "models[0].parallel.tensor", ">= 1"),
    ("models: [{name: a, model: m, engine: {max_num_sqs: 4}}]", "models[0].engine.max_num_sqs",
     "unknown key (expected one of: dtype, quantization, max_model_len"),
    ("models: [{name: a, model: m, engine: {max_num_seqs: ten}}]", "models[0].engine.max_num_seqs",
     "expected an integer"),
    ("models: [{name: a, model: m, engine: {max_num_seqs: 0}}]", "models[0].engine.max_num_seqs", ">= 1"),
    ("models: [{name: a, model: m, engine: {enable_prefix_caching: 1}}]",
     "models[0].engine.enable_prefix_caching", "true or false"),
    ("models: [{name: a, model: m, engine: {dtype: fp8}}]", "models[0].engine.dtype", "expected one of"),
    ("models: [{name: a, model: m, engine: {pipeline_partition: [1, x]}}]",
     "models[0].engine.pipeline_partition[1]", "expected an integer"),
    ("models: [{name: a, model: m, engine: {tensor_parallel_size: 2}}]",
     "models[0].engine.tensor_parallel_size", "parallel.tensor"),
    ("models: [{name: a, model: m, engine: {model: x}}]", "models[0].engine.model", "not an engine override"),
    ("models: [{name: a, model: m, ray: {placement_strategy: TIGHT}}]", "models[0].ray.placement_strategy",
     "PACK"),
    (M + "routes: {chat: {a: 1, c: 1}}", "routes.chat.c", "unknown model 'c' (models: a, b)"),
    (M + "routes: {a: {b: 1}}", "routes.a", "also a model name"),
    (M + "routes: {chat: {a: -1, b: 2}}", "routes.chat.a", ">= 0"),
    (M + "routes: {chat: {a: 0, b: 0}}", "routes.chat", "sum to more than 0"),
    (M + "routes: {chat: {a: x}}", "routes.chat.a", "finite number"),
    (M + "routes: {chat: {}}", "routes.chat", "at least one target"),
    (M + "routes: [a]", "routes", "expected a mapping"),
    (M + "routing: fastest", "routing", "prefix_aware, power_of_two, round_robin"),
    (M + "api_key_env: 3", "api_key_env", "environment variable"),
    (M + "seed: -1", "seed", ">= 0"),
    (M + "ingress: {replicas: 0}", "ingress.replicas", ">= 1"),
    (M + "ingress: {replicas: '2'}", "ingress.replicas", "expected an integer"),
    (M + "ingress: {replica: 2}", "ingress.replica", "unknown key (expected one of: replicas)"),
    (M + "ingress: 2", "ingress", "expected a mapping"),
]


@pytest.mark.parametrize("text, key, needle", BAD, ids=[f"{i}-{b[1] or 'doc'}" for i, b in enumerate(BAD)])
def test_every_validation_error_names_the_file_and_key(tmp_path, text, key, needle):
    path = write(tmp_path, text)
    with pytest.raises(DeploymentConfigError) as e:
        load_deployment_config(path)
    message = str(e.value)
    assert e.value.key == key, message
    prefix = f"{path}: {key}: " if key else f"{path}: "
    assert message.startswith(prefix) and needle in message, message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "models:\n  - name: a\n    model: [unclosed\n  - name: b\n")
    with pytest.raises(DeploymentConfigError) as e:
        load_deployment_config(path)
    assert str(e.value).startswith(f"{path}: line ") and "invalid YAML" in str(e.value)
    path = write(tmp_path, "models:\n  - name: a\n    model: m\n    model: n\n")
    with pytest.raises(DeploymentConfigError, match=r"line 4: duplicate key 'model'"):
        load_deployment_config(path)
    with pytest.raises(DeploymentConfigError, match="cannot read the file"):
        load_deployment_config(tmp_path / "missing.yaml")


def test_parse_without_a_file_names_its_source():
    with pytest.raises(DeploymentConfigError, match=r"^ray-app: models\[0\]\.replicas: must be >= 1"):
        parse_deployment_config({"models": [{"name": "a", "model": "m", "replicas": 0}]}, "ray-app")


def serve_ns(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_cli_shorthand_equals_the_equivalent_file(tmp_path):
    ns = serve_ns("/models/tiny", "--served-model-name", "tiny", "--max-num-seqs", "8", "--num-kv-blocks", "64",
                  "-tp", "2", "--pipeline-partition", "1,1", "--no-enable-prefix-caching", "--dtype", "bfloat16")
    from_cli = deployment_from_cli(ns)
    from_file = load_deployment_config(write(tmp_path, """\
        models:
          - name: tiny
            model: /models/tiny
            parallel: {tensor: 2}
            engine: {max_num_seqs: 8, num_kv_blocks: 64, pipeline_partition: [1, 1],
                     enable_prefix_caching: false, dtype: bfloat16}
        """))
    assert from_cli == from_file
    assert from_cli.models[0].engine_args() == from_file.models[0].engine_args()
    default = deployment_from_cli(serve_ns())
    assert default == DeploymentConfig(models=(ModelSpec("smollm2-135m-instruct", "smollm2-135m-instruct"),))
    assert deployment_from_cli(serve_ns("--model", "./m")).models[0].name == "./m"
    with pytest.raises(ValueError, match="two different models"):
        deployment_from_cli(serve_ns("a", "--model", "b"))


def test_api_key_env(tmp_path, monkeypatch):
    cfg = load_deployment_config(write(tmp_path, "api_key_env: FLOTILLA_TEST_DEPLOY_KEY\n" + M))
    monkeypatch.setenv("FLOTILLA_TEST_DEPLOY_KEY", "sk-from-env")
    assert cfg.api_key() == "sk-from-env"
    assert cfg.api_key({"FLOTILLA_TEST_DEPLOY_KEY": "other"}) == "other"
    monkeypatch.delenv("FLOTILLA_TEST_DEPLOY_KEY")
    with pytest.raises(DeploymentConfigError, match=r": api_key_env: the environment variable "
                                                    r"FLOTILLA_TEST_DEPLOY_KEY is not set"):
        cfg.api_key()
    assert load_deployment_config(write(tmp_path, M)).api_key() is None


def test_serve_config_usage_errors_exit_2(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, "api_key_env: FLOTILLA_TEST_DEPLOY_KEY\n" + M)
    monkeypatch.delenv("FLOTILLA_TEST_DEPLOY_KEY", raising=False)
    assert main(["serve", "--config", path, "--max-num-seqs", "4", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config cannot be combined") and "--max-num-seqs" in err
    assert main(["serve", "some-model", "--config", path, "--port", "0"]) == 2
    assert "MODEL" in capsys.readouterr().err
    assert main(["serve", "--config", path, "--port", "0"]) == 2
    assert "FLOTILLA_TEST_DEPLOY_KEY is not set" in capsys.readouterr().err
    bad = write(tmp_path, "models: [{name: a, model: m, replicas: 0}]", "bad.yaml")
    assert main(["serve", "--config", bad, "--port", "0"]) == 2
    assert f"{bad}: models[0].replicas: must be >= 1" in capsys.readouterr().err


def test_enforce_eager_flag_reaches_the_model_config(tmp_path):
    """vLLM's --enforce-eager (no CUDA graphs) is an engine flag like any other: CLI and file agree, and it
    reaches ModelConfig, which every worker reads."""
    from_cli = deployment_from_cli(serve_ns("/models/tiny", "--served-model-name", "tiny", "--enforce-eager"))
    assert from_cli.models[0].engine_args().enforce_eager is True
    assert deployment_from_cli(serve_ns("/models/tiny")).models[0].engine_args().enforce_eager is False
    from_file = load_deployment_config(write(tmp_path, """\
        models:
          - name: tiny
            model: /models/tiny
            engine: {enforce_eager: true}
        """))
    assert from_cli == from_file
