"""Speculative decoding behind the OpenAI server (``flotilla serve --speculative-config``): streaming equals the
non-streamed output, logprobs come per accepted token, max_tokens is never passed, structured output composes
(constrained requests are not speculated), and ``/metrics`` carries vLLM's ``spec_decode_*`` counters under both
prefixes."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_server_helpers import ServerProcess

pytestmark = pytest.mark.slow

PROMPT = "one two three four, one two three four, one two three four, one two"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def server(tiny_llama):
    srv = ServerProcess(tiny_llama[0], "--max-model-len", "512", "--num-kv-blocks", "64", "--served-model-name",
                        "tiny", "--speculative-config", json.dumps(SPEC))
    yield srv
    assert srv.stop() == 0, srv.output()


def _complete(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, **body}, timeout=60)


def test_streamed_output_with_logprobs_equals_the_whole_response(server):
    body = {"max_tokens": 21, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    whole = _complete(server, **body).json()
    choice = whole["choices"][0]
    assert whole["usage"]["completion_tokens"] == 21
    assert len(choice["logprobs"]["tokens"]) == 21 and len(choice["logprobs"]["token_logprobs"]) == 21
    text, tokens = "", []
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, **body,
                                                                       "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    text += c["text"]
                    tokens += (c.get("logprobs") or {}).get("tokens") or []
    assert text == choice["text"] and tokens == choice["logprobs"]["tokens"]


def test_n_samples_and_structured_output_compose(server):
    r = _complete(server, max_tokens=9, temperature=0.9, seed=5, n=3, ignore_eos=True)
    assert r.status_code == 200 and all(c["finish_reason"] == "length" for c in r.json()["choices"])
    assert r.json()["usage"]["completion_tokens"] == 27
    r = _complete(server, max_tokens=20, temperature=0, structured_outputs={"choice": ["one two", "three four"]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("one two", "three four")


def test_metrics_report_vllm_spec_decode_counters(server):
    # A random model copies nothing; five allowed tokens make its output cycle, so lookup finds drafts.
    r = _complete(server, max_tokens=32, temperature=0, ignore_eos=True, allowed_token_ids=[5, 6, 7, 8, 9])
    assert r.status_code == 200, r.text
    text = httpx.get(server.url + "/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    model = (("model_name", "tiny"),)
    for prefix in ("vllm", "flotilla"):
        drafts = samples[(f"{prefix}:spec_decode_num_drafts_total", model)]
        draft_tokens = samples[(f"{prefix}:spec_decode_num_draft_tokens_total", model)]
        accepted = samples[(f"{prefix}:spec_decode_num_accepted_tokens_total", model)]
        per_pos = [samples[(f"{prefix}:spec_decode_num_accepted_tokens_per_pos_total",
                            (("model_name", "tiny"), ("position", str(i))))] for i in range(4)]
        assert 0 < accepted <= draft_tokens <= 4 * drafts
        assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)
