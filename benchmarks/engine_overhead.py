"""Where AsyncLLM's time goes, next to ``LLM.generate``: the same N greedy requests through both.

For each path it reports output tok/s, engine steps, mean sequences a step, mean seconds a step (the core's own
``step()`` for ``LLM.generate``; the interval between the core's consecutive outputs for ``AsyncLLM``) and the
CPU seconds each process used during the run (front end; engine core), so a gap shows whether the core steps
slower (competing for cores), steps more often with smaller batches (the front end does not keep it fed), or
waits (IPC / the front end's per-output work).

Usage: .venv/bin/python benchmarks/engine_overhead.py [--num-requests 500] [--max-tokens 32] [--max-num-seqs 128]
           [--paths llm,async,async-delta] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import time

from batch_throughput import cpu_model, prompt


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_llm(ns) -> dict:
    from flotilla import LLM, SamplingParams
    llm = LLM(max_num_seqs=ns.max_num_seqs, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True)
    llm.generate([prompt(-1 - i) for i in range(8)], params)  # warm up
    core = llm.engine.core
    step, steps = core.step, []

    def timed_step():
        t = time.perf_counter()
        out = step()
        steps.append((time.perf_counter() - t, len(out.outputs)))
        return out
    core.step = timed_step
    cpu0, start = self_cpu_s(), time.perf_counter()
    outs = llm.generate([prompt(i) for i in range(ns.num_requests)], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = summary("LLM.generate", tokens, elapsed, steps, self_cpu_s() - cpu0, None)
    del llm, outs
    gc.collect()
    return result


def bench_async(ns, delta: bool) -> dict:
    from flotilla.engine.arg_utils import EngineArgs
    from flotilla.engine.async_llm import AsyncLLM
    from flotilla.engine.output_processor import OutputKind
    from flotilla.sampling_params import SamplingParams
    llm = AsyncLLM(EngineArgs(max_num_seqs=ns.max_num_seqs, max_model_len=512))
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True)
    kind = OutputKind.DELTA if delta else OutputKind.CUMULATIVE
    stamps: list[tuple[float, int]] = []
    on_outputs = llm._on_outputs

    def record(outs):
        if outs.outputs:
            stamps.append((outs.timestamp, len(outs.outputs)))
        on_outputs(outs)
    llm._on_outputs = record

    async def one(i: int) -> int:
        tokens = 0
        async for out in llm.generate(prompt(i), params, f"r{i}", kind):
            n = len(out.outputs[0].token_ids)
            tokens = tokens + n if delta else n
        return tokens

    async def run() -> tuple[int, float]:
        await asyncio.gather(*(one(-1 - i) for i in range(8)))  # warm up
        stamps.clear()
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(ns.num_requests))))
        return tokens, time.perf_counter() - start
    try:
        core_pid = llm._client.proc.pid
        cpu0, core0 = self_cpu_s(), proc_cpu_s(core_pid)
        tokens, elapsed = asyncio.run(run())
        front, core = self_cpu_s() - cpu0, proc_cpu_s(core_pid) - core0
    finally:
        llm.shutdown()
    steps = [(b[0] - a[0], b[1]) for a, b in zip(stamps, stamps[1:])]
    return summary("AsyncLLM " + ("delta" if delta else "cumulative"), tokens, elapsed, steps, front, core)


def summary(name: str, tokens: int, elapsed: float, steps: list[tuple[float, int]], front_cpu: float,
            core_cpu: float | None) -> dict:
    n = max(1, len(steps))
    return {"path": name, "tok_s": tokens / elapsed, "seconds": elapsed, "steps": len(steps),
            "mean_seqs_per_step": sum(s for _, s in steps) / n, "mean_step_s": sum(t for t, _ in steps) / n,
            "front_cpu_s": front_cpu, "core_cpu_s": core_cpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--paths", default="llm,async,async-delta")
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    runs = {"llm": lambda: bench_llm(ns), "async": lambda: bench_async(ns, False),
            "async-delta": lambda: bench_async(ns, True)}
    results = [runs[p]() for p in ns.paths.split(",")]
    print(f"CPU {cpu_model()} ({os.cpu_count()} cores); {ns.num_requests} requests x {ns.max_tokens} tokens, "
          f"max_num_seqs {ns.max_num_seqs}")
    base = results[0]["tok_s"]
    for r in results:
        core = f"{r['core_cpu_s']:6.1f}" if r["core_cpu_s"] is not None else "     -"
        print(f"{r['path']:22s} {r['tok_s']:7.1f} tok/s ({r['tok_s'] / base:.2f}x) {r['seconds']:6.1f} s  "
              f"{r['steps']:5d} steps x {r['mean_seqs_per_step']:5.1f} seqs, {1000 * r['mean_step_s']:6.1f} ms/step; "
              f"CPU s front {r['front_cpu_s']:6.1f} core {core}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
