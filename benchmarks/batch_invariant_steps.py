"""The cost of batch-invariant execution per workload shape, robust to a shared machine (issue 11).

    .venv/bin/python benchmarks/batch_invariant_steps.py [--repeats 7] [--model M] [--dtype auto] [--threads N]

One process holds a default engine and a batch-invariant one over the same model; each workload below runs on
both, alternating, ``--repeats`` times, and the table gives the fastest run of each (other load on the machine
only ever adds time, so the minimum estimates the uncontended cost) and the ratio batch-invariant / default.
``--clock cpu`` measures the process's CPU time instead of wall time: with ``--threads 1`` that is the work
itself, unaffected by other processes sharing the cores (time slicing adds wall time, not CPU time).

- prefill: 4 random prompts of 128 tokens, 1 output token each (one 512-token step);
- batch-1 decode: 1 prompt of 16 tokens, 64 output tokens (time per output token);
- batch-32 decode: 32 prompts of 16 tokens, 32 output tokens each (time per step);
- offline: 64 prompts of 128 tokens, 64 output tokens each (``flotilla bench throughput``'s workload, output
  tokens per second).

Random prompts are fresh each run (no prefix-cache hits); sampling is vLLM's benchmark sampling (temperature 1,
ignore_eos). Writes --output-json (default benchmarks/results/batch_invariant_steps.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from flotilla import LLM, SamplingParams

from batch_invariant_cost import commit, cpu_model

ROOT = Path(__file__).resolve().parent.parent
# name -> (prompts, input tokens, output tokens, what the time is divided by)
WORKLOADS = {"prefill 4 x 128": (4, 128, 1, "step"), "batch-1 decode": (1, 16, 64, "token"),
             "batch-32 decode": (32, 16, 32, "step"), "offline 64 x 128 -> 64": (64, 128, 64, "throughput")}


def run_once(llm: LLM, workload: tuple, seed: int, clock=time.perf_counter) -> float:
    """Seconds for one generate of the workload (per output token / per step where the workload says so),
    or output tokens per second for "throughput"."""
    n, input_len, output_len, unit = workload
    rng = np.random.default_rng(seed)
    vocab = llm.engine.config.model.vocab_size
    prompts = [rng.integers(100, vocab - 100, size=input_len).tolist() for _ in range(n)]
    params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True)
    start = clock()
    llm.generate(prompts, params)
    elapsed = clock() - start
    return n * output_len / elapsed if unit == "throughput" else elapsed / output_len


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--output-json", default=str(ROOT / "benchmarks" / "results" / "batch_invariant_steps.json"))
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    engines = {mode: LLM(model=args.model, dtype=args.dtype, enable_prefix_caching=False, kv_cache_memory=0.5,
                         num_threads=args.threads, batch_invariant=mode == "batch-invariant")
               for mode in ("default", "batch-invariant")}
    for llm in engines.values():
        run_once(llm, (2, 16, 4, "step"), seed=10 ** 6)  # warm-up
    times: dict[str, dict[str, list[float]]] = {w: {m: [] for m in engines} for w in WORKLOADS}
    for rep in range(args.repeats):
        for name, workload in WORKLOADS.items():
            order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
            for mode in order:
                times[name][mode].append(run_once(engines[mode], workload, seed=rep, clock=clock))
        print(f"repeat {rep + 1} done", flush=True)
    rows = {}
    for name, workload in WORKLOADS.items():
        best = max if workload[3] == "throughput" else min
        d, b = best(times[name]["default"]), best(times[name]["batch-invariant"])
        cost = d / b if workload[3] == "throughput" else b / d  # > 1: batch-invariant is slower
        rows[name] = {"default": d, "batch_invariant": b, "slowdown": cost, "unit": workload[3]}
        fmt = (lambda v: f"{v:.1f} tok/s") if workload[3] == "throughput" else (lambda v: f"{v * 1e3:.1f} ms")
        print(f"| {name} | {fmt(d)} | {fmt(b)} | {cost:.2f}x |")
    dtype = engines["default"].engine.config.model.dtype
    summary = {"commit": commit(), "cpu": cpu_model(), "cores": os.cpu_count(), "dtype": dtype,
               "model": args.model or "smollm2-135m-instruct", "repeats": args.repeats, "clock": args.clock,
               "threads": args.threads or "torch default", "results": rows,
               "times": times}
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "times"}))


if __name__ == "__main__":
    main()
