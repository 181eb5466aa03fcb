"""Where a busy serving run's time goes (issue 18, the c=32 target): flotilla's engine in this process.

    .venv/bin/python benchmarks/serve_profile.py [--model qwen2.5-coder-1.5b-instruct] [--num-prompts 64]
        [--concurrency 32] [--input-len 256] [--output-len 128] [--output-json out.json]

The workload of ``compare.py``'s serving run (random prompts, ``ignore_eos``, at most ``--concurrency`` running)
driven through ``LLMEngine.step`` with the server's defaults (no HTTP, no client: what is left is the engine).

* Every model step is timed (``executor.execute_model``) and classed by what it computes: ``prefill`` (prompt
  tokens only), ``mixed`` (prompt chunks beside decodes) or ``decode`` (one token per running request).
* The linear layers' share: each weight's own matmul (the path the step takes for its row count: the float
  copy, or the kept-quantized kernel) is timed alone at the row counts the run used, and the step's linear
  time is predicted from those. What remains of a step is attention, norms, rotary, sampling and Python.
* Rates: FLOP = 2 x (linear weights' elements) per token (+ the LM head per sampled token), against the best
  rate the same matmuls reach at the largest row count measured.
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flotilla import LLM, SamplingParams
from flotilla.layers.embedding import ParallelLMHead
from flotilla.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from b1_profile import cpu_model, emit  # noqa: E402

ROW_POINTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Matmul:
    """One weight as the engine multiplies it: ``QuantizedWeight.matmul`` (the float copy or the kept-quantized
    kernel, by row count) or ``F.linear`` over a float weight (rows, cols)."""

    def __init__(self, module: torch.nn.Module):
        self.qw = getattr(module, "quant_weight", None)
        self.weight = None if self.qw is not None else module.weight
        self.rows, self.cols = (self.qw.rows, self.qw.cols) if self.qw is not None else tuple(module.weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x (M, cols) -> (M, rows)
        return self.qw.matmul(x) if self.qw is not None else F.linear(x, self.weight)


def weights_of(model: torch.nn.Module) -> list[tuple[str, Matmul, bool]]:
    """(name, Matmul, is_lm_head) of every weight a linear layer or the LM head multiplies, once each (an
    embedding-only weight is looked up, not multiplied)."""
    seen, out = set(), []
    for name, module in model.named_modules():
        if not isinstance(module, (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
            continue
        key = getattr(module, "quant_weight", None) or module.weight
        if id(key) in seen:
            continue
        seen.add(id(key))
        out.append((name, Matmul(module), isinstance(module, ParallelLMHead)))
    return out


def matmul_seconds(mm: Matmul, rows: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Median seconds of one matmul of ``rows`` rows (the path the engine takes at that row count)."""
    x = torch.randn(rows, mm.cols).to(dtype)  # (rows, cols)
    mm(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mm(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interpolate(table: dict[int, float], rows: int) -> float:
    """Seconds at ``rows`` from the measured points (linear between them, proportional beyond)."""
    points = sorted(table)
    if rows in table:
        return table[rows]
    i = bisect.bisect_left(points, rows)
    if i == len(points):
        return table[points[-1]] * rows / points[-1]
    lo, hi = points[i - 1], points[i]
    return table[lo] + (table[hi] - table[lo]) * (rows - lo) / (hi - lo)


def profile(llm: LLM, num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    """Run ``num_prompts`` random prompts of ``input_len`` tokens, ``output_len`` out (``ignore_eos``) through
    ``llm``'s engine at once (its ``max_num_seqs`` bounds what runs), timing every model step; the report."""
    engine = llm.engine
    core = engine.core
    steps: list[dict] = []
    execute = core.executor.execute_model

    def timed_execute(so):
        decode = sum(1 for n in so.num_scheduled_tokens.values() if n == 1)
        prefill = so.total_num_scheduled_tokens - decode
        start = time.perf_counter()
        out = execute(so)
        steps.append({"s": time.perf_counter() - start, "tokens": so.total_num_scheduled_tokens,
                      "decode": decode, "prefill": prefill, "sampled": len(out.sampled_token_ids)})
        return out

    rng = np.random.default_rng(seed)
    top_id = min(20000, engine.config.model.vocab_size)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=output_len)
    llm.generate([{"prompt_token_ids": rng.integers(100, top_id, input_len).tolist()}], params,
                 use_tqdm=False)  # warm-up
    core.executor.execute_model = timed_execute
    try:
        for i in range(num_prompts):
            engine.add_request(f"p{i}", {"prompt_token_ids": rng.integers(100, top_id, input_len).tolist()}, params)
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        wall = time.perf_counter() - start
    finally:
        core.executor.execute_model = execute

    model = core.executor.worker.model
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.numel() > 0), torch.float32)
    weights = weights_of(model)
    body = [mm for _, mm, head in weights if not head]
    heads = [mm for _, mm, head in weights if head]
    body_elems = sum(mm.rows * mm.cols for mm in body)
    head_elems = sum(mm.rows * mm.cols for mm in heads)

    row_counts = sorted({p for p in ROW_POINTS if p <= max(s["tokens"] for s in steps)} | {1})
    body_table = {r: sum(matmul_seconds(mm, r, dtype) for mm in body) for r in row_counts}
    head_rows = sorted({p for p in ROW_POINTS if p <= max(s["sampled"] for s in steps)} | {1})
    head_table = {r: sum(matmul_seconds(mm, r, dtype) for mm in heads) for r in head_rows}

    classes: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for s in steps:
        kind = "decode" if s["prefill"] == 0 else ("prefill" if s["decode"] == 0 else "mixed")
        c = classes[kind]
        c["steps"] += 1
        c["seconds"] += s["s"]
        c["tokens"] += s["tokens"]
        c["prefill_tokens"] += s["prefill"]
        c["decode_tokens"] += s["decode"]
        c["linear_seconds"] += interpolate(body_table, s["tokens"])
        c["lm_head_seconds"] += interpolate(head_table, max(1, s["sampled"]))
        c["flop"] += 2 * body_elems * s["tokens"] + 2 * head_elems * s["sampled"]
    steps_total = sum(s["s"] for s in steps)
    rates = {r: 2 * body_elems * r / t / 1e9 for r, t in body_table.items()}
    best_rows = max(rates, key=rates.get)
    report = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "model": engine.config.model.model,
              "quantization": engine.config.model.quantization, "dtype": str(dtype).removeprefix("torch."),
              "workload": {"num_prompts": num_prompts, "concurrency": engine.config.scheduler.max_num_seqs,
                           "input_len": input_len, "output_len": output_len},
              "wall_s": wall, "output_tok_s": num_prompts * output_len / wall,
              "model_steps_s": steps_total, "outside_model_steps_s": wall - steps_total,
              "linear_gflop_per_token": 2 * body_elems / 1e9, "lm_head_gflop_per_sampled_token": 2 * head_elems / 1e9,
              "matmul_gflops_by_rows": rates, "best_matmul_gflops": rates[best_rows],
              "best_matmul_rows": best_rows, "classes": {}}
    for kind, c in classes.items():
        rest = c["seconds"] - c["linear_seconds"] - c["lm_head_seconds"]
        achieved = c["flop"] / c["seconds"] / 1e9
        report["classes"][kind] = {
            "steps": int(c["steps"]), "seconds": c["seconds"], "share_of_wall": c["seconds"] / wall,
            "mean_tokens_per_step": c["tokens"] / c["steps"], "prefill_tokens": int(c["prefill_tokens"]),
            "decode_tokens": int(c["decode_tokens"]), "linear_seconds_predicted": c["linear_seconds"],
            "lm_head_seconds_predicted": c["lm_head_seconds"], "rest_seconds": rest,
            "achieved_gflops": achieved, "achieved_over_best_matmul": achieved / rates[best_rows]}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()

    llm = LLM(model=args.model, max_num_seqs=args.concurrency,
              max_model_len=args.input_len + args.output_len + 16, enable_prefix_caching=False)
    report = profile(llm, args.num_prompts, args.input_len, args.output_len)
    emit(report, args.output_json)
    llm.engine.shutdown()


if __name__ == "__main__":
    main()
