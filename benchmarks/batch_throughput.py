"""Batch jobs vs the offline API: the same N completions requests through ``LLM.generate``, ``flotilla
run-batch`` and the Batch API of ``flotilla serve`` (embedded SmolLM2, greedy, ignore_eos, same engine
settings), then the peak RSS of ``run-batch`` on a small and a large input (it must not grow with the input).
A fourth row, ``AsyncLLM`` (all requests handed at once to the engine client that serve and run-batch use, its
engine core in its own process), separates the cost of that process split from the cost of the batch path.

Usage: .venv/bin/python benchmarks/batch_throughput.py [--num-requests 2000] [--max-tokens 32]
           [--max-num-seqs 128] [--rss-lines 1000,10000,100000] [--skip-rss]
           [--paths llm,async,run-batch,batch-api] [--json results/batch.json]

Output tok/s is generated tokens over the job's own time, engine start excluded everywhere: ``LLM.generate``'s
call; run-batch's job (its summary line: from the first request to the last result); the Batch API from
``batches.create`` to the moment a poll (every 0.1 s) sees ``completed`` (validation and finalization
included). Ratios are to ``LLM.generate`` (issue 15's target: >= 0.9). The RSS check runs ``run-batch`` with
one-word prompts and ``max_tokens`` 1 on inputs of each size and reads the peak resident set (VmHWM) of the
run-batch process and of its engine core.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_PROMPTS: dict[int, list[str]] = {}


def prompt(i: int) -> str:
    """The ``i``-th of the requests ``batch_spark_raydata.py`` runs (its first prompt set, seed 0), so both tables
    time the same requests; a negative ``i`` gives warm-up prompts (another seed) that share no cached prefix."""
    from batch_spark_raydata import make_prompts
    seed, index = (0, i) if i >= 0 else (99, -1 - i)
    have = _PROMPTS.get(seed, [])
    if index >= len(have):  # make_prompts(n) starts with make_prompts(k) for k < n
        have = _PROMPTS[seed] = make_prompts(max(2 * len(have), index + 1, 64), seed)
    return have[index]


def write_input(path: str, n: int, max_tokens: int, tiny: bool = False) -> None:
    with open(path, "w") as f:
        for i in range(n):
            body = {"model": "smollm2-135m-instruct", "prompt": "a" if tiny else prompt(i), "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")


def engine_flags(ns) -> list[str]:
    return ["--max-num-seqs", str(ns.max_num_seqs), "--max-model-len", "512"]


def bench_llm(ns) -> float:
    from flotilla import LLM, SamplingParams
    llm = LLM(max_num_seqs=ns.max_num_seqs, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True)
    llm.generate([prompt(-1 - i) for i in range(8)], params)  # warm up
    start = time.perf_counter()
    outs = llm.generate([prompt(i) for i in range(ns.num_requests)], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm, outs
    gc.collect()
    return tokens / elapsed


def bench_async_llm(ns) -> float:
    import asyncio

    from flotilla.engine.arg_utils import EngineArgs
    from flotilla.engine.async_llm import AsyncLLM
    from flotilla.sampling_params import SamplingParams
    llm = AsyncLLM(EngineArgs(max_num_seqs=ns.max_num_seqs, max_model_len=512))
    params = SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True)

    async def one(i: int) -> int:
        tokens = 0
        async for out in llm.generate(prompt(i), params, f"r{i}"):
            tokens = len(out.outputs[0].token_ids)  # cumulative outputs
        return tokens

    async def run() -> float:
        await asyncio.gather(*(one(-1 - i) for i in range(8)))  # warm up
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(ns.num_requests))))
        return tokens / (time.perf_counter() - start)
    try:
        return asyncio.run(run())
    finally:
        llm.shutdown()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flotilla.entrypoints.cli", *args]


def bench_run_batch(ns, workdir: str) -> float:
    src, out = os.path.join(workdir, "in.jsonl"), os.path.join(workdir, "out.jsonl")
    write_input(src, ns.num_requests, ns.max_tokens)
    r = subprocess.run(cli("run-batch", "-i", src, "-o", out, *engine_flags(ns)), capture_output=True, text=True)
    summary = r.stderr.strip().splitlines()[-1]
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return float(re.search(r"([\d.]+) output tok/s", summary).group(1))


def bench_batch_api(ns, workdir: str) -> float:
    import openai

    from test_server_helpers import ServerProcess
    src = os.path.join(workdir, "api_in.jsonl")
    write_input(src, ns.num_requests, ns.max_tokens)
    srv = ServerProcess(None, *engine_flags(ns), "--batch-data-dir", os.path.join(workdir, "data"),
                        startup_timeout=600)
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", timeout=600)
        client.completions.create(model="smollm2-135m-instruct", prompt=prompt(-1), max_tokens=4)  # warm up
        with open(src, "rb") as f:
            file = client.files.create(file=f, purpose="batch")
        start = time.perf_counter()
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
        while batch.status not in ("completed", "failed", "cancelled"):
            time.sleep(0.1)
            batch = client.batches.retrieve(batch.id)
        elapsed = time.perf_counter() - start
        if batch.status != "completed" or batch.request_counts.failed:
            raise RuntimeError(f"batch ended {batch.status}: {batch}")
        tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"]
                     for x in client.files.content(batch.output_file_id).text.splitlines())
        return tokens / elapsed
    finally:
        srv.stop()


def vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid: int) -> list[int]:
    from test_server_helpers import child_pids
    return child_pids(pid)


def peak_rss(ns, workdir: str, lines: int) -> tuple[float, float, float]:
    """(front-end peak RSS MiB, engine core peak RSS MiB, seconds) of run-batch over ``lines`` requests."""
    src, out = os.path.join(workdir, f"rss{lines}.jsonl"), os.path.join(workdir, f"rss{lines}.out")
    write_input(src, lines, 1, tiny=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cli("run-batch", "-i", src, "-o", out, *engine_flags(ns)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    front = core = 0
    while proc.poll() is None:
        front = max(front, vm_hwm_kib(proc.pid) or 0)
        for child in children(proc.pid):
            core = max(core, vm_hwm_kib(child) or 0)
        time.sleep(0.2)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err)
    return front / 1024, core / 1024, time.perf_counter() - start


PATHS = {"llm": ("llm_generate_tok_s", "LLM.generate"), "async": ("async_llm_tok_s", "AsyncLLM"),
         "run-batch": ("run_batch_tok_s", "run-batch"), "batch-api": ("batch_api_tok_s", "Batch API")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--rss-lines", default="1000,10000,100000", help="comma-separated input sizes of the RSS check")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--paths", default=",".join(PATHS), help="throughput rows to run (none: '')")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ns = ap.parse_args()
    results: dict = {"cpu": cpu_model(), "cores": os.cpu_count(), "num_requests": ns.num_requests,
                     "max_tokens": ns.max_tokens, "max_num_seqs": ns.max_num_seqs}
    with tempfile.TemporaryDirectory(prefix="flotilla-batch-bench-") as workdir:
        runs = {"llm": lambda: bench_llm(ns), "async": lambda: bench_async_llm(ns),
                "run-batch": lambda: bench_run_batch(ns, workdir), "batch-api": lambda: bench_batch_api(ns, workdir)}
        chosen = [p for p in ns.paths.split(",") if p]
        for path in chosen:
            results[PATHS[path][0]] = runs[path]()
        if chosen:
            base = results.get("llm_generate_tok_s")
            print(f"CPU {results['cpu']} ({results['cores']} cores); {ns.num_requests} requests x {ns.max_tokens} "
                  f"tokens")
            for path in chosen:
                key, name = PATHS[path]
                ratio = f"  ratio {results[key] / base:.3f}" if base else ""
                print(f"{name:14s} {results[key]:8.1f} output tok/s{ratio}", flush=True)
        if not ns.skip_rss:
            results["rss"] = {}
            for lines in (int(x) for x in ns.rss_lines.split(",")):
                front, core, seconds = peak_rss(ns, workdir, lines)
                results["rss"][lines] = {"run_batch_mib": front, "engine_core_mib": core, "seconds": seconds}
                print(f"run-batch over {lines:>7d} lines (max_tokens 1): peak RSS {front:7.1f} MiB (engine core "
                      f"{core:7.1f} MiB), {seconds:.0f} s", flush=True)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
