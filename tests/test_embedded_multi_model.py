"""Many models behind one OpenAI endpoint: ``ServedModels`` routing, ``ReplicaSet``, and a real
``flotilla serve --config deploy.yaml`` process serving SmolLM2 and a tiny random Llama (2 replicas).

The quick tests use test doubles for engines; the slow ones share one server per module.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from types import SimpleNamespace

import httpx
import pytest

from flotilla import SamplingParams
from flotilla.deploy.replica_set import ReplicaSet
from flotilla.deploy.routing import make_policy
from flotilla.engine.output_processor import OutputKind
from flotilla.engine.protocol import EngineClient
from flotilla.entrypoints.openai.api_server import build_app
from flotilla.entrypoints.openai.cli_args import ServerConfig
from flotilla.entrypoints.openai.errors import APIError
from flotilla.entrypoints.openai.models import ServedModels
from flotilla.scheduler.scheduler import SchedulerStats
from test_server_helpers import ServerProcess, pid_alive

KEY = "sk-embedded-test"
KEY_ENV = "FLOTILLA_TEST_EMBEDDED_KEY"


class FakeEngine:
    """The ``EngineClient`` surface with scripted outputs: each request yields ``n_out`` strings."""

    def __init__(self, name: str, n_out: int = 2, num_blocks: int = 10, usage: float = 0.0):
        self.model_config = SimpleNamespace(model=name, max_model_len=128, vocab_size=100, name=name)
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=4), model=self.model_config)
        self.tokenizer = self.input_processor = None
        self.num_blocks, self.n_out = num_blocks, n_out
        self.latest_stats = SchedulerStats(1, 2, usage, 10, 5, 1)
        self.dead_error = None
        self.num_queued_requests = self.num_unfinished_requests = 0
        self.aborted: list[str] = []
        self.shut = False

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    async def generate(self, prompt, params, request_id, output_kind=OutputKind.CUMULATIVE, priority=0):
        for i in range(self.n_out):
            await asyncio.sleep(0)
            yield f"{self.model_config.model}:{request_id}:{i}"

    def abort(self, request_id):
        self.aborted.extend([request_id] if isinstance(request_id, str) else request_id)

    def shutdown(self):
        self.shut = True


def served_ab(**kw) -> ServedModels:
    return ServedModels({"a": FakeEngine("a"), "b": FakeEngine("b")}, ServerConfig(),
                        routes={"ab": {"a": 90, "b": 10}}, **kw)


# ----------------------------------------------------------------------------------- quick: ServedModels

def test_alias_splits_routing_decisions_by_weight():
    served = served_ab(seed=0)
    counts = Counter(served.resolve("ab").model_name for _ in range(1000))
    assert abs(counts["a"] - 900) <= 30 and counts["a"] + counts["b"] == 1000


def test_alias_is_seedable_and_sticky_per_user():
    first, second = served_ab(seed=3), served_ab(seed=3)
    assert [first.resolve("ab").model_name for _ in range(100)] == [second.resolve("ab").model_name
                                                                    for _ in range(100)]
    served = served_ab()
    for user in ("alice", "bob", "carol"):
        picks = {served.resolve("ab", user).model_name for _ in range(20)}
        assert len(picks) == 1
    by_user = Counter(served.resolve("ab", f"user-{i}").model_name for i in range(1000))
    assert abs(by_user["a"] - 900) <= 30


def test_resolve_models_unknown_and_missing_names():
    served = served_ab()
    assert served.resolve("a").model_name == "a" and served.resolve("b", "u").model_name == "b"
    with pytest.raises(APIError) as e:
        served.resolve("nope")
    assert e.value.status == 404 and e.value.param == "model" and "nope" in e.value.message
    with pytest.raises(APIError) as e:
        served.resolve(None)
    assert e.value.status == 400 and e.value.param == "model"
    one = ServedModels({"only": FakeEngine("x")}, ServerConfig(), routes={"alias": {"only": 1}})
    assert one.resolve(None).model_name == "only"
    single = ServedModels(FakeEngine("x"), ServerConfig(served_model_name="named"))
    assert single.model_names == ["named"] and single.resolve(None).model_name == "named"
    for routes, needle in (({"a": {"b": 1}}, "name of a model"), ({"r": {"c": 1}}, "unknown model"),
                           ({"r": {"a": 0}}, "sum"), ({"r": {}}, "no targets")):
        with pytest.raises(ValueError, match=needle):
            ServedModels({"a": FakeEngine("a"), "b": FakeEngine("b")}, ServerConfig(), routes=routes)


def test_app_lists_models_and_aliases_and_reports_every_engine():
    engines = {"a": FakeEngine("a", usage=0.25), "b": FakeEngine("b")}
    app, served = build_app(engines, ServerConfig(), routes={"ab": {"a": 3, "b": 1}}, seed=0)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            models = (await c.get("/v1/models")).json()["data"]
            alias = (await c.get("/v1/models/ab")).json()
            missing = await c.get("/v1/models/zz")
            unknown = await c.post("/v1/completions", json={"model": "zz", "prompt": "x"})
            unnamed = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            healthy = (await c.get("/health")).status_code
            metrics = (await c.get("/metrics")).text
            engines["b"].dead_error = RuntimeError("core exited")
            dead = await c.get("/health")
            return models, alias, missing, unknown, unnamed, healthy, metrics, dead
    models, alias, missing, unknown, unnamed, healthy, metrics, dead = asyncio.run(go())
    assert [m["id"] for m in models] == ["a", "b", "ab"]
    assert models[0]["root"] == "a" and models[0]["parent"] is None and "flotilla_route" not in models[0]
    assert alias["flotilla_route"] == {"a": 3, "b": 1} and alias["parent"] is None and alias["root"] is None
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "model"
    assert healthy == 200
    assert 'flotilla:kv_cache_usage_perc{model_name="a"} 0.25' in metrics
    assert 'flotilla:kv_cache_usage_perc{model_name="b"} 0.0' in metrics
    assert 'flotilla:generation_tokens_total{model_name="b"} 0.0' in metrics
    assert metrics.count("# TYPE flotilla:num_requests_running gauge") == 1  # one registry, one family
    assert dead.status_code == 503 and "b: core exited" in dead.json()["error"]["message"]


# ------------------------------------------------------------------------------------ quick: ReplicaSet

def test_replica_set_routes_sums_and_aborts_on_the_owner():
    replicas = [FakeEngine("r0", n_out=3, num_blocks=10, usage=0.5), FakeEngine("r1", n_out=3, num_blocks=30)]
    rs = ReplicaSet(replicas, make_policy("round_robin"), ["r0", "r1"])
    assert isinstance(replicas[0], EngineClient) and isinstance(rs, EngineClient)
    stats = rs.latest_stats
    assert stats.num_running == 2 and stats.prefix_cache_hits == 10 and stats.kv_cache_usage == pytest.approx(0.125)
    assert rs.num_blocks == 40 and rs.model_config is replicas[0].model_config

    async def go():
        outs = await asyncio.gather(*(collect(rs.generate("p", None, f"req-{i}")) for i in range(4)))
        stream = rs.generate([1, 2, 3], None, "held")
        first = await stream.__anext__()
        owner = rs.replica_of("held")
        rs.abort(["held", "not-in-flight"])
        await stream.aclose()
        return outs, first, owner
    outs, first, owner = asyncio.run(go())
    assert [o[0].split(":")[0] for o in outs] == ["r0", "r1", "r0", "r1"] and all(len(o) == 3 for o in outs)
    assert first.startswith(owner + ":") and rs.replica_of("held") is None
    assert rs._by_id[owner].aborted == ["held"]
    assert rs.num_routed == {"r0": 3, "r1": 2} and rs.num_ongoing == {"r0": 0, "r1": 0}
    replicas[1].dead_error = RuntimeError("gone")
    assert rs.is_dead and "gone" in str(rs.dead_error)
    assert asyncio.run(collect(rs.generate("p", None, "after")))[0].startswith("r0:")  # avoids the dead one
    rs.shutdown()
    assert all(r.shut for r in replicas)


async def collect(stream) -> list:
    return [x async for x in stream]


# ------------------------------------------------------------------------------- slow: real processes

DEPLOY_YAML = f"""\
api_key_env: {KEY_ENV}
seed: 0
routing: prefix_aware
models:
  - name: smol
    model: smollm2-135m-instruct
    engine: {{max_model_len: 512, num_kv_blocks: 48, max_num_seqs: 4, num_threads: 1}}
  - name: tiny
    model: ./models/tiny
    replicas: 2
    engine: {{max_model_len: 500, num_kv_blocks: 96, max_num_seqs: 8, num_threads: 1}}
routes:
  canary: {{tiny: 1, smol: 0}}
"""


@pytest.fixture(scope="module")
def deploy_file(tmp_path_factory, tiny_llama):
    """deploy.yaml next to ``models/tiny`` (a link to the tiny model): the relative path resolves to it."""
    root = tmp_path_factory.mktemp("deploy")
    (root / "models").mkdir()
    os.symlink(tiny_llama[0], root / "models" / "tiny")
    (root / "deploy.yaml").write_text(DEPLOY_YAML)
    return str(root / "deploy.yaml")


@pytest.fixture(scope="module")
def server(deploy_file):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        srv = ServerProcess(None, "--config", deploy_file, startup_timeout=300)
    srv.api_key = KEY  # for srv.headers; the server took the key from the environment
    yield srv
    assert srv.stop() == 0, srv.output()


def post(srv, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=srv.headers if headers is None else headers, timeout=120)


@pytest.mark.slow
def test_models_lists_every_model_and_alias(server):
    data = httpx.get(server.base_url + "/models", headers=server.headers).json()["data"]
    assert [m["id"] for m in data] == ["smol", "tiny", "canary"]
    assert data[0]["root"] == "smollm2-135m-instruct" and data[0]["max_model_len"] == 512
    assert data[2]["flotilla_route"] == {"tiny": 1.0, "smol": 0.0}
    banner = server.output()
    assert "served model name       smol" in banner and "served model name       tiny" in banner
    assert "replicas              2 (routing: prefix_aware)" in banner


@pytest.mark.slow
def test_requests_reach_the_right_model(server, tiny_llama_engine):
    prompt = "The quick brown fox"
    (ref,) = tiny_llama_engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8))
    for name in ("tiny", "canary"):
        r = post(server, "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny" and r.json()["choices"][0]["text"] == ref.outputs[0].text
    chat = post(server, "/v1/chat/completions", {"model": "smol", "max_tokens": 8, "temperature": 0,
                                                 "messages": [{"role": "user",
                                                               "content": "What is the capital of France?"}]})
    assert chat.json()["model"] == "smol" and "Paris" in chat.json()["choices"][0]["message"]["content"]
    streamed = post(server, "/v1/completions", {"model": "canary", "prompt": prompt, "max_tokens": 3,
                                                "stream": True})
    assert '"model": "tiny"' in streamed.text or '"model":"tiny"' in streamed.text


@pytest.mark.slow
def test_unknown_or_missing_model(server):
    r = post(server, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and "nope" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    tok = {name: post(server, "/tokenize", {"model": name, "prompt": "hello"}) for name in ("smol", "tiny", "nope")}
    assert tok["smol"].json()["max_model_len"] == 512 and tok["tiny"].json()["max_model_len"] == 500
    assert tok["nope"].status_code == 404
    assert post(server, "/detokenize", {"model": "tiny", "tokens": [1, 2]}).status_code == 200


@pytest.mark.slow
def test_api_key_from_the_environment_is_enforced(server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    assert post(server, "/v1/completions", body, headers={}).status_code == 401
    assert post(server, "/v1/completions", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.base_url + "/models").status_code == 401
    assert post(server, "/v1/completions", body).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


class HeldStream(threading.Thread):
    """A streaming completion kept open (reading) until ``close()``, which disconnects: the server aborts it.
    ``started`` is set at its first token event; ``finished`` records a finish_reason seen before close."""

    def __init__(self, srv, body: dict):
        super().__init__(daemon=True)
        self.srv, self.body = srv, {**body, "stream": True}
        self.started, self.closing = threading.Event(), threading.Event()
        self.finished: str | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.srv.url + "/v1/completions", json=self.body, headers=self.srv.headers,
                              timeout=120) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        self.started.set()
                        self.finished = self.finished or json.loads(line[6:])["choices"][0]["finish_reason"]
                    if self.closing.is_set():
                        return
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            self.error = e
        finally:
            self.started.set()

    def close(self) -> None:
        self.closing.set()
        self.join(60)
        assert not self.is_alive() and self.error is None, self.error


def metric(text: str, name: str, model: str) -> float:
    m = re.search(rf'^{re.escape(name)}{{model_name="{model}"}} (\S+)$', text, re.M)
    assert m, f"{name} for {model} missing"
    return float(m.group(1))


def wait_for_metrics(srv, want: dict, timeout: float = 60.0) -> str:
    """Poll /metrics until every ``{(metric, model): value}`` of ``want`` holds in one scrape; its text."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        got = {key: metric(text, *key) for key in want}
        if got == want:
            return text
        assert time.monotonic() < deadline, f"metrics never reached {want}: last {got}"
        time.sleep(0.02)


@pytest.mark.slow
def test_metrics_carry_every_model_label(server):
    for name in ("smol", "tiny"):
        assert post(server, "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2}).status_code == 200
    running = "flotilla:num_requests_running"
    idle = {(running, "smol"): 0.0, (running, "tiny"): 0.0}
    text = wait_for_metrics(server, idle)
    for name in ("smol", "tiny"):
        assert metric(text, "flotilla:generation_tokens_total", name) >= 2
        assert metric(text, "flotilla:prefix_cache_queries_total", name) > 0
    assert text.count("# TYPE flotilla:generation_tokens_total counter") == 1
    # Two long requests on smol (480 tokens of a 30-layer model) and three on tiny (over its two replicas,
    # 96 KV blocks each: no preemption even if all three land on one): while all of them run, each model's
    # gauge counts exactly its own.
    streams = [HeldStream(server, {"model": "smol", "prompt": f"story {i}:", "max_tokens": 480,
                                   "ignore_eos": True}) for i in range(2)]
    streams += [HeldStream(server, {"model": "tiny", "prompt": f"tale {i}:", "max_tokens": 480, "ignore_eos": True})
                for i in range(3)]
    try:
        assert all(s.started.wait(120) for s in streams)
        wait_for_metrics(server, {(running, "smol"): 2.0, (running, "tiny"): 3.0})
        assert not any(s.finished for s in streams), "a request finished before the gauges were read"
    finally:
        for s in streams:
            s.close()
    wait_for_metrics(server, idle)  # the disconnected requests were aborted on their engines


@pytest.mark.slow
def test_sigterm_stops_every_engine(server):
    cores = list(server.core_pids)
    assert len(cores) == 3  # smol + 2 tiny replicas, each an engine core process
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.output()
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in cores) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in cores), "an engine core outlived the server"
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_prefix_aware_replica_set_keeps_a_shared_prefix_on_one_replica(tiny_llama, tiny_llama_engine):
    from flotilla.deploy.config import parse_deployment_config
    from flotilla.deploy.embedded import shutdown_engines, start_engines
    deployment = parse_deployment_config({"routing": "prefix_aware", "seed": 1, "models": [
        {"name": "tiny", "model": tiny_llama[0], "replicas": 2,
         "engine": {"max_model_len": 256, "num_kv_blocks": 48, "max_num_seqs": 8, "num_threads": 1}}]})
    shared = list(range(1000, 1048))  # three full 16-token blocks
    prompts = [shared + [2000 + i, 3000 + i] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    refs = [o.outputs[0].token_ids for o in tiny_llama_engine.generate(prompts, params)]
    engines = start_engines(deployment)
    try:
        rs = engines["tiny"]
        assert isinstance(rs, ReplicaSet) and len(rs.replicas) == 2
        assert all(isinstance(e, EngineClient) for e in (rs, *rs.replicas))  # AsyncLLM has the surface

        async def one(i):
            out = None
            async for out in rs.generate({"prompt_token_ids": prompts[i]}, params, f"p-{i}", OutputKind.CUMULATIVE):
                pass
            return list(out.outputs[0].token_ids)

        async def all_of_them():
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(6))), 120)
        assert asyncio.run(all_of_them()) == [list(r) for r in refs]
        assert sorted(rs.num_routed.values()) == [0, 6], rs.num_routed
        (busy,) = [i for i, rid in enumerate(rs.replica_ids) if rs.num_routed[rid] == 6]
        deadline = time.monotonic() + 30
        while rs.replicas[busy].latest_stats.prefix_cache_hits == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rs.replicas[busy].latest_stats.prefix_cache_hits >= 48  # the shared blocks were reused there
    finally:
        shutdown_engines(engines)
