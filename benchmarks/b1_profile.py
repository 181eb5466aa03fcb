"""Where a batch-1 decode step's time goes (issue 18): flotilla's engine in this process, one request.

    .venv/bin/python benchmarks/b1_profile.py [--model M] [--quantization Q] [--prompt-len 200]
        [--output-len 128] [--repeats 5] [--no-fused-decode] [--output-json out.json]

* TPOT: (T(1 + n output tokens) - T(1)) / n for one request of ``--prompt-len`` random tokens through
  ``LLM.generate`` (engine, scheduler, model, sampling, detokenization; no HTTP), the median of ``--repeats``.
* The parts of a step: the torch profiler's self CPU time of every op over one such run, divided by the
  decode steps and grouped (quantized matmuls, attention, norms/rotary/activation, the LM head, sampling,
  other torch ops). What the ops do not account for of the unprofiled TPOT is Python and the engine around them.
* With ``--no-fused-decode`` the decoder layers run module by module (layers/fused_decode.py switched off), to
  measure what the one-op layer saves in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections import defaultdict

import numpy as np
import torch

from flotilla import LLM, SamplingParams

GROUPS = [  # (group, op name substrings), first match wins
    ("quantized matmuls", ("quant_linear", "quant_matmul")),
    ("fused decode layer (self)", ("decode_layer",)),
    ("attention", ("paged_decode_attention", "attention", "write_kv_cache")),
    ("norms, rotary, activation", ("rms_norm", "rotary", "silu_and_mul")),
    ("embedding", ("quant_dequantize", "embedding")),
    ("sampling", ("sample", "argmax", "topk", "softmax", "log_softmax")),
]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def emit(result: dict, output_json: str | None) -> None:
    """Print a profile's report as JSON, and write it to ``output_json`` when given."""
    print(json.dumps(result, indent=2))
    if output_json:
        with open(output_json, "w") as f:
            json.dump(result, f, indent=2)


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other torch ops"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-fused-decode", action="store_true")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()

    llm = LLM(model=args.model, quantization=args.quantization, dtype=args.dtype, max_model_len=1024,
              enable_prefix_caching=False)
    model = llm.engine.executor.worker.model
    if args.no_fused_decode:
        for i in getattr(model, "local_layer_indices", []):
            model.model.layers[i].fused_decode = None
    fused = sum(getattr(model.model.layers[i], "fused_decode", None) is not None
                for i in getattr(model, "local_layer_indices", []))
    prompt = {"prompt_token_ids": np.random.default_rng(0).integers(100, 49000, args.prompt_len).tolist()}

    def timed(n: int) -> float:
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, ignore_eos=True, max_tokens=n), use_tqdm=False)
        return time.perf_counter() - start

    n = args.output_len
    timed(n)  # warm-up
    tpots = [(timed(1 + n) - timed(1)) / n for _ in range(args.repeats)]
    tpot = statistics.median(tpots)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        timed(1 + n)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof1:
        timed(1)
    per_group: dict[str, float] = defaultdict(float)
    for p, sign in ((prof, 1.0), (prof1, -1.0)):  # the decode steps only: (1 + n) minus the prefill run
        for e in p.key_averages():
            per_group[group_of(e.key)] += sign * e.self_cpu_time_total / 1e3 / n  # ms per step
    ops_ms = sum(per_group.values())
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "model": llm.engine.config.model.model,
              "quantization": llm.engine.config.model.quantization, "dtype": llm.engine.config.model.dtype,
              "fused_decode_layers": fused, "prompt_len": args.prompt_len, "output_len": n,
              "tpot_ms": tpot * 1e3, "runs_tpot_ms": [t * 1e3 for t in tpots],
              "parts_ms": {k: round(v, 3) for k, v in sorted(per_group.items(), key=lambda kv: -kv[1])},
              "python_and_engine_ms": tpot * 1e3 - ops_ms}
    emit(result, args.output_json)
    llm.engine.shutdown()


if __name__ == "__main__":
    main()
