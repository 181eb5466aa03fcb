"""``flotilla bench latency``: latency of one batch, with vLLM's ``bench latency`` semantics.

One batch of ``--batch-size`` random-token prompts of ``--input-len`` tokens, each generating exactly
``--output-len`` tokens (temperature 1, top_p 1, ignore_eos), goes into ``LLM.generate``;
``--num-iters-warmup`` untimed iterations, then ``--num-iters`` timed ones. Printed as vLLM prints it::

    Avg latency: X seconds
    10% percentile latency: ... seconds      (also 25, 50, 75, 90, 99; numpy linear interpolation)

``--output-json`` writes ``avg_latency``, ``latencies`` (seconds, one per timed iteration) and
``percentiles`` (``{"10": ..., ..., "99": ...}``).

Unlike vLLM (which repeats one fixed batch) every iteration gets fresh random prompts, so the prefix cache
never turns a later iteration's prefill into a cache hit; the measured batch latency always includes the
prefill of ``batch_size * input_len`` tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from flotilla.bench.datasets import random_requests
from flotilla.bench.throughput import add_workload_args, build_llm, sampling_params_for

PERCENTILES = (10, 25, 50, 75, 90, 99)


def run_latency(llm, batch_size: int, input_len: int, output_len: int, num_iters_warmup: int, num_iters: int,
                seed: int = 0) -> list[float]:
    """Seconds per batch for each of ``num_iters`` timed iterations (after the warm-up iterations)."""
    vocab = llm.engine.config.model.vocab_size

    def one(i: int) -> float:
        reqs = random_requests(batch_size, input_len, output_len, 0.0, vocab, seed + i)
        prompts, params = [r.prompt for r in reqs], [sampling_params_for(r) for r in reqs]
        start = time.perf_counter()
        llm.generate(prompts, params)
        return time.perf_counter() - start

    for i in range(num_iters_warmup):
        one(1_000_000 + i)
    return [one(i) for i in range(num_iters)]


def summarize(latencies: list[float]) -> dict:
    """vLLM's JSON: avg_latency, latencies and percentiles keyed by the percentage."""
    arr = np.asarray(latencies, dtype=float)
    return {"avg_latency": float(arr.mean()), "latencies": [float(x) for x in arr],
            "percentiles": {str(p): float(v) for p, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES))}}


def format_summary(summary: dict) -> str:
    lines = [f"Avg latency: {summary['avg_latency']} seconds"]
    lines += [f"{p}% percentile latency: {v} seconds" for p, v in summary["percentiles"].items()]
    return "\n".join(lines)


def add_latency_parser(sub) -> None:
    p = sub.add_parser("latency", help="latency of one batch of prompts (vLLM's bench latency)")
    add_workload_args(p, input_len=32, output_len=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-iters-warmup", type=int, default=10)
    p.add_argument("--num-iters", type=int, default=30)
    p.set_defaults(func=cmd_bench_latency)


def cmd_bench_latency(ns: argparse.Namespace) -> int:
    if ns.num_iters < 1:
        print("error: --num-iters must be >= 1", file=sys.stderr)
        return 2
    llm = build_llm(ns)
    latencies = run_latency(llm, ns.batch_size, ns.input_len, ns.output_len, ns.num_iters_warmup, ns.num_iters,
                            ns.seed)
    summary = summarize(latencies)
    print(format_summary(summary))
    if ns.output_json:
        data = dict(summary, model=llm.engine.config.model.model, dtype=llm.engine.config.model.dtype,
                    batch_size=ns.batch_size, input_len=ns.input_len, output_len=ns.output_len)
        with open(ns.output_json, "w") as f:
            json.dump(data, f, indent=2)
    return 0
