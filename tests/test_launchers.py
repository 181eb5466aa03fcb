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

from test_server_helpers import ServerProcess

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
    path, _ = tiny_llama
    srv = ServerProcess(path, "--max-model-len", "512", "--num-kv-blocks", "128", "--tensor-parallel-size", "2",
                        "--shutdown-timeout", "5")
    try:
        family = [psutil.Process(srv.proc.pid)] + psutil.Process(srv.proc.pid).children(recursive=True)
        workers = [p for p in family if "flotilla.worker.worker_proc" in " ".join(p.cmdline())]
        assert len(workers) == 1
        body = {"model": path, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", srv.url + "/v1/completions", json=body) as resp:
                lines = resp.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))  # tokens are flowing
                workers[0].send_signal(signal.SIGKILL)
                rest = "\n".join(lines)
            assert "error" in rest  # the stream ends with an error event, not silently
            deadline = time.monotonic() + 30
            saw_503 = False
            while srv.proc.poll() is None and time.monotonic() < deadline:
                try:
                    saw_503 |= client.get(srv.url + "/health", timeout=2).status_code == 503
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        assert srv.proc.poll() is not None and srv.proc.returncode != 0
        assert saw_503 or srv.proc.returncode == 1
        gone_by = time.monotonic() + 30
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family) and \
                time.monotonic() < gone_by:
            time.sleep(0.2)
        assert not [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        srv.stop()
