"""RELIABILITY.md's "Bad input", "Load", cancellation and shutdown promises, against real server processes.

Servers (tiny random Llama unless said otherwise): ``server`` (small KV cache: 32 blocks of 16 tokens, so
it can be oversubscribed; 1 MB body limit), ``queue_server`` (one running sequence, two queued), and
per-test servers for SIGTERM, engine death and the embedded SmolLM2 model. After every negative case a
valid request succeeds and the KV cache returns to empty.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest

from held_request import hold_request_open, wait_until_gone
from test_server_helpers import ServerProcess, child_pids, pid_alive, sse_events

pytestmark = pytest.mark.slow
VOCAB = 49152
ABORT = 'flotilla:request_success_total{finished_reason="abort"}'


@pytest.fixture(scope="module")
def server(tiny_llama):
    path, _ = tiny_llama
    srv = ServerProcess(path, "--max-model-len", "512", "--num-kv-blocks", "32", "--max-num-seqs", "16",
                        "--max-request-body-bytes", "1000000")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def queue_server(tiny_llama):
    path, _ = tiny_llama
    srv = ServerProcess(None, "--model", path, "--max-model-len", "512", "--num-kv-blocks", "128",
                        "--max-num-seqs", "1", "--max-queued-requests", "2")
    yield srv
    assert srv.stop() == 0, srv.output()


def post(srv, path: str, timeout: float = 60, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, timeout=timeout, **kw)


def long_body(max_tokens: int, prompt="Once upon a time", **kw) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **kw}


def wait_idle(srv, timeout: float = 30.0) -> dict:
    """Wait until the engine runs nothing, queues nothing and every KV block is free; return the metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = srv.metrics()
        idle = (m["flotilla:num_requests_running"] == 0 and m["flotilla:num_requests_waiting"] == 0
                and m["flotilla:kv_cache_usage_perc"] == 0)
        if idle:
            return m
        assert time.monotonic() < deadline, f"server not idle: {m}"
        time.sleep(0.05)


def wait_health(srv, status: int, timeout: float = 30.0) -> None:
    """Poll /health until it answers ``status``."""
    deadline = time.monotonic() + timeout
    while (got := httpx.get(srv.url + "/health", timeout=10).status_code) != status:
        assert time.monotonic() < deadline, f"/health still answers {got}, not {status}"
        time.sleep(0.02)


def wait_metric(srv, name: str, predicate, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = srv.metrics()
        if predicate(m.get(name, 0.0)):
            return m
        assert time.monotonic() < deadline, f"{name} = {m.get(name)} never satisfied the condition"
        time.sleep(0.02)


def assert_valid_request_succeeds(srv, idle: bool = True) -> None:
    r = post(srv, "/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    if idle:
        wait_idle(srv)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    return err


class Stream(threading.Thread):
    """A streaming request in a thread: ``events`` (decoded), ``first`` set at the first token event."""

    def __init__(self, srv, body: dict, path: str = "/v1/completions"):
        super().__init__(daemon=True)
        self.url, self.body = srv.url + path, {**body, "stream": True}
        self.events: list = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.first = threading.Event()
        self.stopping = threading.Event()
        self.start()

    def stop(self) -> None:
        """Disconnect at the next line (the server must abort the request)."""
        self.stopping.set()
        self.join(60)

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=120) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    self.events.extend(sse_events([line]))
                    if self.events:
                        self.first.set()
                    if self.stopping.is_set():
                        break
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            self.error = e
        finally:
            self.first.set()

    def result(self, timeout: float = 120) -> list:
        self.join(timeout)
        assert not self.is_alive(), "stream did not finish"
        assert self.error is None and self.status == 200, (self.status, self.error)
        assert self.events[-1] == "[DONE]"
        return [e for e in self.events[:-1] if e.get("choices")]


# ------------------------------------------------------------------------------------------ bad input

BAD_BODIES = [
    ("not json", b"hello", "application/json"),
    ("truncated json", b'{"prompt": "a", "max_tokens"', "application/json"),
    ("array", b'[{"prompt": "a"}]', "application/json"),
    ("string", b'"a prompt"', "application/json"),
    ("number", b"3", "application/json"),
    ("null", b"null", "application/json"),
    ("empty", b"", "application/json"),
    ("nan", b'{"prompt": "a", "temperature": NaN}', "application/json"),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}', "application/json"),
    ("wrong content type", b'{"prompt": "a"}', "text/plain"),
    ("form content type", b"prompt=a", "application/x-www-form-urlencoded"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("name, raw, content_type", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_malformed_body_is_400(server, path, name, raw, content_type):
    r = post(server, path, content=raw, headers={"content-type": content_type})
    error_of(r, 400)
    assert_valid_request_succeeds(server, idle=False)


M = [{"role": "user", "content": "hi"}]
BAD_FIELDS = [
    ({"prompt": "a", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "a", "temperature": -0.5}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": 100000}, "n"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 10**30}, "max_tokens"),
    ({"prompt": "a", "stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"prompt": "a", "stop": [1]}, "stop"),
    ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "echo": True, "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "echo": True, "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "a", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"prompt": "a", "top_k": -5}, "top_k"),
    ({"prompt": "a", "top_k": 10**19}, "top_k"),  # past int64: once killed the engine core
    ({"prompt": "a", "seed": 2**64}, "seed"),
    ({"prompt": "a", "stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"prompt": "a", "seed": "x"}, "seed"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [VOCAB]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({}, "prompt"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"messages": M, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"messages": M, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": M, "temperature": -1}, "temperature"),
    ({"messages": M, "max_tokens": 0}, "max_tokens"),
    ({"messages": M, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": M, "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"messages": M, "n": 0}, "n"),
]


def _path_for(body: dict) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


@pytest.mark.parametrize("body, param", BAD_FIELDS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_FIELDS)])
def test_bad_field_is_400_naming_it(server, body, param):
    r = post(server, _path_for(body), json=body)
    err = error_of(r, 400)
    assert err["param"] == param, err
    assert err["type"] == "BadRequestError"
    assert_valid_request_succeeds(server, idle=False)


EXTREME_BUT_VALID = [{"top_k": 2**63 - 1}, {"top_k": 100000}, {"temperature": 1e308}, {"temperature": 1e-300},
                     {"repetition_penalty": 1e308}, {"repetition_penalty": 1e-5}, {"min_p": 1.0}, {"top_p": 1e-5},
                     {"seed": 2**63 - 1, "n": 3}, {"seed": -(2**63), "n": 2}, {"n": 128, "logprobs": 20},
                     {"frequency_penalty": 2, "presence_penalty": -2}, {"logprobs": 0}, {"min_tokens": 3},
                     {"stop": [chr(97 + i) for i in range(16)]}, {"echo": True, "logprobs": 20, "max_tokens": 0, "n": 8},
                     {"prompt_logprobs": 20, "echo": True}]


def test_extreme_but_valid_values_are_served(server):
    for extra in EXTREME_BUT_VALID:
        r = post(server, "/v1/completions", json={"prompt": "a b", "max_tokens": 3, **extra})
        assert r.status_code == 200, (extra, r.text)
        assert len(r.json()["choices"]) == extra.get("n", 1)
    assert httpx.get(server.url + "/health").status_code == 200
    assert_valid_request_succeeds(server)


def test_bad_requests_answer_fast_while_the_engine_is_busy(server):
    busy = Stream(server, long_body(150))
    assert busy.first.wait(60)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for body, _ in BAD_FIELDS:
            t0 = time.monotonic()
            r = client.post(_path_for(body), json=body)
            assert r.status_code == 400 and time.monotonic() - t0 < 5.0
    chunks = busy.result()
    assert len(chunks) == 150 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    wait_idle(server)


def test_context_length_error_names_the_numbers(server):
    r = post(server, "/v1/completions", json={"prompt": list(range(100, 600)), "max_tokens": 100})
    err = error_of(r, 400)
    assert err["param"] == "max_tokens"
    for number in ("512", "500", "100"):
        assert number in err["message"]
    too_long = post(server, "/v1/completions", json={"prompt": list(range(100, 700))})
    assert "512" in error_of(too_long, 400)["message"]
    chat = post(server, "/v1/chat/completions", json={"messages": M, "max_tokens": 600})
    assert "512" in error_of(chat, 400)["message"]
    assert_valid_request_succeeds(server)


def test_unknown_model_is_404(server):
    for path, body in (("/v1/completions", {"prompt": "a"}), ("/v1/chat/completions", {"messages": M})):
        err = error_of(post(server, path, json={**body, "model": "no-such-model"}), 404)
        assert err["type"] == "NotFoundError" and err["param"] == "model" and "no-such-model" in err["message"]
    error_of(httpx.get(server.url + "/no/such/route"), 404)
    assert_valid_request_succeeds(server)


def test_oversized_bodies_and_headers(server):
    big = json.dumps({"prompt": "a" * 2_000_000}).encode()
    try:  # Content-Length over the limit: 413 before the body is read (or the connection is closed)
        error_of(post(server, "/v1/completions", content=big, headers={"content-type": "application/json"}), 413)
    except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
        pass

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    try:  # chunked transfer encoding, no Content-Length: cut off while streaming in
        r = post(server, "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        error_of(r, 413)
    except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
        pass
    try:
        r = post(server, "/v1/completions", json={"prompt": "a"}, headers={"x-big": "b" * 200_000})
        assert r.status_code in (400, 413, 431)
    except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
        pass
    assert_valid_request_succeeds(server)


def _stream_events(url: str, body: dict) -> list:
    """The decoded events of a stream; each event must be strict UTF-8 JSON on its own."""
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        raw = r.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    return sse_events(e for e in raw.split(b"\n\n") if e)


def test_unicode_streams_are_valid_utf8(server):
    prompt = "Emoji 😀🎉, CJK 你好世界, combining e\u0301 a\u0308 \u0915\u094d\u0937"
    held_back = 0
    for seed in range(4):
        body = {"prompt": prompt, "max_tokens": 64, "temperature": 1.0, "seed": seed, "n": 8, "echo": True}
        events = _stream_events(server.url + "/v1/completions", body)
        chunks = [e["choices"][0] for e in events[:-1]]
        assert len(chunks) == 8 * 64
        full = post(server, "/v1/completions", json=body).json()
        for choice in full["choices"]:
            mine = [c["text"] for c in chunks if c["index"] == choice["index"]]
            assert "".join(mine) == choice["text"] and choice["text"].startswith(prompt)
            held_back += sum(1 for t in mine if t == "")
        if held_back:
            break
    assert held_back > 0, "no character split across tokens was exercised"
    assert_valid_request_succeeds(server)


# ------------------------------------------------------------------------------------------- load

def test_queue_full_answers_429_at_once(queue_server):
    srv = queue_server
    running = Stream(srv, long_body(480))
    assert running.first.wait(60)
    queued = [Stream(srv, long_body(10, prompt=f"queued {i}")) for i in range(2)]
    wait_metric(srv, "flotilla:num_requests_waiting", lambda v: v == 2)
    for stream in (False, True):
        t0 = time.monotonic()
        r = post(srv, "/v1/completions", json={**long_body(5), "stream": stream})
        assert time.monotonic() - t0 < 2.0
        err = error_of(r, 429)
        assert err["type"] == "RateLimitError" and int(r.headers["retry-after"]) >= 1
    chat = post(srv, "/v1/chat/completions", json={"messages": M, "max_tokens": 2})
    assert chat.status_code == 429 and "retry-after" in chat.headers
    assert httpx.get(srv.url + "/health").status_code == 200
    chunks = running.result()
    assert len(chunks) == 480 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    for q in queued:
        done = q.result()
        assert len(done) == 10 and done[-1]["choices"][0]["finish_reason"] == "length"
    assert_valid_request_succeeds(srv)


def test_health_answers_fast_while_the_engine_is_saturated(server):
    streams = [Stream(server, long_body(400, prompt=f"story {i}:")) for i in range(12)]
    wait_metric(server, "flotilla:num_requests_running", lambda v: v >= 4)
    latencies = []
    with httpx.Client(timeout=10) as client:
        for _ in range(15):
            t0 = time.perf_counter()
            assert client.get(server.url + "/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)
    assert server.metrics()["flotilla:num_requests_running"] >= 1, "the engine was not busy while probing"
    assert statistics.median(latencies) < 0.1, latencies
    assert max(latencies) < 2.0, latencies
    for s in streams:
        s.stop()
    wait_idle(server)
    assert_valid_request_succeeds(server)


def test_kv_cache_oversubscription_preempts_and_matches_sequential(server):
    prompts = [list(range(1000 + 40 * i, 1020 + 40 * i)) for i in range(6)]  # 20 tokens each, no shared prefix
    body = {"max_tokens": 80, "ignore_eos": True, "temperature": 0}
    before = wait_idle(server)

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            rs = await asyncio.gather(*(client.post("/v1/completions", json={**body, "prompt": p})
                                        for p in prompts))
        return [r.json()["choices"][0]["text"] for r in rs]
    concurrent = asyncio.run(run_all())
    after = server.metrics()
    assert after["flotilla:num_preemptions_total"] > before["flotilla:num_preemptions_total"]
    sequential = [post(server, "/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"]
                  for p in prompts]
    assert concurrent == sequential
    assert_valid_request_succeeds(server)


def test_metrics_counters_move(server):
    before = wait_idle(server)
    r = post(server, "/v1/completions", json={"prompt": "Hello there", "max_tokens": 7, "ignore_eos": True})
    usage = r.json()["usage"]
    stream = Stream(server, {"prompt": "Hello again", "max_tokens": 5, "ignore_eos": True})
    assert len(stream.result()) == 5
    after = wait_idle(server)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)
    assert delta("flotilla:prompt_tokens_total") >= usage["prompt_tokens"] + 1
    assert delta("flotilla:generation_tokens_total") == 12
    assert delta('flotilla:request_success_total{finished_reason="length"}') == 2
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"flotilla:{hist}_count") == 2
    assert delta("flotilla:inter_token_latency_seconds_count") == 6 + 4
    assert delta("flotilla:prefix_cache_queries_total") > 0
    text = httpx.get(server.url + "/metrics").text
    assert 'model_name="' in text and "flotilla:kv_cache_usage_perc" in text


# ------------------------------------------------------------------------------------ cancellation

def test_fifty_streaming_clients_disconnecting_are_all_aborted(server):
    before = wait_idle(server)

    async def one(client, i):
        async with client.stream("POST", "/v1/completions",
                                 json={**long_body(300, prompt=f"client {i} says"), "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return  # leaving the context closes the connection mid-stream

    async def run_all():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            await asyncio.gather(*(one(client, i) for i in range(50)))
    asyncio.run(run_all())
    after = wait_idle(server, timeout=60)
    assert after[ABORT] - before.get(ABORT, 0.0) == 50
    assert after["flotilla:generation_tokens_total"] - before["flotilla:generation_tokens_total"] < 50 * 300 / 4
    assert_valid_request_succeeds(server)


def test_non_streaming_client_disconnect_aborts(server):
    before = wait_idle(server)
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", json=long_body(480), timeout=0.1)  # 480 tokens take longer
    after = wait_metric(server, ABORT, lambda v: v == before.get(ABORT, 0.0) + 1)
    after = wait_idle(server)
    assert after["flotilla:generation_tokens_total"] - before["flotilla:generation_tokens_total"] < 480
    assert_valid_request_succeeds(server)


def test_cancelled_queued_requests_are_never_prefilled(queue_server):
    srv = queue_server
    running = Stream(srv, long_body(480))
    assert running.first.wait(60)
    before = srv.metrics()
    queries = "flotilla:prefix_cache_queries_total"

    async def cancel_queued():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            async def streaming():
                async with client.stream("POST", "/v1/completions",
                                         json={"prompt": list(range(2000, 2300)), "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        pass
            task = asyncio.ensure_future(streaming())
            with pytest.raises(httpx.ReadTimeout):  # a non-streaming one, abandoned while queued
                await client.post("/v1/completions", json={"prompt": list(range(3000, 3300))}, timeout=0.1)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    asyncio.run(cancel_queued())
    wait_metric(srv, ABORT, lambda v: v == before.get(ABORT, 0.0) + 2)
    m = wait_metric(srv, "flotilla:num_requests_waiting", lambda v: v == 0)
    assert m["flotilla:num_requests_running"] == 1, "the long request should still be running"
    assert len(running.result()) == 480
    after = wait_idle(srv)
    assert after[queries] - before[queries] < 300, "a cancelled queued request was prefilled"
    assert_valid_request_succeeds(srv)


# ------------------------------------------------------------------------------- shutdown and faults

def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_llama):
    path, _ = tiny_llama
    srv = ServerProcess(path, "--max-model-len", "512", "--num-kv-blocks", "64", "--shutdown-timeout", "60")
    try:
        cores = child_pids(srv.proc.pid)
        assert cores
        in_flight = Stream(srv, long_body(300))
        assert in_flight.first.wait(60)
        held = hold_request_open(srv.port)  # in flight until closed: the drain cannot finish before the checks
        srv.proc.send_signal(signal.SIGTERM)
        wait_health(srv, 503)
        error_of(post(srv, "/v1/completions", json={"prompt": "new", "max_tokens": 2}, timeout=10), 503)
        chunks = in_flight.result()
        assert len(chunks) == 300 and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert srv.proc.poll() is None, "the server exited while a request was still in flight"
        held.close()
        assert srv.proc.wait(60) == 0, srv.output()
        assert "Traceback" not in srv.output()
        assert not wait_until_gone(cores, pid_alive), "the engine core outlived the server"
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)
    finally:
        srv.stop()


def test_sigterm_past_the_shutdown_timeout_aborts_what_still_runs(tiny_llama):
    path, _ = tiny_llama
    srv = ServerProcess(path, "--max-model-len", "512", "--num-kv-blocks", "64", "--shutdown-timeout", "0.5")
    try:
        cores = child_pids(srv.proc.pid)
        streams = [Stream(srv, long_body(480)),
                   Stream(srv, {"messages": M, "max_tokens": 480, "ignore_eos": True}, "/v1/chat/completions")]
        assert all(s.first.wait(60) for s in streams)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.output()  # far sooner than the 480 tokens would take to drain
        for s in streams:
            chunks = s.result()
            assert len(chunks) < 480 and chunks[-1]["choices"][0]["finish_reason"] == "abort"
        assert "Traceback" not in srv.output()
        assert not wait_until_gone(cores, pid_alive), "the engine core outlived the server"
    finally:
        srv.stop()


def test_engine_death_fails_in_flight_requests_clearly(tiny_llama):
    path, _ = tiny_llama
    srv = ServerProcess(path, "--max-model-len", "512", "--num-kv-blocks", "64")
    try:
        (core,) = child_pids(srv.proc.pid)
        in_flight = Stream(srv, long_body(400))
        assert in_flight.first.wait(60)
        held = hold_request_open(srv.port)  # keeps the dying server draining until closed
        os.kill(core, signal.SIGKILL)
        in_flight.join(60)
        assert in_flight.status == 200 and in_flight.events[-1] == "[DONE]"
        err = in_flight.events[-2]["error"]
        assert err["code"] == 503 and "engine" in err["message"]
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 503
        error_of(post(srv, "/v1/completions", json={"prompt": "a"}, timeout=5), 503)
        held.close()
        assert srv.proc.wait(60) == 1
        assert not wait_until_gone([core], pid_alive)
    finally:
        srv.stop()


def _serve_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flotilla.entrypoints.cli", "serve", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_startup_failures_exit_cleanly(tiny_llama, tmp_path):
    path, _ = tiny_llama
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _serve_cli(path, "--port", str(port), timeout=60)
    assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _serve_cli(path, "--model", "/elsewhere", timeout=60)
    assert proc.returncode == 2 and "two different models" in proc.stderr
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    with open(os.path.join(path, "config.json")) as f:
        (pickled / "config.json").write_text(f.read())
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    proc = _serve_cli(str(pickled), "--port", "0")
    assert proc.returncode != 0 and "error:" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ the embedded model

def test_default_embedded_model_serves_meaning_and_unicode():
    """``flotilla serve`` with no model serves SmolLM2; its emoji span several tokens each."""
    srv = ServerProcess(None, "--max-model-len", "1024", "--num-kv-blocks", "128")
    try:
        models = httpx.get(srv.base_url + "/models").json()["data"]
        assert models[0]["id"] == "smollm2-135m-instruct"
        r = post(srv, "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0})
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        body = {"messages": [{"role": "user", "content": "Repeat exactly: 😀🎉 你好世界 café"}], "max_tokens": 12,
                "temperature": 0}
        events = _stream_events(srv.base_url + "/chat/completions", body)
        deltas = [e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]]
        assert len(deltas) == 12 and "" in deltas  # a character held back until its last token
        text = "".join(deltas)
        assert "\ufffd" not in text and any(ord(ch) > 0xFFFF for ch in text)
    finally:
        assert srv.stop() == 0
