"""Round trips of the ``plain`` and ``kserve`` manifests on this machine: each target's server container (its
command, args, env and mounted deployment file; ``k8s_helpers.LocalContainer`` lists the substitutions) serves
SmolLM2 and answers the manifest's probes; the API key comes from the Secret variable the manifest sets; the
plain target's router serves the models and the alias, and the repository server's models (a Triton-layout
repository with the Python model ``scale``, written in-test); SIGTERM drains as the probes and grace period
assume (readiness 503, liveness 200, exit 0 well within the grace period). One server per target,
module-scoped.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import yaml

from flotilla.k8s import pod as k8s_pod
from flotilla.k8s.options import K8sOptions
from flotilla.k8s.render import generate_from_file
from k8s_helpers import LocalContainer, find, kserve_container

pytestmark = pytest.mark.slow

KEY = "sk-k8s-roundtrip"
SECRETS = {("flotilla-api-key", "api-key"): KEY}
AUTH = {"Authorization": f"Bearer {KEY}"}
DEPLOY = """
api_key_env: FLOTILLA_K8S_TEST_KEY
seed: 0
models:
  - name: smol
    model: smollm2-135m-instruct
    engine: {max_model_len: 512, num_kv_blocks: 96, max_num_seqs: 8}
routes:
  chat: {smol: 1}
model_repository: {paths: [%s]}
"""
FACTOR = 2.0
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
GREEDY: dict[str, list[str]] = {}   # target -> greedy completions of PROMPTS (compared across targets)


@pytest.fixture(scope="module")
def deploy_file(tmp_path_factory) -> str:
    from triton_repository import write_scale
    root = tmp_path_factory.mktemp("k8s")
    write_scale(root / "triton", 1, factor=FACTOR)
    path = root / "deploy.yaml"
    path.write_text(DEPLOY % (root / "triton"))     # absolute: the repository is in the image
    return str(path)


def greedy(url: str, model: str, headers=AUTH) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        r = httpx.post(url + "/v1/completions", headers=headers, timeout=120,
                       json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    return texts


@pytest.fixture(scope="module")
def plain(deploy_file):
    objects = generate_from_file(deploy_file, K8sOptions(target="plain"))
    template = find(objects, "Deployment", "flotilla-smol")["spec"]["template"]
    container = template["spec"]["containers"][0]
    server = LocalContainer(container, template["spec"], objects, SECRETS)
    try:
        server.wait_until(container["startupProbe"])
        yield objects, template, server
    finally:
        server.stop()


def test_plain_container_serves_and_answers_its_probes(plain):
    objects, template, server = plain
    container = template["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server.probe(container[probe]) == 200, probe
    GREEDY["plain"] = greedy(server.url, "smol")
    # The key is the Secret's, read through the variable the mounted deployment file names.
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers=AUTH, timeout=10).status_code == 200
    metrics = httpx.get(server.url + template["metadata"]["annotations"]["prometheus.io/path"], timeout=10)
    assert metrics.status_code == 200 and 'flotilla:num_requests_waiting{model_name="smol"}' in metrics.text


@pytest.fixture(scope="module")
def repository(plain):
    """The repository's server container (the file's model repository alone), started."""
    objects = plain[0]
    template = find(objects, "Deployment", "flotilla-repository")["spec"]["template"]
    container = template["spec"]["containers"][0]
    server = LocalContainer(container, template["spec"], objects, SECRETS)
    try:
        server.wait_until(container["startupProbe"])
        yield container, server
    finally:
        server.stop()


def test_router_serves_models_and_aliases(plain, repository):
    objects, _, server = plain
    repo_container, repo_server = repository
    for probe in ("readinessProbe", "livenessProbe"):
        assert repo_server.probe(repo_container[probe]) == 200, probe
    template = find(objects, "Deployment", "flotilla-router")["spec"]["template"]
    container = template["spec"]["containers"][0]

    def local_backends(name: str, text: str) -> str:   # the Services' DNS names -> the local servers
        config = yaml.safe_load(text)
        assert config["backends"] == {"smol": "http://flotilla-smol:8000"}
        assert config["repository"] == "http://flotilla-repository:8000"
        return yaml.safe_dump({**config, "backends": {"smol": server.url}, "repository": repo_server.url})

    router = LocalContainer(container, template["spec"], objects, SECRETS, rewrite=local_backends)
    try:
        router.wait_until(container["readinessProbe"], timeout_s=60)
        assert router.probe(container["livenessProbe"]) == 200
        r = httpx.post(router.url + "/v1/completions", headers=AUTH, timeout=120,
                       json={"model": "chat", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == "smol"    # the alias names its target
        assert r.json()["choices"][0]["text"] == GREEDY["plain"][0]
        cards = httpx.get(router.url + "/v1/models", headers=AUTH, timeout=30).json()["data"]
        assert [c["id"] for c in cards] == ["smol", "chat"] and cards[1]["flotilla_route"] == {"smol": 1}
        assert httpx.post(router.url + "/v1/completions", timeout=10, json={"model": "chat"}).status_code == 401
        missing = httpx.post(router.url + "/v1/completions", headers=AUTH, timeout=10, json={"model": "nope"})
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
        with httpx.stream("POST", router.url + "/v1/chat/completions", headers=AUTH, timeout=120,
                          json={"model": "chat", "stream": True, "max_tokens": 8,
                                "messages": [{"role": "user", "content": "Hi"}]}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["model"] == "smol"
        # KServe v2 for a model no backend serves goes to the repository's server.
        x = [[1.0, -2.0], [0.5, 4.0]]
        r = httpx.post(router.url + "/v2/models/scale/infer", headers=AUTH, timeout=60, json={
            "inputs": [{"name": "X", "shape": [2, 2], "datatype": "FP32", "data": x}]})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [v * FACTOR for row in x for v in row]
        index = httpx.post(router.url + "/v2/repository/index", headers=AUTH, json={}, timeout=30)
        assert index.status_code == 200 and [m["name"] for m in index.json()] == ["scale"]
        # Answered by the repository's server (Triton's 400 for a model that is not ready), not the router's 404.
        assert httpx.get(router.url + "/v2/models/nope/ready", headers=AUTH, timeout=30).status_code == 400
    finally:
        router.stop()


def test_plain_sigterm_drains_within_the_grace_period(plain):
    """Last in the module: it ends the plain server. A stream in flight finishes after SIGTERM while the
    readiness probe turns 503 (the pod leaves the Service) and liveness stays 200 (no restart mid-drain);
    the process exits 0 well within terminationGracePeriodSeconds minus the preStop pause."""
    _, template, server = plain
    container = template["spec"]["containers"][0]
    chunks, started = [], threading.Event()

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, timeout=120,
                          json={"model": "smol", "prompt": "Once upon a time", "max_tokens": 64,
                                "temperature": 0, "stream": True, "ignore_eos": True}) as s:
            for line in s.iter_lines():
                started.set()
                if line:
                    chunks.append(line)

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    grace = template["spec"]["terminationGracePeriodSeconds"] - k8s_pod.PRESTOP_SLEEP_S
    t0 = time.monotonic()
    server.proc.terminate()
    seen = set()
    while server.proc.poll() is None and time.monotonic() - t0 < grace:
        seen.add((server.probe(container["readinessProbe"]), server.probe(container["livenessProbe"])))
        time.sleep(0.1)
    reader.join(30)
    assert server.proc.wait(1) == 0
    assert (503, 200) in seen, seen
    assert chunks[-1] == "data: [DONE]"
    assert time.monotonic() - t0 < grace


def test_kserve_container_serves_and_answers_its_probes(deploy_file):
    """The runtime's container with the InferenceService's model fields on top (as KServe builds the
    predictor): probes, KServe v2 readiness, the alias (the route's InferenceService serves it) and the
    same greedy completions as the plain target."""
    objects = generate_from_file(deploy_file, K8sOptions(target="kserve"))
    runtime = find(objects, "ClusterServingRuntime")
    isvc = find(objects, "InferenceService", "flotilla-chat")
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    container, pod_spec = kserve_container(runtime, isvc)
    server = LocalContainer(container, pod_spec, objects, SECRETS)
    try:
        server.wait_until(container["startupProbe"])
        for probe in ("readinessProbe", "livenessProbe"):
            assert server.probe(container[probe]) == 200, probe
        assert httpx.get(server.url + "/v2/models/smol/ready", headers=AUTH, timeout=10).status_code == 200
        expected = GREEDY.get("plain") or greedy(server.url, "smol")   # the plain target's, when it ran
        assert greedy(server.url, "chat") == expected
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    finally:
        assert server.stop() == 0



def test_kserve_repository_container_serves_and_answers_its_probes(deploy_file):
    """The repository's InferenceService on the same runtime: its own file (the repository alone) and KServe v2
    readiness probes; it serves the repository's model."""
    objects = generate_from_file(deploy_file, K8sOptions(target="kserve"))
    isvc = find(objects, "InferenceService", "flotilla-repository")
    container, pod_spec = kserve_container(find(objects, "ClusterServingRuntime"), isvc)
    server = LocalContainer(container, pod_spec, objects, SECRETS)
    try:
        server.wait_until(container["startupProbe"])
        for probe in ("readinessProbe", "livenessProbe"):
            assert server.probe(container[probe]) == 200, probe
        r = httpx.post(server.url + "/v2/models/scale/infer", headers=AUTH, timeout=60, json={
            "inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [3.0, -1.0]}]})
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [3.0 * FACTOR, -1.0 * FACTOR], r.text
    finally:
        assert server.stop() == 0
