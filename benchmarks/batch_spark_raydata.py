"""The same N requests through ``LLM.generate``, Spark (``local[W]``) and Ray Data (W engine actors): output
tok/s and each framework's overhead as a ratio to ``LLM.generate`` in the same run (issue 15).

    .venv/bin/python benchmarks/batch_spark_raydata.py [--num-requests 2000] [--max-tokens 32]
        [--workers 2] [--batch-size 256] [--model smollm2-135m-instruct] [--modes llm,spark,ray]

Prompts: 6 to 48 random words; greedy, ``--max-tokens`` output tokens (ignore_eos, so every mode generates
exactly the same number of tokens). The engines share this machine's cores the way a user would run them:
``LLM.generate`` is one engine with torch's default threads; Spark runs ``--workers`` task slots (one engine
per Python worker, ``num_threads`` = ``spark.task.cpus`` = 1 here: W engines x 1 thread); Ray Data runs
``--workers`` engine actors with ``cores // workers`` threads each. "cold" runs include the engines' loading
(the framework's own start-up, JVM or Ray instance, is not timed): ``LLM(...)`` + ``generate``, Spark's first
job, the Ray Data job (its actors load their engines). "warm" runs are a second batch of fresh prompts (no
prefix-cache hits) on engines already loaded: ``generate`` again on the same ``LLM``, and a second Spark job
(``engine_loads`` shows that it built none); they are each framework's steady-state cost. Ratios compare
cold with cold and warm with warm. Prints a table and a JSON line; on a shared machine compare ratios from one
run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time

WORDS = ("the quick brown fox jumps over a lazy dog while engineers deploy inference servers and measure "
         "latency under load across many replicas of a model").split()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 48))) for _ in range(n)]


def run_llm(args, prompt_sets, params) -> list[dict]:
    from flotilla import LLM
    runs, start = [], time.perf_counter()
    llm = LLM(model=args.model)
    for label, prompts in zip(("LLM.generate (cold)", "LLM.generate (warm)"), prompt_sets):
        outs = llm.generate(prompts, params)
        runs.append({"mode": label, "wall_s": time.perf_counter() - start,
                     "tokens": sum(len(o.outputs[0].token_ids) for o in outs)})
        start = time.perf_counter()
    return runs


def run_spark(args, prompt_sets, params) -> list[dict]:
    from pyspark.sql import SparkSession

    from flotilla.batch.spark import generate
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers run this interpreter
    spark = (SparkSession.builder.master(f"local[{args.workers}]").appName("flotilla-bench")
             .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(args.batch_size)).getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        loads, runs = spark.sparkContext.accumulator(0), []
        for label, prompts in zip(("spark (cold)", "spark (warm)"), prompt_sets):
            df = spark.createDataFrame(list(enumerate(prompts)), "id int, prompt string")
            df = df.repartition(args.workers).cache()
            df.count()  # the input is in memory before timing
            start = time.perf_counter()
            rows = generate(df, "prompt", params, model=args.model, batch_size=args.batch_size,
                            engine_loads=loads).select("output.completion_tokens").collect()
            wall = time.perf_counter() - start
            runs.append({"mode": label, "wall_s": wall, "tokens": sum(r[0] for r in rows),
                         "engine_loads": loads.value})
        return runs
    finally:
        spark.stop()


def run_ray(args, prompt_sets, params) -> list[dict]:
    import ray

    from flotilla.batch.ray_data import FlotillaEngineProcessorConfig, build_processor
    from flotilla.distributed.ray_compat import loopback_only_ray
    with loopback_only_ray():
        ray.init(address="local", num_cpus=2 * args.workers, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        config = FlotillaEngineProcessorConfig(model_source=args.model, engine_kwargs={"num_threads": threads},
                                               sampling_params=params, batch_size=args.batch_size,
                                               concurrency=args.workers)
        ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompt_sets[0])]).materialize()
        start = time.perf_counter()
        rows = build_processor(config)(ds).select_columns(["num_generated_tokens"]).take_all()
        wall = time.perf_counter() - start
        return [{"mode": "ray data (cold)", "wall_s": wall, "tokens": sum(r["num_generated_tokens"] for r in rows)}]
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="Spark task slots (local[W]) and Ray Data engine actors")
    p.add_argument("--batch-size", type=int, default=256, help="rows per engine call (Spark and Ray Data)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--modes", default="llm,spark,ray")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from flotilla.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    # Two prompt sets of the same shape: the warm runs get fresh prompts (no prefix-cache hits from the first).
    prompt_sets = [make_prompts(args.num_requests, args.seed), make_prompts(args.num_requests, args.seed + 1)]
    runners = {"llm": run_llm, "spark": run_spark, "ray": run_ray}
    results = []
    for mode in args.modes.split(","):
        results += runners[mode](args, prompt_sets, params)
    baseline = {r["mode"].split(" (")[1]: r["tokens"] / r["wall_s"] for r in results if r["mode"].startswith("LLM")}
    for r in results:
        r["tok_s"] = r["tokens"] / r["wall_s"]
        phase = r["mode"].split(" (")[1]
        if phase in baseline:
            r["vs_llm"] = r["tok_s"] / baseline[phase]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); {args.num_requests} requests x {args.max_tokens} "
          f"tokens; model {args.model}; workers {args.workers}; batch size {args.batch_size}")
    print(f"{'mode':<20} {'wall s':>8} {'tokens':>8} {'tok/s':>8} {'vs LLM':>7}")
    for r in results:
        ratio = r.get("vs_llm", float("nan"))
        print(f"{r['mode']:<20} {r['wall_s']:8.1f} {r['tokens']:8d} {r['tok_s']:8.1f} {ratio:7.2f}"
              + (f"   engine loads so far: {r['engine_loads']}" if "engine_loads" in r else ""))
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
