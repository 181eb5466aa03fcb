"""The RayService's ``serveConfigV2``, deployed as KubeRay deploys it, serves what ``flotilla serve --config
deploy.yaml --ray`` serves.

KubeRay hands ``serveConfigV2`` to the Ray dashboard's REST API, which validates it as Ray Serve's
``ServeDeploySchema`` and applies it on the Serve controller (``apply_config``); the controller imports the
application from ``import_path`` with ``args`` in a task on the cluster. ``serve run CONFIG --address`` (Ray's
CLI) takes the same path without a dashboard (flotilla's test clusters have none): schema, then
``apply_config``. On one local Ray cluster (two nodes, loopback only): first the reference, ``flotilla serve
--config deploy.yaml --ray --ray-address`` (stopped with SIGTERM, which deletes its application), then the
RayService's ``serveConfigV2`` with one substitution: ``http_options`` (0.0.0.0:8000 in a pod) become the
loopback address and the port Serve already listens on. The file has a generative model (and an alias), an
embedding model and a model repository (the Python model ``scale``): greedy completions by model and by
alias, embeddings and the repository model's outputs must be equal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

ray = pytest.importorskip("ray")

from flotilla.k8s.options import K8sOptions  # noqa: E402
from flotilla.k8s.ray_group import wait_for_nodes  # noqa: E402
from flotilla.k8s.render import generate_from_file  # noqa: E402
from ray_cluster_helpers import LOOPBACK, loopback_cluster  # noqa: E402
from test_server_helpers import free_port  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "sk-k8s-kuberay"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEPLOY = """
api_key_env: FLOTILLA_K8S_RAY_KEY
seed: 0
models:
  - name: smol
    model: smollm2-135m-instruct
    engine: {max_model_len: 512, num_kv_blocks: 96, max_num_seqs: 8}
  - name: minilm
    model: all-minilm-l6-v2
    engine: {num_threads: 1}
routes:
  chat: {smol: 1}
model_repository: {paths: [%s]}
"""
X = [[1.0, -2.0], [0.5, 4.0]]
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
VENV_BIN = os.path.dirname(sys.executable)


def wait_healthy(url: str, proc: subprocess.Popen | None, log: str, timeout_s: float = 300) -> None:
    """Until ``url``/health is 200; fails at once when ``proc`` exits or (without ``proc``) Serve reports the
    application's deployment failed (``serve.status()``: a wrong import path or args end here)."""
    from ray import serve
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc is None or proc.poll() is None, open(log).read()[-4000:]
        app = serve.status().applications.get("flotilla") if proc is None else None
        assert app is None or app.status != "DEPLOY_FAILED", app.message
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, open(log).read()[-4000:]
        time.sleep(0.5)


def answers(url: str) -> list:
    """Greedy completions by model and alias, embeddings, and the repository model's outputs."""
    out: list = completions(url)
    r = httpx.post(url + "/v1/embeddings", headers=AUTH, timeout=120, json={"model": "minilm", "input": PROMPTS})
    assert r.status_code == 200, r.text
    out.append([d["embedding"] for d in r.json()["data"]])
    r = httpx.post(url + "/v2/models/scale/infer", headers=AUTH, timeout=60, json={
        "inputs": [{"name": "X", "shape": [2, 2], "datatype": "FP32", "data": X}]})
    assert r.status_code == 200, r.text
    out.append(r.json()["outputs"][0]["data"])
    return out


def completions(url: str) -> list[str]:
    out = []
    for model in ("smol", "chat"):
        for prompt in PROMPTS:
            r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=120,
                           json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "smol"
            out.append(r.json()["choices"][0]["text"])
    return out


def test_serve_config_v2_serves_what_flotilla_serve_ray_serves(tmp_path, monkeypatch):
    from triton_repository import write_scale
    write_scale(tmp_path / "triton", 1, factor=2.0)
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(DEPLOY % (tmp_path / "triton"))   # absolute: the repository is in the image
    (service,) = generate_from_file(str(deploy), K8sOptions(target="kuberay"))
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    port = free_port()
    # As the RayService's pods have it (from the Secret): every Ray process, the Serve controller's build task
    # included, inherits the variable from the raylets started below.
    monkeypatch.setenv("FLOTILLA_K8S_RAY_KEY", KEY)
    log = str(tmp_path / "serve.log")
    with loopback_cluster(num_cpus=2) as cluster, open(log, "w") as out:
        env = dict(os.environ, PYTHONUNBUFFERED="1")   # inside: with the cluster's loopback-only switch
        assert wait_for_nodes(2, 30, address=cluster.address) == 2
        with pytest.raises(TimeoutError):
            wait_for_nodes(3, 0.5, address=cluster.address, poll_s=0.1)
        reference = subprocess.Popen(
            [os.path.join(VENV_BIN, "flotilla"), "serve", "--config", str(deploy), "--ray", "--ray-address",
             cluster.address, "--host", LOOPBACK, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(f"http://{LOOPBACK}:{port}", reference, log)
            expected = answers(f"http://{LOOPBACK}:{port}")
        finally:
            reference.send_signal(signal.SIGTERM)
            assert reference.wait(120) == 0, open(log).read()[-4000:]
        config_file = tmp_path / "serve_config.yaml"
        config_file.write_text(yaml.safe_dump({**serve_config, "http_options": {"host": LOOPBACK, "port": port}}))
        deployed = subprocess.run([os.path.join(VENV_BIN, "serve"), "run", str(config_file), "--address",
                                   cluster.address, "--non-blocking"], capture_output=True, text=True, env=env,
                                  timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        ray.init(address=cluster.address)   # this process watches the application's status
        wait_healthy(f"http://{LOOPBACK}:{port}", None, log)
        assert answers(f"http://{LOOPBACK}:{port}") == expected
        assert expected[-1] == [v * 2.0 for row in X for v in row]
        assert httpx.get(f"http://{LOOPBACK}:{port}/v1/models", timeout=30).status_code == 401
