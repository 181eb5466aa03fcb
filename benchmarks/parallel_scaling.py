"""Offline throughput, batch-1 TPOT and the communication share of a step for TP/PP configurations.

    .venv/bin/python benchmarks/parallel_scaling.py [--configs 1x1,3x1,1x2] [--num-prompts 32]

Each configuration ("TPxPP") runs the embedded SmolLM2 (or --model) in one run on this machine:
throughput of --num-prompts random prompts (--input-len in, --output-len out, ignore_eos), then TPOT of a
single request, then the share of wall time each rank spent blocked in communication (all-reduce,
all-gather, pipeline send/recv; for pipeline stages this includes waiting for the previous stage).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import numpy as np
import torch

from flotilla import LLM, SamplingParams


def run_config(model, tp, pp, prompts, out_len, repeats):
    llm = LLM(model=model, tensor_parallel_size=tp, pipeline_parallel_size=pp, enable_prefix_caching=False,
              max_model_len=1024)
    engine = llm.engine
    try:
        params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(max_tokens=2))
        before = engine.executor.collective_rpc("comm_stats")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate(prompts, params)
            times.append(time.perf_counter() - start)
        after = engine.executor.collective_rpc("comm_stats")
        total = sum(times)
        comm = [round((a["tp"] + a["pp"] - b["tp"] - b["pp"]) / total, 3) for a, b in zip(after, before)]
        tpot = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
            t1 = time.perf_counter()
            llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True))
            t2 = time.perf_counter()
            tpot.append(((t2 - t1) - (t1 - t0)) / (out_len - 2))
        return {"tp": tp, "pp": pp, "output_tok_s": len(prompts) * out_len / statistics.median(times),
                "tpot_ms": 1000 * statistics.median(tpot), "comm_share_per_rank": comm, "runs_s": times}
    finally:
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--configs", default="1x1,3x1,1x2")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 49000, size=args.input_len).tolist() for _ in range(args.num_prompts)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = []
    for cfg in args.configs.split(","):
        tp, pp = (int(x) for x in cfg.split("x"))
        r = run_config(args.model, tp, pp, prompts, args.output_len, args.repeats)
        results.append(r)
        print(f"TP={tp} PP={pp}: {r['output_tok_s']:.1f} output tok/s, TPOT {r['tpot_ms']:.1f} ms, "
              f"communication share per rank {r['comm_share_per_rank']}", flush=True)
    print(json.dumps({"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                      "commit": commit, "results": results}))


if __name__ == "__main__":
    main()
