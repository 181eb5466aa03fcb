"""The serving-benchmark metric definitions on synthetic timestamps (no server needed)."""

from __future__ import annotations

import numpy as np
import pytest

from flotilla.bench.datasets import arrival_gaps, random_requests, shared_prefix_requests
from flotilla.bench.metrics import (PERCENTILE_METRICS, RequestResult, calculate_metrics, format_result_block,
                                    metrics_to_json)


def _results():
    # r1: ttft 0.1, then 3 tokens 0.05 apart -> 4 tokens, e2el 0.25
    r1 = RequestResult(True, prompt_len=10, output_tokens=4, ttft=0.1, itl=[0.05, 0.05, 0.05], latency=0.25)
    # r2: ttft 0.2, one more token 0.3 later -> 2 tokens, e2el 0.5
    r2 = RequestResult(True, prompt_len=20, output_tokens=2, ttft=0.2, itl=[0.3], latency=0.5)
    # r3: a single token: no TPOT contribution
    r3 = RequestResult(True, prompt_len=5, output_tokens=1, ttft=0.4, itl=[], latency=0.4)
    failed = RequestResult(False, prompt_len=7, error="HTTP 500")
    return [r1, r2, r3, failed]


def test_vllm_definitions():
    m = calculate_metrics(_results(), duration=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert m.total_input == 35 and m.total_output == 7
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(21.0)
    assert m.stats_ms["ttft"]["mean"] == pytest.approx(1000 * (0.1 + 0.2 + 0.4) / 3)
    tpots = [(0.25 - 0.1) / 3, (0.5 - 0.2) / 1]  # r3 excluded (one token)
    assert m.stats_ms["tpot"]["mean"] == pytest.approx(1000 * np.mean(tpots))
    itls = [0.05, 0.05, 0.05, 0.3]  # pooled over requests
    assert m.stats_ms["itl"]["median"] == pytest.approx(1000 * np.median(itls))
    assert m.stats_ms["itl"]["p99"] == pytest.approx(1000 * np.percentile(itls, 99))
    assert m.stats_ms["e2el"]["p99"] == pytest.approx(1000 * np.percentile([0.25, 0.5, 0.4], 99))


def test_json_has_vllm_keys_and_block_prints():
    results = _results()
    m = calculate_metrics(results, duration=2.0)
    data = metrics_to_json(m, results)
    for key in ["duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput"]:
        assert key in data
    for metric in PERCENTILE_METRICS:
        for stat in ["mean", "median", "std", "p99"]:
            assert f"{stat}_{metric}_ms" in data
    block = format_result_block(m, max_concurrency=4, request_rate=float("inf"))
    assert "Serving Benchmark Result" in block and "Mean TTFT (ms):" in block and "P99 ITL (ms):" in block


def test_empty_run_is_well_formed():
    m = calculate_metrics([RequestResult(False, error="x")], duration=1.0)
    assert m.completed == 0 and m.failed == 1 and m.stats_ms["ttft"]["mean"] == 0.0


def test_datasets_and_arrivals():
    reqs = random_requests(50, 100, 20, range_ratio=0.5, vocab_size=1000, seed=1)
    assert all(50 <= r.prompt_len <= 150 and len(r.prompt) == r.prompt_len for r in reqs)
    assert all(100 <= t < 900 for r in reqs for t in r.prompt)
    assert random_requests(5, 10, 5, seed=3)[0].prompt == random_requests(5, 10, 5, seed=3)[0].prompt
    shared = shared_prefix_requests(2, 3, system_len=16, question_len=4, output_len=8, vocab_size=1000)
    assert len(shared) == 6
    assert shared[0].prompt[:16] == shared[2].prompt[:16] != shared[1].prompt[:16]
    assert shared[0].prompt[16:] != shared[2].prompt[16:]
    assert arrival_gaps(3, float("inf")) == [0.0, 0.0, 0.0]
    gaps = arrival_gaps(20000, request_rate=10.0, burstiness=1.0, seed=0)
    assert np.mean(gaps) == pytest.approx(0.1, rel=0.05)
