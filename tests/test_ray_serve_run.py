"""``flotilla serve --config deploy.yaml --ray`` (``run_on_ray``) end to end in a fresh process: it starts its own Ray instance (loopback only, no dashboard),
serves a tensor-parallel-2 model (its ranks: Ray actors of that instance) through Ray Serve with the API key,
nothing listens beyond loopback. ``/health`` is polled from the moment the process starts: it is never 200
before a completion works. SIGTERM with 4 streams in flight drains as embedded mode does: all 4 complete,
new requests and ``/health`` get the JSON 503, then it shuts Serve and Ray down, exits 0 within
``--shutdown-timeout`` and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from test_server_helpers import free_port  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "sk-run-on-ray"
DEPLOY = """
api_key_env: FLOTILLA_TEST_RAY_KEY
models:
  - name: tiny
    model: {path}
    parallel: {{tensor: 2}}
    engine: {{max_model_len: 256, num_kv_blocks: 64, num_threads: 1}}
"""
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
SHUTDOWN_TIMEOUT_S = 90  # generous on a loaded CI machine: the drain ends when the streams do
DRAIN_TOKENS = 240  # with the prompt, within max_model_len 256: the drain lasts long enough to probe


def listening_addresses(procs) -> set[tuple[str, str]]:
    """(process name, local IP) of every TCP socket those processes listen on."""
    found = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.name(), c.laddr.ip))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def wait_for_health_200(proc, url: str, log: str, headers: dict) -> list:
    """Poll /health from the process start until it is 200; then a completion must work at once. Returns
    the statuses seen before (None: no answer)."""
    seen = []
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, open(log).read()[-4000:]
        try:
            status = httpx.get(url + "/health", timeout=5).status_code
        except httpx.HTTPError:
            status = None
        if status == 200:
            break
        seen.append(status)
        assert time.monotonic() < deadline, open(log).read()[-4000:]
        time.sleep(0.2)
    r = httpx.post(url + "/v1/completions", headers=headers, timeout=60,
                   json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, (r.status_code, r.text, seen)
    return seen


class Stream(threading.Thread):
    """One streamed completion of ``DRAIN_TOKENS`` tokens; ``started`` is set at its first token."""

    def __init__(self, url: str, headers: dict):
        super().__init__(daemon=True)
        self.url, self.headers = url, headers
        self.started, self.tokens, self.finish_reason, self.error = threading.Event(), 0, None, None
        self.ended_at = None

    def run(self):
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": DRAIN_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", headers=self.headers, json=body,
                              timeout=SHUTDOWN_TIMEOUT_S) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    if event.get("usage"):
                        self.tokens = event["usage"]["completion_tokens"]
                    for choice in event.get("choices", ()):
                        self.started.set()
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = repr(e)
        self.ended_at = time.monotonic()


def drain_checks(proc, url: str, headers: dict, log: str) -> dict:
    """SIGTERM with 4 streams in flight; returns the measured times."""
    streams = [Stream(url, headers) for _ in range(4)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started.wait(120), (s.error, open(log).read()[-4000:])
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    refused = health = None
    while (refused is None or health is None) and any(s.is_alive() for s in streams):
        if refused is None:
            r = httpx.post(url + "/v1/completions", headers=headers, timeout=30,
                           json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
            if r.status_code == 503:
                refused = r
            else:
                assert r.status_code == 200, r.text
        if health is None:
            h = httpx.get(url + "/health", timeout=30)
            health = h if h.status_code == 503 else None
        time.sleep(0.1)
    for s in streams:
        s.join(SHUTDOWN_TIMEOUT_S)
    assert [(s.error, s.finish_reason, s.tokens) for s in streams] == [(None, "length", DRAIN_TOKENS)] * 4
    assert refused is not None and health is not None, "no 503 while the 4 streams were draining"
    assert refused.headers["content-type"].startswith("application/json")
    assert refused.json()["error"]["code"] == 503 and "shutting down" in refused.json()["error"]["message"]
    assert health.json()["error"]["code"] == 503 and "shutting down" in health.json()["error"]["message"]
    assert proc.wait(timeout=SHUTDOWN_TIMEOUT_S) == 0, open(log).read()[-4000:]
    exited = time.monotonic()
    return {"streams_done_s": max(s.ended_at for s in streams) - signalled, "exit_s": exited - signalled}


def test_run_on_ray_local_instance_is_loopback_only_and_stops_on_sigterm(tiny_llama):
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="flotilla-ray-", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    deploy = tempfile.NamedTemporaryFile("w", prefix="deploy-", suffix=".yaml", delete=False)
    deploy.write(DEPLOY.format(path=tiny_llama[0]))
    deploy.close()
    proc = subprocess.Popen([sys.executable, "-m", "flotilla.entrypoints.cli", "serve", "--config", deploy.name,
                             "--ray", "--port", str(port), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)],
                            stdout=log, stderr=subprocess.STDOUT,
                            env=dict(env, PYTHONUNBUFFERED="1", FLOTILLA_TEST_RAY_KEY=KEY))
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    descendants = []
    try:
        seen = wait_for_health_200(proc, url, log.name, headers)
        print(f"/health before the first 200: {sorted(set(seen), key=str)}")
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        descendants = psutil.Process(proc.pid).children(recursive=True)
        # No dashboard UI (Ray keeps a frontend-less head for usage stats, on loopback like the rest).
        assert not [c for c in map(_cmdline, descendants)
                    if "dashboard/dashboard.py" in c and "--disable-frontend" not in c]
        exposed = {(name, ip) for name, ip in listening_addresses(descendants) if ip not in LOOPBACK}
        assert not exposed, sorted(exposed)
        times = drain_checks(proc, url, headers, log.name)
        print(f"SIGTERM with 4 streams in flight: streams done after {times['streams_done_s']:.1f} s, "
              f"process exited after {times['exit_s']:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs([p for p in descendants if p.is_running()], timeout=30)
    assert not alive, [p.name() for p in alive]
