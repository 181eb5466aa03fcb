"""``cache_salt`` (vLLM's field): requests under different salts never share prefix-cache blocks; under the
same salt they do. Through the offline API (the salt rides in the prompt dict, as in vLLM) and through
``/v1/completions`` and ``/v1/chat/completions`` of a real server (observed with the prefix-cache metrics).
"""

from __future__ import annotations

import time

import httpx
import pytest

from flotilla import LLM, SamplingParams
from flotilla.errors import InvalidRequestError

from test_server_helpers import ServerProcess

BLOCK = 16
PROMPT = [1] + [(53 * i) % 7000 + 300 for i in range(63)]  # 64 tokens: 3 full blocks can hit (one is computed)
FULL_HIT = 3 * BLOCK


def test_offline_salts_separate_prefix_caches(tiny_llama):
    llm = LLM(model=tiny_llama[0], max_model_len=256, num_kv_blocks=64, block_size=BLOCK)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def cached(**salt) -> tuple[int, list[int]]:
        (out,) = llm.generate({"prompt_token_ids": PROMPT, **salt}, params)
        return out.num_cached_tokens, out.outputs[0].token_ids
    first, tokens = cached(cache_salt="tenant-a")
    assert first == 0
    assert cached(cache_salt="tenant-b")[0] == 0  # same tokens, another tenant: no hit
    assert cached()[0] == 0  # unsalted is a tenant of its own
    again, same_tokens = cached(cache_salt="tenant-a")
    assert again == FULL_HIT and same_tokens == tokens
    assert cached()[0] == FULL_HIT and cached(cache_salt="tenant-b")[0] == FULL_HIT
    # n > 1: every sample carries the salt (their blocks are found under it, and only under it)
    n2 = llm.generate({"prompt_token_ids": PROMPT, "cache_salt": "tenant-c"},
                      SamplingParams(temperature=0, max_tokens=4, n=2))[0]
    assert len(n2.outputs) == 2
    assert cached(cache_salt="tenant-c")[0] == FULL_HIT and cached(cache_salt="tenant-d")[0] == 0
    with pytest.raises(InvalidRequestError, match="cache_salt"):
        llm.generate({"prompt_token_ids": PROMPT, "cache_salt": ""}, params)


@pytest.fixture(scope="module")
def server(tiny_llama):
    srv = ServerProcess(tiny_llama[0], "--max-model-len", "256", "--num-kv-blocks", "64")
    yield srv
    assert srv.stop() == 0, srv.output()


def _hits_of(server, path: str, body: dict) -> int:
    """Prefix-cache hit tokens of one request: the hits counter's rise once its prompt was queried."""
    name_q, name_h = "flotilla:prefix_cache_queries_total", "flotilla:prefix_cache_hits_total"
    before = server.metrics()
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    deadline = time.monotonic() + 30
    while (after := server.metrics())[name_q] - before[name_q] < prompt_tokens:
        assert time.monotonic() < deadline, "the request's prefix-cache query never showed in /metrics"
        time.sleep(0.02)
    return int(after[name_h] - before[name_h])


@pytest.mark.slow
def test_completions_salts_separate_prefix_caches(server):
    body = {"prompt": PROMPT, "max_tokens": 2}
    assert _hits_of(server, "/v1/completions", {**body, "cache_salt": "alice"}) == 0
    assert _hits_of(server, "/v1/completions", {**body, "cache_salt": "bob"}) == 0
    assert _hits_of(server, "/v1/completions", body) == 0
    assert _hits_of(server, "/v1/completions", {**body, "cache_salt": "alice"}) == FULL_HIT
    assert _hits_of(server, "/v1/completions", {**body, "cache_salt": "bob"}) == FULL_HIT
    assert _hits_of(server, "/v1/completions", body) == FULL_HIT


@pytest.mark.slow
def test_chat_salts_separate_prefix_caches(server):
    messages = [{"role": "system", "content": "You answer in one word. " * 12},
                {"role": "user", "content": "Which colour is the sky?"}]
    body = {"messages": messages, "max_tokens": 2}
    assert _hits_of(server, "/v1/chat/completions", {**body, "cache_salt": "alice"}) == 0
    assert _hits_of(server, "/v1/chat/completions", {**body, "cache_salt": "bob"}) == 0
    assert _hits_of(server, "/v1/chat/completions", {**body, "cache_salt": "alice"}) >= 2 * BLOCK


@pytest.mark.slow
@pytest.mark.parametrize("path, extra", [("/v1/completions", {"prompt": "hi"}),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
@pytest.mark.parametrize("salt", ["", 5, ["a"]])
def test_bad_cache_salt_is_400_naming_it(server, path, extra, salt):
    r = httpx.post(server.url + path, json={**extra, "cache_salt": salt}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "cache_salt", r.json()
