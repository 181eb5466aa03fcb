"""flotilla on Ray Serve, on a local two-node Ray cluster (``ray.cluster_utils.Cluster``, loopback only).

One cluster and one Serve instance per module. The main application (``build_openai_ray_app``: the tiny random
Llama as ``tiny`` with two replicas and prefix-aware routing, again as ``tiny-tp2`` with tensor parallel 2,
and an alias, behind the OpenAI ingress with an API key) serves the ``openai`` client tests, the routing and
cancellation tests, the tensor-parallel check and the fault tests (an engine core killed under load: only
requests that had produced output on it fail, retries never go back to it, the replica exits and is
replaced; a replica actor killed mid-generation: its non-streaming requests run again elsewhere, its streams
end with a JSON error event; each replacement is shown to serve traffic). The stall-based health check runs on a ``ModelServer`` in this process and on a deployment
of its own whose engine core is frozen (SIGSTOP) mid-request. Autoscaling deploys a model deployment of its
own and loads it through its deployment handle.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray_cluster_helpers import LOOPBACK, loopback_cluster  # noqa: E402

from flotilla.deploy.config import AutoscalingSpec, DeploymentConfig, ModelSpec  # noqa: E402
from flotilla.deploy.serve_wire import GENERATE_REQUEST, GenerateRequest, decode_frame  # noqa: E402
from flotilla.outputs import RequestOutput  # noqa: E402
from flotilla.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "sk-ray-key"
MAX_NUM_SEQS = 4
ENGINE = dict(max_model_len=512, num_kv_blocks=256, num_threads=1, max_num_seqs=MAX_NUM_SEQS)
FAST_HEALTH = dict(health_check_period_s=1.0, health_check_timeout_s=10.0, routing_stats_period_s=1.0,
                   stall_timeout_s=60.0, graceful_shutdown_timeout_s=2.0)


def model_spec(name: str, path: str, **kw) -> ModelSpec:
    return ModelSpec(name=name, model=path, engine=dict(ENGINE, **kw.pop("engine", {})), **kw)


# ---- cluster, Serve, application ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """Two nodes of three logical CPUs on 127.0.0.1, no dashboard, with this process connected."""
    with loopback_cluster(num_cpus=3) as cluster:
        ray.init(address=cluster.address)
        try:
            yield cluster
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def serve_url(ray_cluster):
    from flotilla.deploy.ray_serve import free_port
    port = free_port()
    serve.start(http_options={"host": LOOPBACK, "port": port}, proxy_location="HeadOnly")
    return f"http://{LOOPBACK}:{port}"


@pytest.fixture(scope="module")
def app(serve_url, tiny_llama):
    """The main application behind the OpenAI ingress: model ``tiny`` with two replicas, model ``tiny-tp2``
    (tensor parallel 2: its ranks are Ray actors in a placement group) and the alias ``tiny-alias``."""
    from flotilla.deploy.ray_serve import APP_NAME
    from flotilla.entrypoints.openai.ray_ingress import build_openai_ray_app
    config = DeploymentConfig(models=(model_spec("tiny", tiny_llama[0], replicas=2, ray=dict(FAST_HEALTH)),
                                      model_spec("tiny-tp2", tiny_llama[0], tensor_parallel_size=2)),
                              routes={"tiny-alias": {"tiny": 1.0}}, routing="prefix_aware", seed=0)
    serve.run(build_openai_ray_app(config, api_key=KEY), name=APP_NAME, route_prefix="/")
    # /health turns 200 once the ingress's first stats refresh has seen a ready replica of every model
    assert wait_until(lambda: httpx.get(serve_url + "/health", timeout=5).status_code == 200, 60), \
        httpx.get(serve_url + "/health", timeout=5).text
    yield serve_url
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app + "/v1", api_key=KEY, max_retries=0, timeout=120)


def tiny_handle():
    from flotilla.deploy.ray_serve import APP_NAME
    return serve.get_deployment_handle("tiny", app_name=APP_NAME)


def replica_stats(handle) -> dict[str, dict]:
    """``stats()`` of every replica of a deployment that answers, by replica id (none while it has no
    replica running, e.g. its only one is being replaced)."""
    try:
        results = handle.broadcast("stats").results(timeout_s=30, return_exceptions=True)
    except serve.exceptions.DeploymentUnavailableError:
        return {}
    return {s["replica_id"]: s for s in results if isinstance(s, dict)}


def running_replicas(deployment: str, app_name: str) -> int:
    status = serve.status().applications.get(app_name)
    if status is None or deployment not in status.deployments:
        return 0
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


def wait_until(predicate, timeout_s: float, period_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return predicate()


def completion(client, prompt, **kw):
    return client.completions.create(model="tiny", prompt=prompt, temperature=0, **kw)


# ---- the OpenAI API through the Ray ingress -----------------------------------------------------------------
def test_models_and_unknown_model(client, app):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-tp2", "tiny-alias"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert httpx.get(app + "/v1/models").status_code == 401  # the API key applies
    assert httpx.get(app + "/health").status_code == 200
    metrics = httpx.get(app + "/metrics")  # engine gauges: the replicas' stats, summed by the ingress
    assert metrics.status_code == 200 and 'flotilla:num_requests_running{model_name="tiny"}' in metrics.text
    for name in ("vllm:num_requests_running", "vllm:iteration_tokens_total_count", "vllm:cache_config_info"):
        assert f"{name}{{" in metrics.text, name  # vLLM's names through the Ray ingress too


def test_completion_and_stream(client):
    full = completion(client, "The capital of France is", max_tokens=12)
    assert full.object == "text_completion" and full.model == "tiny" and full.usage.completion_tokens == 12
    chunks = list(completion(client, "The capital of France is", max_tokens=12, stream=True,
                             stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 12
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"


def test_alias_and_second_model(client):
    via_alias = client.completions.create(model="tiny-alias", prompt="Hello", max_tokens=4, temperature=0)
    assert via_alias.model == "tiny" and via_alias.usage.completion_tokens == 4
    tp2 = client.chat.completions.create(model="tiny-tp2", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=4, temperature=0)
    assert tp2.model == "tiny-tp2" and tp2.usage.completion_tokens == 4


def test_chat_and_stream(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=10,
              temperature=0)
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


def test_both_replicas_receive_traffic(client):
    handle = tiny_handle()
    before = replica_stats(handle)
    assert len(before) == 2
    for i in range(10):  # short prompts: no full block to match, power of two choices spreads them
        completion(client, f"w{i}", max_tokens=2)
    after = replica_stats(handle)
    gained = {rid: after[rid]["requests_total"] - before[rid]["requests_total"] for rid in after}
    assert all(n > 0 for n in gained.values()), gained


# ---- prefix-aware routing -----------------------------------------------------------------------------------
SHARED = [1] + [(37 * i) % 4000 + 100 for i in range(79)]  # 80 tokens: 5 full blocks of 16


def test_shared_prefix_goes_to_one_replica_with_cache_hits(client):
    handle = tiny_handle()
    before = replica_stats(handle)
    for i in range(6):
        completion(client, SHARED + [500 + i, 600 + i], max_tokens=2)
    after = replica_stats(handle)
    gained = {rid: after[rid]["requests_total"] - before[rid]["requests_total"] for rid in after}
    hot = max(gained, key=gained.get)
    print("prefix routing:", gained, "hits", after[hot]["prefix_cache_hits"] - before[hot]["prefix_cache_hits"])
    assert gained[hot] >= 5, gained
    hits = after[hot]["prefix_cache_hits"] - before[hot]["prefix_cache_hits"]
    assert hits >= 4 * 64, (hits, after[hot])


def test_cache_salt_reaches_the_replica(client):
    """``cache_salt`` through the ingress and the replica: another salt's request of the same prompt finds
    no cached block, the same salt's does (prefix-aware routing keeps the prompt on one replica)."""
    handle = tiny_handle()
    prompt = [1] + [(41 * i) % 5000 + 200 for i in range(79)]  # 80 tokens, shared with no other test

    def hits_of(salt: str) -> int:
        before = replica_stats(handle)
        completion(client, prompt, max_tokens=2, extra_body={"cache_salt": salt})
        return _gained(before, replica_stats(handle), "prefix_cache_hits")
    assert hits_of("alice") == 0
    assert hits_of("bob") == 0
    assert hits_of("alice") == 64  # four full blocks (the fifth holds the token that is computed)


def test_saturated_hot_replica_sends_new_requests_elsewhere(client):
    """More concurrent shared-prefix requests than the hot replica's batch: the excess goes to the other."""
    handle = tiny_handle()
    completion(client, SHARED + [7], max_tokens=1)  # (re)establish the affinity
    before = replica_stats(handle)

    async def burst():
        aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key=KEY, max_retries=0, timeout=120)
        await asyncio.gather(*[aclient.completions.create(
            model="tiny", prompt=SHARED + [800 + i], max_tokens=160, temperature=0,
            extra_body={"ignore_eos": True}) for i in range(3 * MAX_NUM_SEQS)])
        await aclient.close()

    asyncio.run(burst())
    after = replica_stats(handle)
    gained = sorted(after[rid]["requests_total"] - before[rid]["requests_total"] for rid in after)
    print("saturation:", gained)
    assert sum(gained) == 3 * MAX_NUM_SEQS
    assert gained[0] >= MAX_NUM_SEQS // 2, gained  # the cold replica took a real share
    assert gained[1] >= MAX_NUM_SEQS, gained  # the hot one was filled first


def _gained(before: dict, after: dict, key: str) -> int:
    return sum(after[rid][key] - before.get(rid, {}).get(key, 0) for rid in after)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_client_disconnect_aborts_the_request_on_its_replica(app, stream):
    handle = tiny_handle()
    before = replica_stats(handle)
    body = {"model": "tiny", "prompt": f"cancel me {stream}", "max_tokens": 480, "ignore_eos": True,
            "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}"}
    if stream:
        with httpx.stream("POST", app + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break
    else:  # four samples of 480 tokens take seconds here; the client gives up long before
        with pytest.raises(httpx.TimeoutException):
            httpx.post(app + "/v1/completions", json=dict(body, n=4), headers=headers, timeout=0.3)

    def settled() -> bool:
        after = replica_stats(handle)
        return (_gained(before, after, "requests_unfinished") == 1
                and all(s["num_running"] == s["num_ongoing"] == 0 and s["kv_cache_usage"] == 0
                        for s in after.values()))
    assert wait_until(settled, 30), replica_stats(handle)


# ---- tensor parallelism, through a deployment handle ------------------------------------------------------
async def _generate(handle, prompt_ids, params, request_id) -> list[int]:
    """Call the replica's ``generate`` as the ingress does: wire bytes in, wire bytes out (never pickled
    flotilla objects)."""
    request = GenerateRequest(request_id, None, prompt_ids, params)
    tokens = []
    async for data in handle.options(stream=True).generate.remote(GENERATE_REQUEST.encode(request)):
        assert type(data) is bytes, type(data)
        out = decode_frame(data, request)
        if isinstance(out, RequestOutput):  # after the replica's Accepted frame
            tokens.extend(out.outputs[0].token_ids)
    return tokens


PROMPTS = [[1, 520, 3100, 42], [1, 77, 9, 1234, 5678, 91, 4, 300, 2001], [1, 17]]


def test_tensor_parallel_2_matches_single_process(app, tiny_llama):
    """The ``tiny-tp2`` replica's two ranks are Ray actors (one CPU bundle each) of the two-node cluster;
    its greedy tokens equal the offline single-process run's."""
    from flotilla import LLM
    from flotilla.deploy.ray_serve import APP_NAME
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in
                 LLM(model=tiny_llama[0], max_model_len=512, num_kv_blocks=256).generate(PROMPTS, params)]
    handle = serve.get_deployment_handle("tiny-tp2", app_name=APP_NAME)

    async def run_all():
        return await asyncio.gather(*[_generate(handle, p, params, f"tp{i}") for i, p in enumerate(PROMPTS)])
    assert asyncio.run(run_all()) == reference
    ranks = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "-rank" in a["name"]]
    assert len(ranks) == 2, ranks


# ---- faults -------------------------------------------------------------------------------------------------
def serve_replica_actors(deployment: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA") and f"#{deployment}#" in a["name"]]


def victim_actor(replica_id: str):
    (name,) = [n for n in serve_replica_actors("tiny") if n.endswith(replica_id)]
    return ray.get_actor(name, namespace="serve")


def wait_for_replacement(handle, victim_id: str, timeout_s: float = 120) -> bool:
    return wait_until(lambda: running_replicas("tiny", "flotilla") == 2 and victim_id not in replica_stats(handle)
                      and len(replica_stats(handle)) == 2, timeout_s, 0.2)


def check_replacement_serves(client, handle, old_ids: set) -> None:
    """Requests keep succeeding until the replacement has served one (power of two choices reaches it)."""
    new_ids = set(replica_stats(handle)) - old_ids
    assert len(new_ids) == 1, replica_stats(handle)
    (new_id,) = new_ids
    for i in range(60):
        assert completion(client, f"still serving {i}", max_tokens=3).usage.completion_tokens == 3
        if replica_stats(handle).get(new_id, {}).get("requests_total", 0) > 0:
            break
    fresh = replica_stats(handle)[new_id]
    assert fresh["requests_total"] > 0 and fresh["requests_unfinished"] == 0, fresh


def no_ray_internals(message: str) -> bool:
    return not any(word in message.lower() for word in ("ray", "actor", "oom", "worker", "traceback"))


def test_engine_core_killed_under_load(client, tiny_llama):
    """kill -9 one replica's engine core during 40 requests at concurrency 8 (through a ``RemoteEngine`` in
    this process, the ingress's code, so its attempt log can be read): only requests that had produced output
    on that replica fail; every other one succeeds; no request is ever re-sent to a replica it failed on; the
    replica leaves (its actor exits) and Serve replaces it. The engine here marks failed replicas in a
    registry of its own, not the one this process's router reads: the router keeps offering the dead replica
    until it leaves, as for an ingress replica that has not seen it fail yet (the worst case), so requests
    do land on it before their first output and are re-sent."""
    from flotilla.deploy.remote_engine import RemoteEngine
    from flotilla.deploy.replica_failures import FailedReplicas
    from flotilla.engine.output_processor import OutputKind
    from flotilla.errors import EngineDeadError
    handle = tiny_handle()
    before = replica_stats(handle)
    assert len(before) == 2
    engine = RemoteEngine("tiny", handle, model_spec("tiny", tiny_llama[0]).engine_args(),
                          failed_replicas=FailedReplicas())
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    results: dict[str, tuple[str | None, int]] = {}  # request id -> (error or None, tokens received)
    kill: dict = {}

    async def one(i: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            got, error = 0, None
            try:
                async for out in engine.generate({"prompt_token_ids": [1, 100 + i, 7, 300 + i]}, params, f"k{i}",
                                                 OutputKind.DELTA):
                    got += sum(len(c.token_ids) for c in out.outputs)
            except EngineDeadError as e:
                error = str(e)
            results[f"k{i}"] = (error, got)

    async def killer() -> None:  # once some requests are done and a replica has requests in flight
        while True:
            stats = {s["replica_id"]: s for s in await engine.refresh_stats()}
            busy = [rid for rid, s in stats.items() if s["num_ongoing"] > 0]
            if len(results) >= 4 and busy:
                kill["victim"], kill["at"] = busy[0], time.monotonic()
                os.kill(stats[busy[0]]["core_pid"], signal.SIGKILL)
                break
            await asyncio.sleep(0.02)
        while kill["victim"] in {s["replica_id"] for s in await engine.refresh_stats()}:
            await asyncio.sleep(0.05)
        kill["left_s"] = time.monotonic() - kill["at"]  # its actor no longer answers

    async def main() -> None:
        gate = asyncio.Semaphore(8)
        await asyncio.gather(killer(), *[one(i, gate) for i in range(40)])
    asyncio.run(main())
    victim = kill["victim"]
    replaced = wait_for_replacement(handle, victim)
    replaced_s = time.monotonic() - kill["at"]
    by_request: dict[str, list[tuple[str | None, str]]] = {}
    for rid, replica, outcome in engine.attempts:
        by_request.setdefault(rid, []).append((replica, outcome))
    print("re-sent requests:", {rid: a for rid, a in by_request.items() if len(a) > 1})
    failed = {rid: r for rid, r in results.items() if r[0] is not None}
    print(f"engine core kill: {len(failed)}/40 failed, {engine.num_retries} re-sent, the replica gone after "
          f"{kill['left_s']:.1f} s, replaced after {replaced_s:.1f} s; failed: {failed}")
    assert len(results) == 40
    for rid, (error, got) in results.items():
        attempts = by_request[rid]
        failed_on = set()
        for replica, outcome in attempts:
            assert replica not in failed_on, (rid, attempts)  # never re-sent to a replica it failed on
            if outcome == "failed":
                failed_on.add(replica)
        if error is None:
            assert got == 64 and attempts[-1][1] == "ok", (rid, attempts)
        else:  # only a request that had produced output on the dead replica may fail
            assert got > 0 and attempts == [(victim, "failed")], (rid, error, attempts)
            assert "after it had started streaming" in error and no_ray_internals(error), error
    assert any(outcome == "failed" and replica == victim for _, replica, outcome in engine.attempts)
    assert replaced, serve.status()
    check_replacement_serves(client, handle, set(before))


def test_replica_actor_killed_mid_generation(app, client):
    """ray.kill of a model replica's actor while it generates streaming and non-streaming requests: its
    non-streaming requests run again on the other replica and succeed whole; its streaming ones, which had
    sent tokens, end with an OpenAI JSON error event that names no Ray internals; Serve replaces it."""
    handle = tiny_handle()
    before = replica_stats(handle)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "max_tokens": 450, "ignore_eos": True, "temperature": 0}
    streams: dict[int, str] = {}  # stream index -> completion id
    state: dict = {}

    async def streaming(http, i: int) -> list[dict]:
        events = []
        async with http.stream("POST", "/v1/completions", json=dict(body, prompt=f"stream {i}", stream=True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    streams.setdefault(i, events[-1].get("id"))
        return events

    async def plain(http, i: int):
        r = await http.post("/v1/completions", json=dict(body, prompt=f"plain {i}"))
        return r.status_code, r.json()

    async def killer() -> None:
        """Once every stream has sent tokens: kill a replica that holds streaming and non-streaming requests."""
        while True:
            await asyncio.sleep(0.05)
            if len(streams) < 3:
                continue
            stats = await handle.broadcast("stats").results_async(timeout_s=30, return_exceptions=True)
            for s in (s for s in stats if isinstance(s, dict)):
                bases = {rid.rsplit("-", 1)[0] for rid in s["ongoing_request_ids"]}
                if bases & set(streams.values()) and bases - set(streams.values()):
                    state.update(victim=s["replica_id"], bases=bases, at=time.monotonic())
                    ray.kill(victim_actor(s["replica_id"]), no_restart=True)
                    return

    async def main():
        async with httpx.AsyncClient(base_url=app, headers=headers, timeout=300) as http:
            return await asyncio.gather(asyncio.wait_for(killer(), 120), *[streaming(http, i) for i in range(3)],
                                        *[plain(http, i) for i in range(5)])
    _, *outcomes = asyncio.run(main())
    stream_events, plain_results = outcomes[:3], outcomes[3:]
    victim, on_victim = state["victim"], state["bases"]
    for status, result in plain_results:
        assert status == 200 and result["usage"]["completion_tokens"] == 450, result
    assert any(result["id"] in on_victim for _, result in plain_results)
    failed_streams = 0
    for i, events in enumerate(stream_events):
        errors = [e["error"] for e in events if "error" in e]
        if streams[i] in on_victim:
            failed_streams += 1
            assert len(errors) == 1 and set(errors[0]) == {"message", "type", "param", "code"}, events[-2:]
            assert "after it had started streaming" in errors[0]["message"], errors
            assert no_ray_internals(errors[0]["message"]), errors
        else:
            assert not errors and events[-1]["choices"][0]["finish_reason"] == "length", events[-2:]
    assert failed_streams >= 1
    replaced = wait_for_replacement(handle, victim)
    print(f"actor kill: {failed_streams} streams failed, {len(on_victim) - failed_streams} non-streaming re-run; "
          f"replaced after {time.monotonic() - state['at']:.1f} s")
    assert replaced, serve.status()
    check_replacement_serves(client, handle, set(before))


# ---- the stall-based health check -------------------------------------------------------------------------
# Short enough for a test, long enough that no step of a warmed-up tiny engine takes it on a busy machine (a
# cold engine's first step loads the fused kernels, which took 9 s on a busy 2-core machine: each test warms
# its engine up first). Under Serve the health checks run during the warm-up too, so its timeout is longer:
# a replica killed while its core holds the kernel build lock would leave the lock behind.
STALL_TIMEOUT_S = 5.0
SERVE_STALL_TIMEOUT_S = 20.0
WARM_UP = SamplingParams(temperature=0.0, max_tokens=4)


async def _consume(make_stream, first: threading.Event, sink: list, request: GenerateRequest) -> None:
    """Iterate ``make_stream()`` (a ``generate`` stream of ``request``: frame bytes); set ``first`` at its first
    output; append the decoded outputs and failure frames (or the error) to sink."""
    try:
        async for data in make_stream():
            frame = decode_frame(data, request)
            if isinstance(frame, RequestOutput) or type(frame).__name__ == "GenerateFailure":
                sink.append(frame)
                first.set()
    except Exception as e:  # noqa: BLE001 - inspected by the test
        sink.append(e)
    finally:
        first.set()


def run_in_thread(coro_fn) -> threading.Thread:
    thread = threading.Thread(target=lambda: asyncio.run(coro_fn()), daemon=True)
    thread.start()
    return thread


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stalled_engine_fails_the_health_check_then_recovers(ray_cluster, tiny_llama):
    """``ModelServer.check_health`` with a real engine whose core process is frozen (SIGSTOP) while a request
    is in flight: it passes until the engine has made no progress for ``stall_timeout_s``, then raises; once
    the core runs again (SIGCONT) it passes again and the request finishes whole."""
    from flotilla.deploy.ray_serve import ModelServer
    from flotilla.engine.arg_utils import EngineArgs
    server = ModelServer("stall", EngineArgs(model=tiny_llama[0], **ENGINE), stall_timeout_s=STALL_TIMEOUT_S)
    core = server.core_pid()
    try:
        server.check_health()  # idle: healthy
        warm = GenerateRequest("warm", None, [1, 2], WARM_UP)
        run_in_thread(lambda: _consume(lambda: server.generate(GENERATE_REQUEST.encode(warm)), threading.Event(),
                                       [], warm)).join(120)
        request = GenerateRequest("stalled", None, [1, 5, 9],
                                  SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        first, outs = threading.Event(), []
        thread = run_in_thread(lambda: _consume(lambda: server.generate(GENERATE_REQUEST.encode(request)), first,
                                                outs, request))
        assert first.wait(60) and not isinstance(outs[0], Exception), outs
        server.check_health()
        os.kill(core, signal.SIGSTOP)
        stopped_at = time.monotonic()
        failure = None
        while failure is None:
            try:
                server.check_health()
            except RuntimeError as e:
                failure = e
            assert time.monotonic() - stopped_at < 60, "the frozen engine was never reported as stalled"
            time.sleep(0.1)
        assert time.monotonic() - stopped_at >= STALL_TIMEOUT_S  # not before the configured timeout
        assert "made no progress" in str(failure) and "1 request(s) in flight" in str(failure), failure
        os.kill(core, signal.SIGCONT)

        def healthy() -> bool:
            try:
                server.check_health()
                return True
            except RuntimeError:
                return False
        assert wait_until(healthy, 60, 0.1), "the health check did not recover once the engine ran again"
        thread.join(120)
        assert not thread.is_alive() and not any(isinstance(o, Exception) for o in outs), outs[-1:]
        assert outs[-1].finished and sum(len(o.outputs[0].token_ids) for o in outs) == 400
        server.check_health()
    finally:
        if pid_alive(core):
            os.kill(core, signal.SIGCONT)
        server.__del__()
    assert wait_until(lambda: not pid_alive(core), 30, 0.1), "the engine core outlived its replica"


def test_stalled_replica_is_replaced_by_serve(serve_url, tiny_llama):
    """A deployment with a short ``stall_timeout_s``: its replica's engine core frozen mid-request fails Serve's
    health checks, Serve replaces the replica (not before the stall timeout), the replacement serves, and
    the frozen core does not outlive its replica."""
    from flotilla.deploy.ray_serve import model_deployment
    from flotilla.ops import cpu_kernels
    cpu_kernels()  # built before any replica starts: a replica replaced mid-build would leave its lock behind
    spec = model_spec("stall", tiny_llama[0], ray=dict(FAST_HEALTH, stall_timeout_s=SERVE_STALL_TIMEOUT_S))
    handle = serve.run(model_deployment(spec).bind("stall", spec.engine_args(), SERVE_STALL_TIMEOUT_S),
                       name="stall", route_prefix=None)
    core = None
    try:
        assert len(asyncio.run(_generate(handle, [1, 2], WARM_UP, "warm"))) == 4
        ((old_id, old),) = replica_stats(handle).items()
        core = old["core_pid"]
        request = GenerateRequest("frozen", None, [1, 5, 9],
                                  SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        first, outs = threading.Event(), []
        thread = run_in_thread(lambda: _consume(
            lambda: handle.options(stream=True).generate.remote(GENERATE_REQUEST.encode(request)), first, outs,
            request))
        assert first.wait(60) and not isinstance(outs[0], Exception), outs
        os.kill(core, signal.SIGSTOP)
        stopped_at = time.monotonic()
        assert wait_until(lambda: old_id not in replica_stats(handle) and len(replica_stats(handle)) == 1, 120), \
            serve.status()
        assert time.monotonic() - stopped_at >= SERVE_STALL_TIMEOUT_S  # stalled, not dead: replaced only then
        thread.join(60)
        assert not thread.is_alive() and not isinstance(outs[-1], RequestOutput), outs[-1:]  # it failed
        tokens = asyncio.run(_generate(handle, [1, 5, 9], SamplingParams(temperature=0.0, max_tokens=5),
                                       "after-stall"))
        assert len(tokens) == 5
        ((new_id, new),) = replica_stats(handle).items()
        assert new_id != old_id and new["requests_total"] >= 1 and new["requests_unfinished"] == 0, new
        assert wait_until(lambda: not pid_alive(core), 60, 0.2), "the frozen engine core outlived its replica"
    finally:
        if core is not None and pid_alive(core):
            os.kill(core, signal.SIGCONT)
        serve.delete("stall")


# ---- autoscaling (an application of its own, loaded through its handle) ---------------------------------
def test_autoscaling_up_under_load_and_back_to_min(serve_url, tiny_llama):
    from flotilla.deploy.ray_serve import model_deployment
    auto = AutoscalingSpec(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1.0,
                           downscale_delay_s=3.0)
    spec = model_spec("auto", tiny_llama[0], autoscaling=auto,
                      ray=dict(FAST_HEALTH, autoscaling_config={"metrics_interval_s": 0.5, "look_back_period_s": 2.0}))
    handle = serve.run(model_deployment(spec).bind("auto", spec.engine_args(), 60.0), name="auto",
                       route_prefix=None)
    try:
        assert running_replicas("auto", "auto") == 1
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        stop = threading.Event()

        async def load():
            n = 0
            while not stop.is_set():
                n += 1
                await asyncio.gather(*[_generate(handle, [1, 5, 9, n, i], params, f"a{n}-{i}") for i in range(4)])

        thread = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
        thread.start()
        try:
            assert wait_until(lambda: running_replicas("auto", "auto") == 2, 120), serve.status()
        finally:
            stop.set()
            thread.join(timeout=120)
        assert wait_until(lambda: running_replicas("auto", "auto") == 1 and
                          serve.status().applications["auto"].deployments["auto"].status == "HEALTHY", 90), \
            serve.status()
    finally:
        serve.delete("auto")
