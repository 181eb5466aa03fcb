"""Plan search, the deployment file it writes (checked by the real loader), ``parallel: auto``, the workload
and SLO flags, and the ``flotilla plan`` command. Planning uses shipped configs and hardware descriptions
(no weights, no measuring), so these tests are quick."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flotilla.deploy.config import DeploymentConfigError, load_deployment_config, parse_deployment_config
from flotilla.planner import plan, resolve_deployment
from flotilla.planner.emit import deployment_yaml
from flotilla.planner.hardware import load_hardware
from flotilla.planner.metrics import parse_slo
from flotilla.planner.workload import parse_workload

GiB = 1 << 30


@pytest.fixture(scope="module")
def report_70b():
    return plan("llama-3.1-70b", "8xh200", "isl=1024,osl=128,range=0", "ttft_p99=3s,tpot_p99=60ms",
                max_num_seqs=[16, 64], max_simulations=8)


def test_70b_on_8xh200(report_70b):
    best = report_70b.best
    assert report_70b.ranked and best is report_70b.ranked[0]
    assert best.plan.num_devices <= 8 and best.metrics.tpot_p99 <= 0.060 and best.metrics.ttft_p99 <= 3.0
    assert best.memory_per_device <= 141e9 * 0.9
    goodputs = [e.metrics.goodput for e in report_70b.ranked]
    assert goodputs == sorted(goodputs, reverse=True)
    reasons = {e.label: e.rejected for e in report_70b.rejected}
    # 140 GB of bf16 weights cannot sit on one 141 GB GPU next to a KV cache
    assert any(label.startswith("TP1 PP1") and r.startswith("memory") for label, r in reasons.items())
    # 8 devices: TP 16 does not exist here, TP 8 x PP 2 needs 16
    assert reasons["TP8 PP2"].startswith("devices")


def test_divisibility_is_a_reason():
    report = plan("llama-3.1-8b", "8xh200", "isl=256,osl=32,range=0", "none", tp=[1, 3], pp=[1], replicas=[1],
                  max_num_seqs=[8], max_simulations=2)
    assert "TP 3 does not divide 32 heads" in {e.label: e.rejected for e in report.rejected}["TP3 PP1"]
    assert [e.label for e in report.ranked] == ["TP1 PP1 x1 seqs=8"]


def test_emitted_file_is_a_valid_deployment(report_70b, tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(deployment_yaml(report_70b))
    best = report_70b.best.plan
    (spec,) = load_deployment_config(path).models
    assert (spec.tensor_parallel_size, spec.pipeline_parallel_size, spec.replicas) == (best.tp, best.pp,
                                                                                         best.replicas)
    assert spec.model == "meta-llama/Llama-3.1-70B-Instruct" and not spec.parallel_auto
    assert spec.engine == {"dtype": "bfloat16", "max_model_len": best.max_model_len,
                           "max_num_seqs": best.max_num_seqs, "max_num_batched_tokens": 2048, "block_size": 16,
                           "num_kv_blocks": report_70b.best.kv_blocks, "device": "cuda"}
    args = spec.engine_args()
    assert args.tensor_parallel_size == best.tp and args.num_kv_blocks == report_70b.best.kv_blocks


def test_gguf_models_are_planned_and_served_with_float_weights(report_70b):
    """The cost model prices float matmuls: a GGUF model's planned engine asks for them (``quantization:
    none``) instead of the CPU default's kept-quantized blocks; a planned int8 stays int8."""
    import dataclasses
    from flotilla.planner.emit import engine_settings
    plan_ = report_70b.best.plan
    assert engine_settings(plan_, "cpu", 8, "gguf")["quantization"] == "none"
    assert "quantization" not in engine_settings(plan_, "cpu", 8, "hf_dir")
    assert "quantization" not in engine_settings(plan_, "gpu", 8, "gguf")
    assert engine_settings(dataclasses.replace(plan_, quantization="int8"), "cpu", 8, "gguf")["quantization"] == "int8"


def test_parallel_auto_is_resolved_by_the_planner():
    doc = {"models": [{"name": "chat", "model": "llama-3.1-8b", "parallel": "auto",
                       "engine": {"max_num_seqs": 32}}]}
    deployment = parse_deployment_config(doc, "deploy.yaml")
    assert deployment.models[0].parallel_auto
    with pytest.raises(DeploymentConfigError, match="resolved by flotilla.planner"):
        deployment.models[0].engine_args()
    resolved = resolve_deployment(deployment, hardware="8xh200", workload="isl=512,osl=64,range=0")
    spec = resolved.models[0]
    assert not spec.parallel_auto and spec.engine["max_num_seqs"] == 32
    assert spec.tensor_parallel_size * spec.pipeline_parallel_size * spec.replicas <= 8
    assert spec.engine_args().tensor_parallel_size == spec.tensor_parallel_size


@pytest.mark.parametrize("entry, key, needle", [
    ({"parallel": "auto", "replicas": 2}, "models[0].replicas", "chooses the replicas"),
    ({"parallel": {"auto": True, "tensor": 2}}, "models[0].parallel.tensor", "auto chooses"),
    ({"parallel": "manual"}, "models[0].parallel", "or auto"),
])
def test_parallel_auto_errors(entry, key, needle):
    with pytest.raises(DeploymentConfigError) as e:
        parse_deployment_config({"models": [{"name": "a", "model": "m", **entry}]}, "deploy.yaml")
    assert e.value.key == key and needle in str(e.value)


def test_workload_and_slo_flags():
    w = parse_workload("chat,rate=4")
    assert (w.input_len, w.output_len, w.rate, w.concurrency) == (512, 128, 4.0, None)
    assert parse_workload("isl=100,osl=10,concurrency=8,prefix=20").prefix_len == 20
    assert parse_workload(None).auto_concurrency
    both = parse_workload("rate=2,concurrency=8")  # vllm bench serve's --request-rate with --max-concurrency
    assert both.replica_load(2, 64) == (1.0, 4) and "rate 2 req/s, concurrency 8" in both.describe()
    for bad, needle in (("isl=ten", "expected a number"), ("lsi=3", "unknown workload key"),
                        ("rate=0", "rate must be"), ("isl=100,prefix=100", "prefix")):
        with pytest.raises(ValueError, match=needle):
            parse_workload(bad)
    slo = parse_slo("ttft_p99=1.5s,tpot_p50=80ms")
    assert (slo.ttft_p99, slo.tpot_p50, slo.tpot_limit) == (1.5, 0.08, 0.08)
    assert parse_slo("none").ttft_limit == float("inf")
    with pytest.raises(ValueError, match="unknown SLO key"):
        parse_slo("ttft=1")


def test_hardware_files():
    h200 = load_hardware("8xh200")
    assert h200.num_devices == 8 and h200.memory == 141e9 and h200.flops["bfloat16"] == pytest.approx(989.5e12)
    with pytest.raises(ValueError, match="neither a YAML file nor a known system"):
        load_hardware("9xh900")


def test_plan_command_with_a_config_file_and_emit(tmp_path):
    """``flotilla plan`` as a user runs it: a bare config.json (no weights) on a shipped system."""
    from flotilla.planner.model import shipped_configs
    config = os.path.join(shipped_configs()["qwen3-32b"]["dir"], "config.json")
    out = tmp_path / "deploy.yaml"
    proc = subprocess.run([sys.executable, "-m", "flotilla.entrypoints.cli", "plan", "--model", config,
                           "--hardware", "8xh200", "--workload", "isl=1000,osl=100,range=0", "--slo",
                           "ttft_p99=4s,tpot_p99=50ms", "--max-num-seqs", "32", "--top", "3",
                           "--emit", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "plans meeting the SLO" in proc.stdout and "rejected" in proc.stdout and "best: TP" in proc.stdout
    assert load_deployment_config(out).models[0].model.endswith("qwen3-32b")
    bad = subprocess.run([sys.executable, "-m", "flotilla.entrypoints.cli", "plan", "--model", config,
                          "--hardware", "8xh200", "--slo", "tpot=1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown SLO key") and "Traceback" not in bad.stderr
