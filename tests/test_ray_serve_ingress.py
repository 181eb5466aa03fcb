"""The OpenAI ingress on Ray Serve under faults, on a local two-node Ray cluster (loopback only).

One application: model ``tiny`` with one replica behind two ingress replicas (``ingress_replicas=2``), Serve
started as ``flotilla serve --ray`` starts it (``start_serve``: OpenAI JSON errors in the proxy).
- kill -9 one ingress replica under load: only requests in flight at the kill may fail, and only with an
  OpenAI JSON error; every request sent after the kill succeeds; ``/health`` answers within 1 s throughout
  (the client's timeout is the assertion); Serve brings the ingress back to two replicas.
- kill -9 the model's only replica: ``/health`` turns 503 (no ready replica) until Serve replaces it, then 200.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
from ray import serve  # noqa: E402
from ray_cluster_helpers import LOOPBACK, loopback_cluster  # noqa: E402

from flotilla.deploy.config import DeploymentConfig, ModelSpec  # noqa: E402

pytestmark = pytest.mark.slow

ENGINE = dict(max_model_len=256, num_kv_blocks=128, num_threads=1, max_num_seqs=4)
FAST_HEALTH = dict(health_check_period_s=1.0, health_check_timeout_s=10.0, routing_stats_period_s=1.0,
                   graceful_shutdown_timeout_s=2.0)
HEALTH_TIMEOUT_S = 1.0  # the bound: /health answers within 1 s, even while an ingress replica dies


@pytest.fixture(scope="module")
def app(tiny_llama):
    from flotilla.deploy.ray_serve import APP_NAME, free_port
    from flotilla.entrypoints.openai.ray_ingress import build_openai_ray_app
    from flotilla.entrypoints.openai.ray_server import start_serve
    config = DeploymentConfig(models=(ModelSpec(name="tiny", model=tiny_llama[0], engine=dict(ENGINE),
                                                ray=dict(FAST_HEALTH)),), ingress_replicas=2)
    with loopback_cluster(num_cpus=2) as cluster:
        ray.init(address=cluster.address)
        try:
            port = free_port()
            start_serve(LOOPBACK, port)
            serve.run(build_openai_ray_app(config), name=APP_NAME, route_prefix="/")
            url = f"http://{LOOPBACK}:{port}"
            assert wait_until(lambda: health(url) == 200, 120)
            yield url
        finally:
            serve.shutdown()


def health(url: str) -> int | None:
    try:
        return httpx.get(url + "/health", timeout=10).status_code
    except httpx.HTTPError:
        return None


def wait_until(predicate, timeout_s: float, period_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return predicate()


def running(deployment: str) -> int:
    from flotilla.deploy.ray_serve import APP_NAME
    status = serve.status().applications.get(APP_NAME)
    return 0 if status is None else status.deployments[deployment].replica_states.get("RUNNING", 0)


def replica_processes(deployment: str) -> list:
    """This cluster's processes of a deployment's replicas (Ray titles them ``ServeReplica:app:name``)."""
    tag = f"ServeReplica:flotilla:{deployment}"
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any(tag == part or part.endswith(tag) for part in p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def is_openai_error(r: httpx.Response) -> bool:
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return r.headers.get("content-type", "").startswith("application/json") and error["code"] == r.status_code


class Load:
    """``concurrency`` clients sending short completions until stopped; each result is
    ``(sent, answered, status or exception, response)``."""

    def __init__(self, url: str, concurrency: int):
        self.url, self.stop, self.results = url, threading.Event(), []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(concurrency)]

    def _client(self):
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post(self.url + "/v1/completions", json={"model": "tiny", "prompt": "Hello there",
                                                                        "max_tokens": 24, "temperature": 0})
                    self.results.append((sent, time.monotonic(), r.status_code, r))
                except httpx.HTTPError as e:
                    self.results.append((sent, time.monotonic(), e, None))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(180)


class HealthProbe(threading.Thread):
    """GET /health every 0.1 s with a 1 s client timeout; records ``(status or exception, latency)``."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.answers = url, threading.Event(), []

    def run(self):
        with httpx.Client(timeout=HEALTH_TIMEOUT_S) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    r = client.get(self.url + "/health")
                    self.answers.append((r.status_code if r.status_code == 200 or is_openai_error(r) else r.text,
                                         time.monotonic() - start))
                except httpx.HTTPError as e:
                    self.answers.append((repr(e), time.monotonic() - start))
                time.sleep(0.1)


def test_killing_an_ingress_replica_under_load_fails_only_its_requests_with_json(app):
    from flotilla.deploy.ray_serve import INGRESS_NAME
    assert running(INGRESS_NAME) == 2
    victims = replica_processes(INGRESS_NAME)
    assert len(victims) == 2, victims
    probe = HealthProbe(app)
    probe.start()
    with Load(app, concurrency=6) as load:
        assert wait_until(lambda: len(load.results) >= 12, 120)
        killed_at = time.monotonic()
        victims[0].kill()  # SIGKILL
        assert wait_until(lambda: running(INGRESS_NAME) == 2 and len(replica_processes(INGRESS_NAME)) == 2, 180)
        recovered_at = time.monotonic()
        after = len(load.results)
        assert wait_until(lambda: len(load.results) >= after + 12, 120)
    probe.stop.set()
    probe.join(10)
    failed = [(sent, done, status) for sent, done, status, r in load.results if status != 200]
    bad_shape = [(status, r.text if r is not None else None) for _, _, status, r in load.results
                 if status != 200 and (r is None or not is_openai_error(r))]
    assert not bad_shape, bad_shape  # every error is OpenAI JSON (never a refused connection or text/plain)
    assert all(sent < killed_at for sent, _, _ in failed), (killed_at, failed)  # only requests already sent
    sent_after = [status for sent, _, status, _ in load.results if sent > killed_at]
    assert sent_after and all(status == 200 for status in sent_after)
    slow = [a for a in probe.answers if not isinstance(a[0], int)]
    assert not slow, slow  # /health always answered (JSON) within the client's 1 s timeout
    print(f"ingress replica killed: {len(failed)} of {len(load.results)} requests failed "
          f"({sorted({s for _, _, s in failed})}); replacement running after {recovered_at - killed_at:.1f} s; "
          f"/health: {len(probe.answers)} answers, slowest {max(t for _, t in probe.answers):.2f} s, "
          f"statuses {sorted({s for s, _ in probe.answers})}")


def test_health_is_503_while_a_model_has_no_ready_replica(app):
    assert health(app) == 200
    (victim,) = replica_processes("tiny")
    killed_at = time.monotonic()
    victim.kill()  # SIGKILL: the model's only replica
    assert wait_until(lambda: health(app) == 503, 60)
    down_at = time.monotonic()
    r = httpx.get(app + "/health", timeout=10)
    assert r.status_code == 200 or (is_openai_error(r) and "tiny" in r.json()["error"]["message"]), r.text
    assert wait_until(lambda: health(app) == 200, 240)
    up_at = time.monotonic()
    r = httpx.post(app + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    print(f"model replica killed: /health 503 after {down_at - killed_at:.1f} s, "
          f"200 again after {up_at - killed_at:.1f} s")
