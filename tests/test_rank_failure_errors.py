"""After a worker rank dies, clients get a plain message and the detail stays in the server log (issue 11,
item 8): the requests in flight, new requests and /health answer OpenAI-style JSON with no file path,
internal port or stack trace.

A real multi-process engine: the tiny 4-head Llama at TP=2 on the mp executor (the engine core in its own
process, rank 1 a child of it), served by ``build_app`` in this process so /health and new requests can be
checked after the death (``flotilla serve`` exits once its engine is dead).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import pytest

from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.async_llm import AsyncLLM
from flotilla.entrypoints.openai.api_server import build_app
from flotilla.entrypoints.openai.cli_args import ServerConfig
from test_server_helpers import child_pids, pid_alive, sse_events

pytestmark = pytest.mark.slow
LEAKS = [re.compile(r"(?:^|[\s'\"(\[])/[\w.-]+/[\w./-]+"),  # a file path
         re.compile(r":\d{2,5}\b"),  # a port
         re.compile(r"Traceback|File \"|line \d+|\.(?:cc|cpp|py)\b"),  # a stack trace or source location
         re.compile(r"gloo|Gloo|torch|127\.0\.0\.1|\[::")]


def assert_plain(err: dict, status: int) -> str:
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    for leak in LEAKS:
        assert not leak.search(err["message"]), (leak.pattern, err["message"])
    assert "worker rank failed" in err["message"], err["message"]
    return err["message"]


def test_a_dead_rank_gives_clients_a_plain_message(tiny_llama, capfd):
    path, _ = tiny_llama
    engine = AsyncLLM(EngineArgs(model=path, max_model_len=512, num_kv_blocks=64, tensor_parallel_size=2,
                                 distributed_executor_backend="mp"))
    app, served = build_app(engine, ServerConfig(served_model_name="tiny"))
    core = engine._client.proc.pid  # noqa: SLF001 - the test needs the core's pid to find rank 1
    try:
        (worker,) = child_pids(core)

        async def scenario():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
                body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
                blocking = asyncio.ensure_future(c.post("/v1/completions", json=body))
                streaming = asyncio.ensure_future(c.post("/v1/completions", json={**body, "stream": True}))
                deadline = time.monotonic() + 120
                while engine.latest_stats.num_running < 2:  # both are decoding
                    assert time.monotonic() < deadline, "requests never started"
                    await asyncio.sleep(0.02)
                os.kill(worker, signal.SIGKILL)
                return (await blocking, await streaming, await c.post("/v1/completions", json=body),
                        await c.get("/health"))
        blocking, streaming, new, health = asyncio.run(scenario())
    finally:
        served.close()
        engine.shutdown()
    assert not pid_alive(core) and not pid_alive(worker)

    assert blocking.status_code == 503, blocking.text
    assert_plain(blocking.json()["error"], 503)
    events = sse_events(streaming.text.splitlines())
    assert streaming.status_code == 200 and events[-1] == "[DONE]"
    assert_plain(events[-2]["error"], 503)
    assert new.status_code == 503 and health.status_code == 503
    assert_plain(new.json()["error"], 503)
    assert_plain(health.json()["error"], 503)
    # The detail (which rank, how it failed) is in the server's log, not in any response.
    log = capfd.readouterr().err
    assert re.search(r"worker rank failed: \w+", log), log[-3000:]
    for r in (blocking, new, health):
        assert json.loads(r.text)["error"]["message"] not in ("", None)
