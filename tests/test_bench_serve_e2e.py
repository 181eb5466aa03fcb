"""``flotilla bench serve`` end to end: the CLI client against a real ``flotilla serve`` of the tiny Llama.

The server's own counters are the reference: the tokens the client reports must be the tokens the server
counted (the client's warm-up request included), and the JSON must carry vLLM's result keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_server_helpers import ServerProcess

pytestmark = pytest.mark.slow

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 6, 32, 8
WARM_UP_OUTPUT_LEN = 4  # bench serve sends requests[0]'s prompt once with 4 output tokens before timing
VLLM_KEYS = ["duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "output_throughput", "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls", "errors",
             "model_id", "max_concurrency", "request_rate", "burstiness", "num_prompts"]
PERCENTILE_KEYS = [f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el")
                   for stat in ("mean", "median", "std", "p99")]


@pytest.fixture(scope="module")
def server(tiny_llama):
    srv = ServerProcess(tiny_llama[0], "--max-model-len", "256", "--num-kv-blocks", "64", "--api-key", "sk-bench")
    yield srv
    assert srv.stop() == 0, srv.output()


def test_bench_serve_reports_what_the_server_served(server, tiny_llama, tmp_path):
    result_file = tmp_path / "result.json"
    before = server.metrics()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "flotilla.entrypoints.cli", "bench", "serve", "--base-url", server.url,
         "--model", tiny_llama[0], "--api-key", "sk-bench", "--dataset-name", "random",
         "--num-prompts", str(NUM_PROMPTS), "--random-input-len", str(INPUT_LEN),
         "--random-output-len", str(OUTPUT_LEN), "--max-concurrency", "3", "--ignore-eos", "--seed", "1",
         "--result-filename", str(result_file)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    after = server.metrics()

    block = proc.stdout
    assert "Serving Benchmark Result" in block, block
    rows = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)  # vLLM's label: value rows
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["Successful requests"] == str(NUM_PROMPTS) and rows["Failed requests"] == "0", block
    assert rows["Maximum request concurrency"] == "3", block
    assert rows["Total input tokens"] == str(NUM_PROMPTS * INPUT_LEN), block
    assert rows["Total generated tokens"] == str(NUM_PROMPTS * OUTPUT_LEN), block
    for label in ("Mean TTFT (ms)", "P99 ITL (ms)", "Median E2EL (ms)", "Mean TPOT (ms)"):
        assert float(rows[label]) > 0, block

    data = json.loads(result_file.read_text())
    missing = [k for k in VLLM_KEYS + PERCENTILE_KEYS if k not in data]
    assert not missing, missing
    assert data["completed"] == NUM_PROMPTS and data["failed"] == 0 and data["num_prompts"] == NUM_PROMPTS
    assert data["errors"] == [""] * NUM_PROMPTS
    assert data["input_lens"] == [INPUT_LEN] * NUM_PROMPTS and data["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS
    assert data["total_input_tokens"] == NUM_PROMPTS * INPUT_LEN
    assert data["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert all(len(itl) == OUTPUT_LEN - 1 for itl in data["itls"])  # one chunk per token after the first
    assert all(t > 0 for t in data["ttfts"]) and data["mean_e2el_ms"] >= data["mean_ttft_ms"] > 0
    assert data["request_throughput"] == pytest.approx(NUM_PROMPTS / data["duration"])
    assert data["output_throughput"] == pytest.approx(NUM_PROMPTS * OUTPUT_LEN / data["duration"])

    def served(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)
    # What the client counted is what the server served (the warm-up request is the one extra).
    assert served("flotilla:prompt_tokens_total") == (NUM_PROMPTS + 1) * INPUT_LEN
    assert served("flotilla:generation_tokens_total") == NUM_PROMPTS * OUTPUT_LEN + WARM_UP_OUTPUT_LEN
    assert served('flotilla:request_success_total{finished_reason="length"}') == NUM_PROMPTS + 1
