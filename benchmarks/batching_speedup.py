"""Continuous batching vs one prompt at a time, same engine, one run (issue 2's closing measurement).

    .venv/bin/python benchmarks/batching_speedup.py [--num-prompts 64] [--input-len 128] [--output-len 128]

Random token prompts of exactly --input-len tokens, --output-len tokens each with ignore_eos. The batched
run submits all prompts to ``LLM.generate`` at once; the sequential run sends --num-sequential of them one
by one through the same engine (throughput is tokens per second, so a subset measures the same rate).
Prints the median of --repeats for each and their ratio, plus a JSON line.
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


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab - 100, size=length).tolist() for _ in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--num-sequential", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    llm = LLM(model=args.model, enable_prefix_caching=False)
    vocab = llm.engine.config.model.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    prompts = make_prompts(args.num_prompts, args.input_len, vocab, seed=0)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up

    batched = [timed(lambda: llm.generate(prompts, params)) for _ in range(args.repeats)]
    seq_prompts = prompts[:args.num_sequential]
    sequential = [timed(lambda: [llm.generate(p, params) for p in seq_prompts]) for _ in range(args.repeats)]

    tokens_batched = args.num_prompts * args.output_len
    tokens_seq = args.num_sequential * args.output_len
    tput_b = tokens_batched / statistics.median(batched)
    tput_s = tokens_seq / statistics.median(sequential)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": llm.engine.config.model.model, "dtype": llm.engine.config.model.dtype, "commit": commit,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "batched_output_tok_s": round(tput_b, 1), "sequential_output_tok_s": round(tput_s, 1),
        "speedup": round(tput_b / tput_s, 2), "batched_s": batched, "sequential_s": sequential,
    }
    print(f"batched    : {tput_b:8.1f} output tok/s  ({args.num_prompts} prompts at once)")
    print(f"sequential : {tput_s:8.1f} output tok/s  (one prompt at a time)")
    print(f"speedup    : {tput_b / tput_s:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
