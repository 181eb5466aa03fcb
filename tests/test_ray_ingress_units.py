"""The ingress side of Ray Serve mode without a cluster: the proxy middleware that turns Serve's own errors into
OpenAI JSON, the SIGTERM drain loop over a fake deployment handle (fake clock), and ``/health`` following
``RemoteEngine.is_ready`` (the cached result of the stats refresh)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import httpx
import pytest

pytest.importorskip("ray.serve")

from flotilla.entrypoints.openai import ray_proxy  # noqa: E402
from flotilla.entrypoints.openai.ray_proxy import OpenAIErrorsInProxy  # noqa: E402


# ---- the proxy middleware ----------------------------------------------------------------------------------
def run_asgi(app, path: str = "/v1/completions") -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(OpenAIErrorsInProxy(app)({"type": "http", "path": path}, receive, send))
    return sent


def status_and_body(sent: list[dict]) -> tuple[int, dict, bytes]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k: v for k, v in start["headers"]}, body


def plain(status: int, text: bytes, extra=()):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), *extra]})
        await send({"type": "http.response.body", "body": text, "more_body": False})
    return app


def test_serve_text_errors_become_openai_json_with_the_same_status():
    sent = run_asgi(plain(503, b"Deployment x is unavailable", [(b"retry-after", b"1")]))
    status, headers, body = status_and_body(sent)
    assert status == 503 and headers[b"content-type"] == b"application/json" and headers[b"retry-after"] == b"1"
    assert json.loads(body) == {"error": {"message": ray_proxy.MESSAGES[503], "type": "ServiceUnavailableError",
                                          "param": None, "code": 503}}
    status, _, body = status_and_body(run_asgi(plain(408, b"Request r timed out after 5s.")))
    assert status == 408 and json.loads(body)["error"]["type"] == "RequestTimeoutError"


def test_no_response_at_all_becomes_a_json_500():
    async def silent(scope, receive, send):
        return None
    status, _, body = status_and_body(run_asgi(silent))
    assert status == 500 and json.loads(body)["error"]["message"] == ray_proxy.FAILED


def test_cut_event_stream_ends_with_an_error_event_and_done_other_cut_bodies_stay_cut():
    def cut(content_type: bytes):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
            await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        return app
    sent = run_asgi(cut(b"text/event-stream; charset=utf-8"))
    status, _, body = status_and_body(sent)
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and events[0] == "{}" and events[-1] == "[DONE]" and not sent[-1]["more_body"]
    assert json.loads(events[1])["error"]["message"] == ray_proxy.CUT
    sent = run_asgi(cut(b"application/json"))
    assert sent[-1]["more_body"] is True  # never a truncated body that looks whole


def test_app_answers_and_serve_routes_pass_untouched():
    async def json_error(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": {"code": 404}}', "more_body": False})
    assert status_and_body(run_asgi(json_error))[2] == b'{"error": {"code": 404}}'
    assert status_and_body(run_asgi(plain(200, b"# metrics")))[2] == b"# metrics"
    assert status_and_body(run_asgi(plain(503, b"This node is being drained.", ()), path="/-/healthz"))[2] == \
        b"This node is being drained."


# ---- the drain loop ----------------------------------------------------------------------------------------
class FakeBroadcast:
    """``handle.broadcast(method).results(...)``: each ``drain`` pops the next in-flight counts."""

    def __init__(self, counts: list[list]):
        self.counts, self.calls = list(counts), []

    def broadcast(self, method):
        self.calls.append(method)
        if method == "drain":
            values = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
        else:
            values = [0]
        return type("R", (), {"results": lambda _self, **kw: values})()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.5
        return self.now


def test_drain_waits_until_every_replica_is_idle():
    from flotilla.entrypoints.openai.ray_server import drain_ingress
    handle = FakeBroadcast([[2, 1], [1, RuntimeError("dead replica")], [0, 0]])
    assert drain_ingress(handle, 30.0, _no_wait(), clock=FakeClock()) == 0
    assert handle.calls == ["drain"] * 3


def test_drain_aborts_at_the_timeout_then_gives_up_after_the_grace():
    from flotilla.entrypoints.openai.ray_server import ABORT_GRACE_S, drain_ingress
    handle = FakeBroadcast([[3]])
    clock = FakeClock()
    assert drain_ingress(handle, 5.0, _no_wait(), clock=clock) == 3
    assert handle.calls.count("abort_all") == 1 and clock.now >= 5.0 + ABORT_GRACE_S


def test_a_second_signal_ends_the_drain():
    from flotilla.entrypoints.openai.ray_server import drain_ingress
    interrupted = _no_wait()
    interrupted.set()
    assert drain_ingress(FakeBroadcast([[4]]), 30.0, interrupted, clock=FakeClock()) == 4


def _no_wait() -> threading.Event:
    event = threading.Event()
    event.wait = lambda timeout=None: event.is_set()  # the fake clock drives time
    return event


# ---- /health follows the replicas' readiness ---------------------------------------------------------------
class StatsHandle:
    """A deployment handle whose ``broadcast("stats")`` answers with ``self.answer`` (or raises it)."""

    def __init__(self):
        self.answer = []

    def options(self, **_):
        return self

    def broadcast(self, method):
        answer = self.answer

        async def results_async(**_):
            if isinstance(answer, BaseException):
                raise answer
            return answer
        return type("R", (), {"results_async": staticmethod(results_async)})()


def test_health_is_503_until_a_replica_is_ready_and_after_all_are_gone(tiny_llama):
    from ray.serve.exceptions import DeploymentUnavailableError
    from ray.serve._private.common import DeploymentID

    from flotilla.deploy.remote_engine import RemoteEngine
    from flotilla.engine.arg_utils import EngineArgs
    from flotilla.entrypoints.openai.api_server import build_app
    from flotilla.entrypoints.openai.cli_args import ServerConfig
    handle = StatsHandle()
    engine = RemoteEngine("tiny", handle, EngineArgs(model=tiny_llama[0], max_model_len=64))
    app, _ = build_app({"tiny": engine}, ServerConfig())

    async def scenario():
        async def health():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                r = await c.get("/health")
                return r.status_code, r.json()
        seen = [await health()]  # no refresh yet
        for answer in ([{"healthy": False}, RuntimeError("replica died")], [{"healthy": True}],
                       [RuntimeError("replica died")], DeploymentUnavailableError(DeploymentID("tiny", "a"))):
            handle.answer = answer
            try:
                await engine.refresh_stats()
            except DeploymentUnavailableError:
                pass
            seen.append(await health())
        dead_before = engine.is_dead  # no replica just now (being replaced?): not ready, not dead
        engine.gone_after_s = 0.0  # ... until it has had none for gone_after_s: then the deployment is gone
        with contextlib.suppress(DeploymentUnavailableError):
            await engine.refresh_stats()
        seen.append(await health())
        return seen, dead_before

    seen, dead_before = asyncio.run(scenario())
    assert [s for s, _ in seen] == [503, 503, 200, 503, 503, 503]
    assert "no ready replica" in seen[0][1]["error"]["message"] and "tiny" in seen[0][1]["error"]["message"]
    assert not dead_before and "no ready replica" in seen[-2][1]["error"]["message"]
    assert engine.is_dead and "an engine is not running" in seen[-1][1]["error"]["message"]
    assert "has had no replica" in seen[-1][1]["error"]["message"]  # plain words, no Ray repr


def test_drain_budget_leaves_time_to_stop_serve_and_ray_within_the_shutdown_timeout():
    from flotilla.entrypoints.openai.ray_server import STOP_RESERVE_S, drain_budget
    assert drain_budget(90.0) == 90.0 - STOP_RESERVE_S
    assert drain_budget(30.0) == 20.0  # a third of a short timeout goes to stopping
    assert drain_budget(0.0) == 0.0
