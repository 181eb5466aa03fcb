"""Parallel sizes that do not fit a model fail up front, before any worker rank starts (issue 11, item 3):
``LLM(...)`` raises, ``flotilla serve`` exits 2, the deployment file path too; the message names the model's
head counts (or layers) and lists the tensor-parallel sizes that work."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from flotilla import LLM
from flotilla.errors import InvalidRequestError
from test_server_helpers import free_port

SERVE = [sys.executable, "-m", "flotilla.entrypoints.cli", "serve"]


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_llm_raises_before_any_rank_starts(tiny_llama_h6):
    path, _ = tiny_llama_h6  # 6 heads, 3 KV heads
    before = children()
    with pytest.raises(InvalidRequestError) as info:
        LLM(model=path, max_model_len=128, num_kv_blocks=32, tensor_parallel_size=2)
    msg = str(info.value)
    assert info.value.param == "tensor_parallel_size"
    assert "6 attention heads" in msg and "3 KV heads" in msg and "work for this model: 1, 3, 6." in msg, msg
    assert children() == before  # no worker process was started


def test_pipeline_larger_than_the_layers(tiny_llama):
    path, _ = tiny_llama  # 2 layers
    before = children()
    with pytest.raises(InvalidRequestError) as info:
        LLM(model=path, max_model_len=128, num_kv_blocks=32, pipeline_parallel_size=3)
    assert info.value.param == "pipeline_parallel_size" and "2 layers" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        LLM(model=path, max_model_len=128, num_kv_blocks=32, pipeline_parallel_size=2, pipeline_partition=[1, 2])
    assert info.value.param == "pipeline_partition" and "2 layers" in str(info.value)
    assert children() == before


def test_kv_heads_replicated_when_tp_is_a_multiple(tiny_llama_h6):
    """TP 6 over 3 KV heads replicates each KV head on two ranks: accepted by the check."""
    from flotilla.engine.arg_utils import EngineArgs
    path, _ = tiny_llama_h6
    config = EngineArgs(model=path, max_model_len=128, num_kv_blocks=32,
                        tensor_parallel_size=6).create_engine_config()
    assert config.parallel.world_size == 6 and config.model.tensor_parallel_sizes() == [1, 3, 6]


def test_serve_smollm2_with_tp2_exits_2_naming_the_heads():
    proc = subprocess.run([*SERVE, "smollm2-135m-instruct", "--tensor-parallel-size", "2",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "9 attention heads" in err and "3 KV heads" in err and "work for this model: 1, 3." in err, err[-3000:]
    assert "Gloo" not in err and "Traceback" not in err


@pytest.mark.parametrize("ray", [False, True], ids=["embedded", "ray"])
def test_deployment_file_fails_before_loading_any_model(tmp_path, tiny_llama, tiny_llama_h6, ray):
    good, bad = tiny_llama[0], tiny_llama_h6[0]
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(f"models:\n  - name: good\n    model: {good}\n    engine: {{max_model_len: 128}}\n"
                      f"  - name: wide\n    model: {bad}\n    parallel: {{tensor: 4}}\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    flags = ["--ray"] if ray else []
    proc = subprocess.run([*SERVE, "--config", str(deploy), "--port", str(free_port()), *flags],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "tensor_parallel_size 4 does not fit wide" in proc.stderr and "1, 3, 6" in proc.stderr
    assert "loading good" not in proc.stdout  # nothing was loaded first
    assert "Ray" not in proc.stdout + proc.stderr  # with --ray: refused on the driver, before Ray starts
