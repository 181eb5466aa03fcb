"""Smoke tests of the offline benchmarks (``flotilla bench throughput / latency / roofline``) on the tiny
Llama: each writes well-formed JSON with every key. No speed assertions (BENCHMARK.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flotilla.entrypoints.cli import main


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _run(argv: list[str], out_path) -> dict:
    assert main(argv + ["--output-json", str(out_path)]) == 0
    with open(out_path) as f:
        return json.load(f)


def test_bench_throughput(tiny_llama, tmp_path, capsys):
    path, _ = tiny_llama
    data = _run(["bench", "throughput", "--model", path, "--max-model-len", "128", "--num-kv-blocks", "64",
                 "--num-prompts", "6", "--input-len", "12", "--output-len", "5", "--num-warmup-prompts", "1"],
                tmp_path / "tp.json")
    for key in ("elapsed_time", "num_requests", "total_num_tokens", "requests_per_second", "tokens_per_second",
                "output_tokens_per_second"):
        assert _positive(data[key]), key
    assert data["num_requests"] == 6
    assert data["total_prompt_tokens"] == 6 * 12 and data["total_output_tokens"] == 6 * 5  # ignore_eos
    assert data["total_num_tokens"] == 6 * 17
    assert data["tokens_per_second"] > data["output_tokens_per_second"]
    assert "Throughput: " in capsys.readouterr().out


def test_bench_throughput_range_ratio(tiny_llama, tmp_path):
    path, _ = tiny_llama
    data = _run(["bench", "throughput", "--model", path, "--max-model-len", "128", "--num-kv-blocks", "64",
                 "--num-prompts", "5", "--input-len", "10", "--output-len", "4", "--random-range-ratio", "0.5"],
                tmp_path / "tp.json")
    assert 5 * 5 <= data["total_prompt_tokens"] <= 5 * 15
    assert 5 * 2 <= data["total_output_tokens"] <= 5 * 6


def test_bench_latency(tiny_llama, tmp_path, capsys):
    path, _ = tiny_llama
    data = _run(["bench", "latency", "--model", path, "--max-model-len", "128", "--num-kv-blocks", "64",
                 "--batch-size", "3", "--input-len", "8", "--output-len", "4", "--num-iters-warmup", "1",
                 "--num-iters", "3"], tmp_path / "lat.json")
    assert _positive(data["avg_latency"])
    assert len(data["latencies"]) == 3 and all(_positive(x) for x in data["latencies"])
    assert set(data["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    values = [data["percentiles"][k] for k in ("10", "25", "50", "75", "90", "99")]
    assert all(_positive(v) for v in values) and values == sorted(values)
    assert min(data["latencies"]) <= data["avg_latency"] <= max(data["latencies"])
    out = capsys.readouterr().out
    assert "Avg latency: " in out and "99% percentile latency: " in out


def test_bench_roofline(tiny_llama, tmp_path, capsys):
    path, hf_model = tiny_llama
    data = _run(["bench", "roofline", "--model", path, "--batch-size", "4", "--prompt-len", "16",
                 "--bw-size-mib", "4", "--repeats", "2"], tmp_path / "rf.json")
    assert data["params"] == sum(p.numel() for p in hf_model.parameters())
    cfg = hf_model.config
    assert data["decode_params"] == data["params"] - cfg.vocab_size * cfg.hidden_size  # untied: lookup skipped
    assert data["weight_bytes"] == 4 * data["params"]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert data["kv_bytes_per_token"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    for key in ("bw_bytes_per_s", "flops_per_s_decode", "flops_per_s_prefill", "decode_step_lower_bound_s",
                "decode_step_memory_s", "decode_step_compute_s", "prefill_lower_bound_s", "prefill_compute_s",
                "max_decode_tokens_per_s", "max_prefill_tokens_per_s", "decode_bytes_per_step"):
        assert _positive(data[key]), key
    assert data["decode_step_lower_bound_s"] == max(data["decode_step_memory_s"], data["decode_step_compute_s"])
    assert math.isclose(data["decode_step_compute_s"],
                        2 * data["decode_params"] * 4 / data["flops_per_s_decode"])
    assert math.isclose(data["prefill_compute_s"], 2 * data["decode_params"] * 16 / data["flops_per_s_prefill"])
    assert set(data["matmul_flops_per_s_decode"]) == {"qkv", "o", "gate_up", "down", "lm_head", "forward"}
    assert all(_positive(v) for v in data["matmul_flops_per_s_prefill"].values())
    assert "decode step, batch 4" in capsys.readouterr().out


def test_roofline_params_match_tied_qwen2(tiny_qwen2):
    from flotilla.bench.roofline import model_shape
    path, hf_model = tiny_qwen2
    shape = model_shape(path)
    assert shape.tie_word_embeddings and shape.qkv_bias
    assert shape.params == sum(p.numel() for p in hf_model.parameters())
    assert shape.decode_params == shape.params


@pytest.mark.parametrize("method", ["sum", "copy"])
def test_measuring_functions_are_importable(method):
    from flotilla.bench.roofline import measure_matmul_flops, measure_memory_bandwidth
    assert measure_memory_bandwidth(2, repeats=2, method=method) > 0
    assert measure_matmul_flops(4, 32, 64, torch.float32, repeats=2) > 0
    with pytest.raises(ValueError):
        measure_memory_bandwidth(1, method="nope")
