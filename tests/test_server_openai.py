"""The official ``openai`` client against a real ``flotilla serve`` process (tiny random Llama, CPU).

One server per module, started with an API key, so the key checks and the client tests share it.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from test_server_helpers import ServerProcess, sse_events

KEY = "sk-test-key"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colors."}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[1, 3], ids=["tp1", "tp3"])
def server(request, tiny_llama, tiny_llama_h6):
    """The same client tests against a one-process server and a tensor-parallel-3 server (issue 4)."""
    tp = request.param
    path = tiny_llama[0] if tp == 1 else tiny_llama_h6[0]
    srv = ServerProcess(path, "--max-model-len", "512", "--num-kv-blocks", "256", "--served-model-name", "tiny",
                        "--tensor-parallel-size", str(tp), api_key=KEY)
    srv.hf_model = tiny_llama[1] if tp == 1 else tiny_llama_h6[1]  # the oracle for prompt logprobs
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)


def greedy_completion(client, prompt=PROMPT, **kw):
    return client.completions.create(model="tiny", prompt=prompt, temperature=0, **kw)


def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    card = models[0].model_dump()
    assert card["object"] == "model" and card["owned_by"] == "flotilla" and card["max_model_len"] == 512
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_version(server):
    r = httpx.get(server.url + "/version", headers=server.headers)
    assert r.status_code == 200 and r.json()["version"]


def test_completion(client):
    out = greedy_completion(client, max_tokens=8)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == "tiny"
    assert out.created > 0 and len(out.choices) == 1
    choice = out.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_completion_default_max_tokens_and_token_prompt(client, server):
    out = greedy_completion(client)
    assert out.usage.completion_tokens == 16
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, headers=server.headers).json()["tokens"]
    by_ids = greedy_completion(client, prompt=ids)
    assert by_ids.choices[0].text == out.choices[0].text


def test_streamed_completion_equals_non_streamed(client):
    full = greedy_completion(client, max_tokens=20)
    chunks = list(greedy_completion(client, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 20
    assert usage.usage.prompt_tokens == full.usage.prompt_tokens
    token_chunks = chunks[:-1]
    assert len(token_chunks) == usage.usage.completion_tokens  # one chunk per generated token
    assert all(c.id == token_chunks[0].id and c.object == "text_completion" for c in token_chunks)
    assert "".join(c.choices[0].text for c in token_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * 19 + ["length"]


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(greedy_completion(client, max_tokens=5, stream=True))
    assert len(chunks) == 5 and all(c.choices for c in chunks)


def test_chat(client, server):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == "tiny"
    msg = out.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"
    n_prompt = out.usage.prompt_tokens
    tok = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}, headers=server.headers).json()
    assert tok["count"] == n_prompt


def test_chat_max_completion_tokens(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3


def test_streamed_chat_equals_non_streamed(client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=15, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    token_chunks, usage = chunks[:-1], chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 15 == len(token_chunks)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert token_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in token_chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in token_chunks)
    assert text == full.choices[0].message.content
    assert token_chunks[-1].choices[0].finish_reason == "length"


def test_n2_and_several_prompts(client):
    single_a = greedy_completion(client, prompt="a b c", max_tokens=6).choices[0].text
    single_b = greedy_completion(client, prompt="x y z", max_tokens=6).choices[0].text
    out = greedy_completion(client, prompt=["a b c", "x y z"], n=2, max_tokens=6)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] == by_index[1] == single_a and by_index[2] == by_index[3] == single_b
    assert out.usage.completion_tokens == 24
    sampled = client.completions.create(model="tiny", prompt="a b c", n=2, max_tokens=6, temperature=1.0, seed=3)
    assert len(sampled.choices) == 2
    streamed = list(client.completions.create(model="tiny", prompt=["a b c", "x y z"], n=2, max_tokens=6,
                                              temperature=0, stream=True))
    assert len(streamed) == 24
    texts = {i: "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(4)}
    assert texts == by_index


def test_chat_n2(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2, temperature=1.0,
                                         seed=5)
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2,
                                                 temperature=1.0, seed=5, stream=True))
    assert len(chunks) == 8
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert "".join(c.delta.content for c in mine) == out.choices[i].message.content


def test_completion_logprobs(client):
    out = greedy_completion(client, max_tokens=6, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) >= 3 and top[token] == pytest.approx(token_lp)
        assert token_lp == pytest.approx(max(top.values()))  # greedy: the sampled token is the most likely
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    if "\ufffd" not in "".join(lp.tokens):
        assert "".join(lp.tokens) == out.choices[0].text
    streamed = list(greedy_completion(client, max_tokens=6, logprobs=3, stream=True))
    assert [c.choices[0].logprobs.tokens[0] for c in streamed] == lp.tokens
    assert [c.choices[0].logprobs.text_offset[0] for c in streamed] == lp.text_offset


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    no_top = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0,
                                            logprobs=True)
    assert all(e.top_logprobs == [] for e in no_top.choices[0].logprobs.content)


def _stop_candidate(text: str) -> int:
    """A position p >= 1 where the 3 characters at p first occur in ``text``."""
    for p in range(1, len(text) - 3):
        piece = text[p:p + 3]
        if piece.strip() and "\ufffd" not in piece and text.find(piece) == p:
            return p
    pytest.skip("no usable stop string in the greedy output")


def test_stop_strings(client):
    full = greedy_completion(client, max_tokens=24, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    p = _stop_candidate(text)
    stop = text[p:p + 3]
    out = greedy_completion(client, max_tokens=24, stop=[stop, "\u2603never"])
    assert out.choices[0].text == text[:p] and out.choices[0].finish_reason == "stop"
    streamed = list(greedy_completion(client, max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text[:p]
    assert streamed[-1].choices[0].finish_reason == "stop"
    kept = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=24, stop=stop,
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:p + 3]


def test_seed_reproducibility(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0)
    a = client.completions.create(**kw, seed=1234).choices[0].text
    b = client.completions.create(**kw, seed=1234).choices[0].text
    c = client.completions.create(**kw, seed=99).choices[0].text
    assert a == b and a != c
    chat_kw = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=7)
    assert (client.chat.completions.create(**chat_kw).choices[0].message.content
            == client.chat.completions.create(**chat_kw).choices[0].message.content)


def test_echo(client):
    out = greedy_completion(client, max_tokens=4, echo=True)
    plain = greedy_completion(client, max_tokens=4)
    assert out.choices[0].text == PROMPT + plain.choices[0].text
    streamed = list(greedy_completion(client, max_tokens=4, echo=True, stream=True))
    assert len(streamed) == 4 and "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def _hf_logprobs(server, ids: list[int]):
    import torch
    with torch.no_grad():
        logits = server.hf_model(torch.tensor([ids])).logits[0].float()  # (P, V)
    return torch.log_softmax(logits, dim=-1)


def _lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-evaluation-harness's ``LocalCompletionsAPI.parse_logprobs`` for one choice (its exact reading)."""
    lp = choice["logprobs"]
    tokens_logprobs = lp["token_logprobs"][ctxlen:-1]
    is_greedy = all(tok == max(top.values()) for tok, top in zip(tokens_logprobs, lp["top_logprobs"][ctxlen:-1]))
    return sum(tokens_logprobs), is_greedy


def test_echo_logprobs_score_the_prompt_as_lm_eval_reads_it(server):
    """lm-eval's loglikelihood request (token-id prompts, echo, logprobs 1, max_tokens 1) and the
    max_tokens 0 form: the prompt's logprobs equal transformers', the first token's are null."""
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Question: 2 + 2 = ? Answer: four"},
                     headers=server.headers).json()["tokens"]
    ctx = httpx.post(server.url + "/tokenize", json={"prompt": "Question: 2 + 2 = ? Answer:"},
                     headers=server.headers).json()["tokens"]
    ctxlen = len(ctx)
    assert ids[:ctxlen] == ctx and len(ids) > ctxlen
    other = ids[:ctxlen] + [ids[-1] + 1]
    body = {"model": "tiny", "prompt": [ids, other], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    r = httpx.post(server.base_url + "/completions", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    for prompt, choice in zip((ids, other), choices):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = _hf_logprobs(server, prompt)
        for i in range(1, len(prompt)):
            assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
            assert max(lp["top_logprobs"][i].values()) == pytest.approx(ref[i - 1].max().item(), abs=1e-4)
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
        assert choice["text"].startswith("Question: 2 + 2 = ? Answer:")
        total, greedy = _lm_eval_parse(choice, ctxlen)
        expected = sum(ref[i - 1, prompt[i]].item() for i in range(ctxlen, len(prompt)))
        assert total == pytest.approx(expected, abs=1e-3)
        assert greedy == all(ref[i - 1].argmax().item() == prompt[i] for i in range(ctxlen, len(prompt)))
    # max_tokens 0: the prompt alone, nothing generated.
    zero = httpx.post(server.base_url + "/completions", headers=server.headers, timeout=60,
                      json={**body, "prompt": "Question: 2 + 2 = ? Answer: four", "max_tokens": 0}).json()
    (choice,) = zero["choices"]
    assert choice["text"] == "Question: 2 + 2 = ? Answer: four" and choice["finish_reason"] == "length"
    assert zero["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(choices[0]["logprobs"]["token_logprobs"][1:-1],
                                                                     abs=1e-4)  # batched with another: not bitwise
    assert choice["logprobs"]["tokens"] == choices[0]["logprobs"]["tokens"][:-1]
    bad = httpx.post(server.base_url + "/completions", headers=server.headers,
                     json={"model": "tiny", "prompt": "a", "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_streamed_echo_logprobs_equal_non_streamed(server):
    body = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 3, "logprobs": 2, "echo": True}
    full = httpx.post(server.base_url + "/completions", json=body, headers=server.headers, timeout=60).json()
    with httpx.stream("POST", server.base_url + "/completions", json={**body, "stream": True},
                      headers=server.headers, timeout=60) as r:
        events = sse_events(r.iter_lines())
    chunks = [e["choices"][0] for e in events[:-1]]
    assert chunks[0]["text"].startswith(PROMPT) and chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["text"] for c in chunks) == full["choices"][0]["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks for x in c["logprobs"][key]] == full["choices"][0]["logprobs"][key]


def test_vllm_prompt_logprobs_field(server, client):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, headers=server.headers).json()["tokens"]
    ref = _hf_logprobs(server, ids)
    out = greedy_completion(client, max_tokens=2, extra_body={"prompt_logprobs": 3}).model_dump()
    plp = out["choices"][0]["prompt_logprobs"]
    assert out["choices"][0]["logprobs"] is None and len(plp) == len(ids) and plp[0] is None
    for i in range(1, len(ids)):
        entry = plp[i]
        assert str(ids[i]) in entry and len(entry) in (3, 4)
        assert entry[str(ids[i])]["logprob"] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        assert {int(t) for t, e in entry.items() if e["rank"] <= 3} == set(ref[i - 1].topk(3).indices.tolist())
        assert all(isinstance(e["decoded_token"], str) for e in entry.values())
    assert "prompt_logprobs" not in greedy_completion(client, max_tokens=1).model_dump()["choices"][0]
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0,
                                          extra_body={"prompt_logprobs": 1}).model_dump()
    ctok = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}, headers=server.headers).json()
    assert len(chat["prompt_logprobs"]) == ctok["count"] and chat["prompt_logprobs"][0] is None
    assert all(len(e) in (1, 2) for e in chat["prompt_logprobs"][1:])
    r = httpx.post(server.base_url + "/chat/completions", headers=server.headers,
                   json={"model": "tiny", "messages": MESSAGES, "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_vllm_extras(client):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0.8, seed=1,
                                    presence_penalty=0.5, frequency_penalty=0.5, user="u1",
                                    extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.2,
                                                "min_tokens": 8, "ignore_eos": True})
    assert out.usage.completion_tokens == 8


def test_tokenize_detokenize_roundtrip(server):
    text = "Hello world! Ünïcödé 😀 中文"
    h = server.headers
    tok = httpx.post(server.url + "/tokenize", json={"prompt": text}, headers=h).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 512
    back = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}, headers=h).json()
    assert back["prompt"] == text
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]}, headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_tokenizer_info_is_off_by_default(server):
    """As in vLLM, ``GET /tokenizer_info`` needs ``--enable-tokenizer-info-endpoint`` (see test_lm_eval.py)."""
    assert httpx.get(server.url + "/tokenizer_info", headers=server.headers).status_code == 404


def test_api_key(server):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("POST", "/tokenize"),
                             ("GET", "/version")):
            r = httpx.request(method, server.url + path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers)
            err = r.json()["error"]
            assert err["code"] == 401 and err["type"] and err["message"]
    ok = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers)
    assert ok.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and "flotilla:num_requests_running" in metrics.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()


def test_raw_stream_format(server):
    with httpx.stream("POST", server.base_url + "/chat/completions", headers=server.headers,
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert "access-control-allow-origin" not in r.headers
        raw = r.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    events = sse_events(raw.split(b"\n"))
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 3
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
