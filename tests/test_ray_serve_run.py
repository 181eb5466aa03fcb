"""``flotilla serve --config deploy.yaml --ray`` (``run_on_ray``) end to end in a fresh process: it starts its own Ray instance (loopback only, no dashboard),
serves a tensor-parallel-2 model (its ranks: Ray actors of that instance) through Ray Serve with the API key,
nothing listens beyond loopback, and on SIGTERM it shuts Serve and Ray down, exits 0 and leaves no process
behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
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


def test_run_on_ray_local_instance_is_loopback_only_and_stops_on_sigterm(tiny_llama):
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="flotilla-ray-", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    deploy = tempfile.NamedTemporaryFile("w", prefix="deploy-", suffix=".yaml", delete=False)
    deploy.write(DEPLOY.format(path=tiny_llama[0]))
    deploy.close()
    proc = subprocess.Popen([sys.executable, "-m", "flotilla.entrypoints.cli", "serve", "--config", deploy.name,
                             "--ray", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(env, PYTHONUNBUFFERED="1", FLOTILLA_TEST_RAY_KEY=KEY))
    url = f"http://127.0.0.1:{port}"
    descendants = []
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, open(log.name).read()[-4000:]
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, open(log.name).read()[-4000:]
            time.sleep(1.0)
        headers = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        r = httpx.post(url + "/v1/completions", headers=headers, timeout=60,
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
        descendants = psutil.Process(proc.pid).children(recursive=True)
        # No dashboard UI (Ray keeps a frontend-less head for usage stats, on loopback like the rest).
        assert not [c for c in map(_cmdline, descendants)
                    if "dashboard/dashboard.py" in c and "--disable-frontend" not in c]
        exposed = {(name, ip) for name, ip in listening_addresses(descendants) if ip not in LOOPBACK}
        assert not exposed, sorted(exposed)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, open(log.name).read()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs([p for p in descendants if p.is_running()], timeout=30)
    assert not alive, [p.name() for p in alive]
