"""The pieces of a model repository on Ray Serve that need no cluster: which repository models become
deployments (``plan_repository``), the ingress <-> replica tensor messages, the sum of several replicas'
Triton statistics, and the application builder's checks. The application itself runs in
``test_ray_serve_repository.py``."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("ray.serve")
from triton_repository import write, write_scale  # noqa: E402

from flotilla.deploy.ray_repository import plan_repository, repository_cpus  # noqa: E402
from flotilla.deploy.remote_repository import merge_statistics  # noqa: E402
from flotilla.deploy.spec import DeploymentConfig, ModelSpec, RepositorySpec  # noqa: E402
from flotilla.deploy.tensor_wire import (INFER_MESSAGE, InferMessage, WireTensor, tensor_from_wire,  # noqa: E402
                                         tensor_to_wire)
from flotilla.repository.served import RequestStats, statistics_json  # noqa: E402
from flotilla.wire import WireError  # noqa: E402

ENSEMBLE = '''
name: "pipe" platform: "ensemble" max_batch_size: 16
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
ensemble_scheduling { step [
  { model_name: "scale" model_version: -1 input_map { key: "X" value: "X" } output_map { key: "Y" value: "Y" } } ] }
'''


@pytest.fixture
def repo(tmp_path):
    write_scale(tmp_path, 1, factor=2.0)
    write_scale(tmp_path, 1, factor=3.0, name="other")
    write(tmp_path / "pipe" / "config.pbtxt", ENSEMBLE)
    (tmp_path / "pipe" / "1").mkdir()
    write(tmp_path / "broken" / "config.pbtxt", 'backend: "python" max_batch_size: "x"')
    return tmp_path


def test_the_plan_deploys_what_tritonserver_would_load(repo):
    plan = plan_repository(RepositorySpec(paths=(str(repo),)))
    assert plan.deployed == ("other", "pipe", "scale") and plan.not_loaded == ()
    assert list(plan.unavailable) == ["broken"] and "broken" in plan.unavailable["broken"]
    assert plan.names == ["broken", "other", "pipe", "scale"] and repository_cpus(plan) == 3

    explicit = plan_repository(RepositorySpec(paths=(str(repo),), model_control_mode="explicit",
                                              load_models=("pipe", "missing")))
    assert explicit.deployed == ("pipe", "scale")                 # an ensemble brings its composing models
    assert explicit.not_loaded == ("broken", "other")
    assert "no model directory named 'missing'" in explicit.unavailable["missing"]
    everything = plan_repository(RepositorySpec(paths=(str(repo),), model_control_mode="explicit",
                                                load_models=("*",)))
    assert everything.deployed == plan.deployed


def test_an_ensemble_with_a_step_on_a_file_model_gets_no_deployment(repo):
    write(repo / "chat_pipe" / "config.pbtxt", ENSEMBLE.replace('"pipe"', '"chat_pipe"').replace('"scale"', '"chat"'))
    (repo / "chat_pipe" / "1").mkdir()
    plan = plan_repository(RepositorySpec(paths=(str(repo),)), file_models=("chat",))
    assert "chat_pipe" not in plan.deployed and "pipe" in plan.deployed
    assert "step(s) on the deployment file's model(s) 'chat'" in plan.unavailable["chat_pipe"]


def test_poll_mode_and_missing_directories_are_refused(repo, tmp_path):
    with pytest.raises(ValueError, match="'poll' is not available with --ray"):
        plan_repository(RepositorySpec(paths=(str(repo),), model_control_mode="poll"))
    with pytest.raises(ValueError, match="is not a directory"):
        plan_repository(RepositorySpec(paths=(str(tmp_path / "nowhere"),)))


def test_name_clashes_are_refused_before_anything_deploys(repo, tiny_llama):
    from flotilla.deploy.ray_serve import build_ray_app
    from flotilla.entrypoints.openai.ray_ingress import OpenAIIngress
    spec = RepositorySpec(paths=(str(repo),))
    for name, needle in (("scale", "both models of the deployment file and repository models"),
                         ("repo-scale", "deployment name(s) ['repo-scale'] of repository models are taken")):
        config = DeploymentConfig(models=(ModelSpec(name=name, model=tiny_llama[0]),), model_repository=spec)
        with pytest.raises(ValueError, match=re.escape(needle)):
            build_ray_app(config, OpenAIIngress)


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[True, False]]), np.arange(4, dtype=np.uint64),
    np.arange(4, dtype=np.int8).reshape(2, 2, 1), np.ones((2, 2), np.float16), np.ones((1, 3), ml_dtypes.bfloat16),
    np.array([[b"a", b"\xff\x00"], [b"", b"long" * 100]], dtype=object), np.zeros((0, 4), np.float64),
])
def test_tensors_cross_unchanged(array):
    message = InferMessage("m", "", [tensor_to_wire("t", array)], ["o"], {"k": 1, "b": True, "s": "x", "f": 0.5})
    decoded = INFER_MESSAGE.decode(INFER_MESSAGE.encode(message))
    out = tensor_from_wire(decoded.inputs[0])
    assert out.dtype == array.dtype and out.shape == array.shape
    assert out.tobytes() == array.tobytes() if array.dtype != object else out.tolist() == array.tolist()
    assert decoded.parameters == {"k": 1, "b": True, "s": "x", "f": 0.5}


def test_strings_become_bytes_and_malformed_tensors_are_refused():
    out = tensor_from_wire(tensor_to_wire("t", np.array([["é"]], dtype=object)))
    assert out.tolist() == [["é".encode()]]
    for bad in (WireTensor("t", "FP32", [2, 2], data=b"\0" * 12), WireTensor("t", "BYTES", [3], elements=[b"a"]),
                WireTensor("t", "FP99", [1]), WireTensor("t", "INT8", [-1], data=b"")):
        with pytest.raises(WireError, match="tensor 't'"):
            tensor_from_wire(bad)


def _stats(success: int, last_ms: int, batches: dict) -> dict:
    requests = RequestStats()
    requests.success_count, requests.success_s, requests.last_inference_ms = success, success * 0.5, last_ms
    return statistics_json("m", "1", requests, inference_count=success * 2, execution_count=len(batches),
                           queue=(success, 1.0), compute=(success, 0.1, 0.2, 0.3), batch_stats=batches)


def test_statistics_of_replicas_add_up():
    a = _stats(2, 100, {1: (1, 0.1, 0.1, 0.1), 4: (2, 0.2, 0.2, 0.2)})
    b = _stats(3, 50, {4: (1, 0.1, 0.1, 0.1), 8: (1, 0.3, 0.3, 0.3)})
    merged = merge_statistics([a, b])
    assert merged["name"] == "m" and merged["version"] == "1" and merged["last_inference"] == 100
    assert merged["inference_count"] == 10 and merged["execution_count"] == 4
    assert merged["inference_stats"]["success"] == {"count": 5, "ns": 2_500_000_000}
    assert merged["inference_stats"]["queue"] == {"count": 5, "ns": 2_000_000_000}
    assert [(s["batch_size"], s["compute_infer"]["count"]) for s in merged["batch_stats"]] == [(1, 1), (4, 3), (8, 1)]
    assert merge_statistics([a]) == a and a["inference_count"] == 4          # inputs untouched
