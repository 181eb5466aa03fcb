"""``/metrics`` under vLLM's names (issue 13 item 7), scraped from a real ``flotilla serve`` and parsed with
prometheus_client's parser: every ``flotilla:`` series has a ``vllm:`` twin with the same value, vLLM's
request histograms count the requests, and ``--metrics-prefixes`` turns a prefix off.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_server_helpers import ServerProcess

pytestmark = pytest.mark.slow

NEW_HISTOGRAMS = ("request_prompt_tokens", "request_generation_tokens", "request_params_n",
                  "request_params_max_tokens", "request_prefill_time_seconds", "request_decode_time_seconds",
                  "request_inference_time_seconds")


def scrape(server) -> dict:
    """{(sample name, sorted labels): value} of one /metrics scrape (``*_created`` samples left out: they
    are creation times, not values)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if not s.name.endswith("_created")}


def run_requests(server) -> None:
    for body in ({"prompt": "Hello there", "max_tokens": 5, "temperature": 0, "ignore_eos": True},
                 {"prompt": "Hello there, how", "max_tokens": 4, "n": 2, "ignore_eos": True},
                 {"prompt": "One two three", "max_tokens": 6, "stream": True, "ignore_eos": True}):
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def server(tiny_llama):
    srv = ServerProcess(tiny_llama[0], "--max-model-len", "512", "--num-kv-blocks", "64",
                        "--served-model-name", "tiny")
    run_requests(srv)
    yield srv
    assert srv.stop() == 0, srv.output()


def test_every_flotilla_series_has_a_vllm_twin_with_the_same_value(server):
    samples = scrape(server)
    flotilla = {(name.split(":", 1)[1], labels): v for (name, labels), v in samples.items()
                if name.startswith("flotilla:")}
    vllm = {(name.split(":", 1)[1], labels): v for (name, labels), v in samples.items() if name.startswith("vllm:")}
    assert flotilla and set(flotilla) <= set(vllm)
    assert {k: vllm[k] for k in flotilla} == flotilla
    assert set(vllm) - set(flotilla) == {k for k in vllm if k[0] == "gpu_cache_usage_perc"}  # vLLM's old name
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "gpu_cache_usage_perc",
                 "prompt_tokens_total", "generation_tokens_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total", "time_to_first_token_seconds_count",
                 "e2e_request_latency_seconds_count", "inter_token_latency_seconds_count",
                 "time_per_output_token_seconds_count", "iteration_tokens_total_count", "cache_config_info"):
        assert any(k[0] == name for k in vllm), name
    tiny = (("model_name", "tiny"),)
    assert vllm[("generation_tokens_total", tiny)] == 5 + 8 + 6
    assert vllm[("request_success_total", (("finished_reason", "length"), ("model_name", "tiny")))] == 3


def test_vllm_request_histograms_counted_the_requests(server):
    samples = scrape(server)
    tiny = (("model_name", "tiny"),)
    for name in NEW_HISTOGRAMS:
        assert samples[(f"vllm:{name}_count", tiny)] == 3, name
    assert samples[("vllm:request_generation_tokens_sum", tiny)] == 5 + 8 + 6
    assert samples[("vllm:request_params_n_sum", tiny)] == 1 + 2 + 1
    assert samples[("vllm:request_params_max_tokens_sum", tiny)] == 5 + 4 + 6
    assert samples[("vllm:request_params_n_bucket", (("le", "1.0"), ("model_name", "tiny")))] == 2
    prompt_tokens = samples[("vllm:prompt_tokens_total", tiny)]
    assert samples[("vllm:request_prompt_tokens_sum", tiny)] == prompt_tokens > 0
    # The streamed request's 5 intervals after its first token (TPOT and ITL observe the same intervals).
    assert samples[("vllm:time_per_output_token_seconds_count", tiny)] == \
        samples[("vllm:inter_token_latency_seconds_count", tiny)] >= 5
    # Engine steps: at least one per generated token of the longest request; their tokens include the prompts.
    steps = samples[("vllm:iteration_tokens_total_count", tiny)]
    assert steps >= 6 and samples[("vllm:iteration_tokens_total_bucket", (("le", "+Inf"), *tiny))] == steps
    assert samples[("vllm:iteration_tokens_total_sum", tiny)] >= prompt_tokens
    info = [labels for (name, labels), v in samples.items() if name == "vllm:cache_config_info" and v == 1]
    assert len(info) == 1 and dict(info[0])["num_gpu_blocks"] == "64" and dict(info[0])["block_size"] == "16"


@pytest.mark.parametrize("prefixes, absent", [("vllm", "flotilla:"), ("flotilla", "vllm:")])
def test_a_prefix_can_be_turned_off(tiny_llama, prefixes, absent):
    srv = ServerProcess(tiny_llama[0], "--max-model-len", "256", "--num-kv-blocks", "32",
                        "--metrics-prefixes", prefixes)
    try:
        run_requests(srv)
        names = {name for name, _ in scrape(srv)}
        assert names and not any(n.startswith(absent) for n in names), names
        assert f"{prefixes}:request_success_total" in names
    finally:
        assert srv.stop() == 0, srv.output()
