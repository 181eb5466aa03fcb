"""Parallel runs through the command line: torchrun ranks, and a served tensor-parallel model whose worker
rank dies (clear error to the client, health 503, every process gone)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from held_request import hold_request_open
from test_server_helpers import ServerProcess, sse_events

pytestmark = pytest.mark.slow

ARGS = ["--max-model-len", "128", "--num-kv-blocks", "64", "--max-tokens", "8", "--prompt", "Hello there, how are"]


def _generate(cmd_prefix: list[str], model: str, *extra: str) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLOTILLA_LOG_LEVEL="WARNING")
    out = subprocess.run([*cmd_prefix, "generate", "--model", model, *ARGS, *extra], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_torchrun_two_ranks_match_single_process(tiny_llama):
    path, _ = tiny_llama
    single = _generate([sys.executable, "-m", "flotilla.entrypoints.cli"], path)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun ships with torch"
    launched = _generate([torchrun, "--nproc-per-node", "2", "-m", "flotilla.entrypoints.cli"], path, "-tp", "2")
    assert launched.strip() == single.strip() and single.strip()


def test_dead_worker_rank_fails_requests_and_leaves_nothing(tiny_llama):
    """server.py's contract after a rank dies: the in-flight stream ends with a 503 error event; while the
    server drains what is still in flight (up to ENGINE_DEAD_GRACE_S), /health and new requests answer 503;
    then it exits with code 1 and leaves no process behind."""
    path, _ = tiny_llama
    srv = ServerProcess(path, "--max-model-len", "512", "--num-kv-blocks", "128", "--tensor-parallel-size", "2",
                        "--shutdown-timeout", "5")
    held = None
    try:
        family = [psutil.Process(srv.proc.pid)] + psutil.Process(srv.proc.pid).children(recursive=True)
        workers = [p for p in family if "flotilla.worker.worker_proc" in " ".join(p.cmdline())]
        assert len(workers) == 1
        held = hold_request_open(srv.port)  # keeps the dying server up long enough to be observed
        body = {"model": path, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", srv.url + "/v1/completions", json=body) as resp:
                lines = resp.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))  # tokens are flowing
                workers[0].send_signal(signal.SIGKILL)
                events = sse_events(line for line in lines if line)
            assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503, events[-3:]
            health = client.get(srv.url + "/health", timeout=10)
            assert health.status_code == 503, health.text
            refused = client.post(srv.url + "/v1/completions", json={"prompt": "new", "max_tokens": 2}, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == 503, refused.text
        held.close()  # nothing in flight any more: the server exits now
        assert srv.proc.wait(30) == 1, srv.output()
        gone_by = time.monotonic() + 30
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family) and \
                time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if held is not None:
            held.close()
        srv.stop()
