"""Request priorities end to end on the tiny Llama: ``LLMEngine`` under both scheduling policies, ``LLM.generate
(priority=[...])``, the HTTP ``priority`` field and the in-process ``"flotilla.priority"`` ASGI scope key (an app
over a real ``AsyncLLM``), the CLI flag and the deployment file key. The scheduler itself:
``test_scheduler_priority.py``; the 400 under fcfs against a real server: ``test_request_fields.py``.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from flotilla import BATCH_PRIORITY
from flotilla.deploy.config import DeploymentConfigError, load_deployment_config
from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.async_llm import AsyncLLM
from flotilla.engine.llm_engine import LLMEngine
from flotilla.entrypoints.openai.api_server import build_app
from flotilla.entrypoints.openai.cli_args import ServerConfig
from flotilla.entrypoints.openai.generation import PRIORITY_SCOPE_KEY, request_priority
from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time", "1, 2, 3,", "Hello, my name is", "The capital of France is"]
LENGTHS = [3, 12, 6, 6, 6]  # b0 finishes first, so seats free one at a time


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def reference_outputs(tiny_llama_engine):
    """Every prompt's greedy output from one batch without priorities (the shared engine: left idle)."""
    return [o.outputs[0] for o in tiny_llama_engine.generate(PROMPTS, [greedy(n) for n in LENGTHS])]


@pytest.fixture(scope="module")
def references(reference_outputs):
    return [o.token_ids for o in reference_outputs]


# ------------------------------------------------------------------------------------------------ engine
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_online_request_runs_before_queued_batch_requests(tiny_llama, references, policy):
    """Two seats saturated by batch requests, two more queued: an online (priority 0) request added later
    runs before the queued ones (fcfs: in the first free seat; priority: at once, preempting the worst batch
    request), and every request's tokens equal the run without priorities."""
    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_llama[0], max_model_len=256, num_kv_blocks=64,
                                                   max_num_seqs=2, scheduling_policy=policy))
    try:
        first_step, finals = {}, {}

        def step(i: int) -> None:
            for out in engine.step():
                first_step.setdefault(out.request_id, i)
                if out.finished:
                    finals[out.request_id] = out.outputs[0].token_ids

        for i in range(4):
            engine.add_request(f"b{i}", PROMPTS[i], greedy(LENGTHS[i]), priority=BATCH_PRIORITY)
        step(0)
        assert set(first_step) == {"b0", "b1"}
        engine.add_request("online", PROMPTS[4], greedy(LENGTHS[4]))  # priority 0
        i = 1
        while engine.has_unfinished_requests():
            step(i)
            i += 1
        assert first_step["online"] < first_step["b2"] < first_step["b3"]
        if policy == "priority":
            assert first_step["online"] == 1 and engine.scheduler.num_preemptions == 1
        else:
            assert first_step["online"] == LENGTHS[0] and engine.scheduler.num_preemptions == 0
        assert [finals[r] for r in ("b0", "b1", "b2", "b3", "online")] == references
    finally:
        engine.shutdown()


def test_llm_generate_takes_one_priority_per_prompt(tiny_llama_engine, references):
    outs = tiny_llama_engine.generate(PROMPTS[:2], [greedy(n) for n in LENGTHS[:2]], priority=[BATCH_PRIORITY, -1])
    assert [o.outputs[0].token_ids for o in outs] == references[:2]
    with pytest.raises(ValueError, match="1 priorities for 2 prompts"):
        tiny_llama_engine.generate(PROMPTS[:2], greedy(2), priority=[0])
    for bad in (3, [0, True], [0, 2**63]):
        with pytest.raises(InvalidRequestError) as e:
            tiny_llama_engine.generate(PROMPTS[:2], greedy(2), priority=bad)
        assert e.value.param == "priority"
    assert not tiny_llama_engine.engine.has_unfinished_requests()


# ------------------------------------------------------------------------------------------------ settings
def test_scheduling_policy_flag_and_deployment_key(tmp_path):
    from flotilla.entrypoints.cli import build_parser
    ns = build_parser().parse_args(["serve", "m", "--scheduling-policy", "priority"])
    from flotilla.deploy.engine_args import engine_args_from
    assert engine_args_from(ns).scheduling_policy == "priority"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--scheduling-policy", "lifo"])
    good = tmp_path / "good.yaml"
    good.write_text("models: [{name: a, model: m, engine: {scheduling_policy: priority}}]\n")
    assert load_deployment_config(str(good)).models[0].engine_args().scheduling_policy == "priority"
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{name: a, model: m, engine: {scheduling_policy: lifo}}]\n")
    with pytest.raises(DeploymentConfigError, match="scheduling_policy.*fcfs, priority"):
        load_deployment_config(str(bad))


def test_embedding_models_refuse_the_priority_policy():
    with pytest.raises(InvalidRequestError) as e:
        EngineArgs(model="all-minilm-l6-v2", scheduling_policy="priority").create_engine_config()
    assert e.value.param == "scheduling_policy"


# ------------------------------------------------------------------------------------------------ HTTP
def test_request_priority_rules():
    assert request_priority(None, {}, None) == request_priority(None, {PRIORITY_SCOPE_KEY: None}, None) == 0
    assert request_priority(0, {PRIORITY_SCOPE_KEY: BATCH_PRIORITY}, None) == BATCH_PRIORITY
    assert request_priority(3, {PRIORITY_SCOPE_KEY: BATCH_PRIORITY}, "priority") == BATCH_PRIORITY + 3
    assert request_priority(-2, {}, "priority") == -2
    for policy in ("fcfs", None):
        with pytest.raises(InvalidRequestError, match="priority scheduling is not enabled") as e:
            request_priority(1, {PRIORITY_SCOPE_KEY: BATCH_PRIORITY}, policy)
        assert e.value.param == "priority"
    with pytest.raises(InvalidRequestError):
        request_priority(2**63 - 1, {PRIORITY_SCOPE_KEY: 1}, "priority")  # the sum leaves 64 bits
    with pytest.raises(TypeError):
        request_priority(None, {PRIORITY_SCOPE_KEY: "1"}, None)  # a bug of the in-process caller
    with pytest.raises(ValueError):
        request_priority(None, {PRIORITY_SCOPE_KEY: 2**64}, None)


def with_scope_priority(app, priority: int):
    """What an in-process caller (the batch runner) does: call the ASGI app with the scope key set."""
    async def call(scope, receive, send):
        await app({**scope, PRIORITY_SCOPE_KEY: priority}, receive, send)
    return call


async def until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_http_priority_and_scope_key_order_the_queue(tiny_llama, reference_outputs):
    """One seat (``--max-num-seqs 1``, policy priority), held by a long request: queued in the order B (scope
    key BATCH_PRIORITY), C (body priority 3), D (body priority BATCH_PRIORITY * 2), they run C, B, D. C before B
    shows the scope key reached the engine, D after B that the body's priority did; the answers are the greedy
    tokens of a run without priorities."""
    engine = AsyncLLM(EngineArgs(model=tiny_llama[0], max_model_len=256, num_kv_blocks=64, max_num_seqs=1,
                                 scheduling_policy="priority"))
    app, served = build_app(engine, ServerConfig(served_model_name="tiny"))
    batch_app = with_scope_priority(app, BATCH_PRIORITY)

    def body(i: int, **extra) -> dict:
        return {"prompt": PROMPTS[i], "max_tokens": LENGTHS[i], "temperature": 0, "ignore_eos": True, **extra}

    async def scenario():
        done: list[str] = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c, \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=batch_app), base_url="http://t", timeout=120) as b:
            async def post(name, client, path, payload):
                r = await client.post(path, json=payload)
                done.append(name)
                return r

            blocker = engine.generate(PROMPTS[0], greedy(200), "blocker")
            await blocker.__anext__()  # running: the only seat is taken
            tasks = []
            for name, client, payload in (("B", b, body(1)), ("C", c, body(2, priority=3)),
                                          ("D", c, body(3, priority=2 * BATCH_PRIORITY))):
                tasks.append(asyncio.ensure_future(post(name, client, "/v1/completions", payload)))
                await until(lambda: engine.num_queued_requests == len(tasks), f"{name} to be queued")
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": -1}
            await blocker.aclose()  # aborts it: the seat frees
            responses = await asyncio.gather(*tasks)
            chat_response = await c.post("/v1/chat/completions", json=chat)
        return done, responses, chat_response

    try:
        done, responses, chat_response = asyncio.run(scenario())
    finally:
        served.close()
        engine.shutdown()
    assert done == ["C", "B", "D"]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert [r.json()["choices"][0]["text"] for r in responses] == [reference_outputs[i].text for i in (1, 2, 3)]
    assert chat_response.status_code == 200, chat_response.text
