"""The cost of batch-invariant execution (issue 11): ``flotilla bench throughput`` and ``flotilla bench latency``
with and without ``--batch-invariant``, in one run.

    .venv/bin/python benchmarks/batch_invariant_cost.py [--repeats 3] [--model M] [--dtype auto] [--threads N]

Each repetition runs the default engine and the batch-invariant one back to back (each in a fresh process,
alternating which goes first), so a busy machine slows both alike; the table gives the median of the
repetitions and the ratio batch-invariant / default (throughput: < 1 is slower; latency: > 1 is slower).
Raw numbers go to --output-json (default benchmarks/results/batch_invariant_cost.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOTILLA = [sys.executable, "-m", "flotilla.entrypoints.cli"]


def bench(kind: str, workload: list[str], engine: list[str], invariant: bool, threads: int | None) -> dict:
    """One ``flotilla bench KIND`` run in a fresh process; its --output-json."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [*FLOTILLA, "bench", kind, *engine, *workload, "--output-json", out]
        if invariant:
            cmd.append("--batch-invariant")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None  # torch's intra-op threads
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
        with open(out) as f:
            return json.load(f)


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def commit() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    return rev.stdout.strip() + ("-dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small workloads (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's choice)")
    ap.add_argument("--output-json", default=str(ROOT / "benchmarks" / "results" / "batch_invariant_cost.json"))
    args = ap.parse_args()
    engine = ["--dtype", args.dtype] + (["--model", args.model] if args.model else [])
    n, out_len = (8, 16) if args.quick else (64, 64)
    throughput = ["--num-prompts", str(n), "--input-len", "128", "--output-len", str(out_len),
                  "--no-enable-prefix-caching"]
    latency = ["--batch-size", "1", "--input-len", "128", "--output-len", str(out_len), "--num-iters-warmup", "1",
               "--num-iters", "3"]
    runs: dict[str, list[dict]] = {k: [] for k in ("throughput", "throughput_bi", "latency", "latency_bi")}
    for rep in range(args.repeats):
        for invariant in ((False, True) if rep % 2 == 0 else (True, False)):
            suffix = "_bi" if invariant else ""
            runs["throughput" + suffix].append(bench("throughput", throughput, engine, invariant, args.threads))
            runs["latency" + suffix].append(bench("latency", latency, engine, invariant, args.threads))
            print(f"repeat {rep + 1} {'batch-invariant' if invariant else 'default'}: "
                  f"{runs['throughput' + suffix][-1]['output_tokens_per_second']:.1f} output tok/s, batch-1 "
                  f"{runs['latency' + suffix][-1]['avg_latency']:.3f} s", flush=True)
    tput = {k: statistics.median(r["output_tokens_per_second"] for r in runs[k])
            for k in ("throughput", "throughput_bi")}
    lat = {k: statistics.median(r["avg_latency"] for r in runs[k]) for k in ("latency", "latency_bi")}
    ratios = [b["output_tokens_per_second"] / a["output_tokens_per_second"]
              for a, b in zip(runs["throughput"], runs["throughput_bi"])]
    lat_ratios = [b["avg_latency"] / a["avg_latency"] for a, b in zip(runs["latency"], runs["latency_bi"])]
    summary = {"commit": commit(), "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads or "default",
               "dtype": args.dtype,
               "model": args.model or "smollm2-135m-instruct", "throughput_args": throughput, "latency_args": latency,
               "output_tok_s": tput, "batch1_latency_s": lat, "throughput_ratio_median": statistics.median(ratios),
               "latency_ratio_median": statistics.median(lat_ratios), "runs": runs}
    print("| workload | default (median) | batch-invariant (median) | median of the per-repeat ratios bi/default |")
    print(f"| offline output tok/s ({n} x 128 in / {out_len} out) | {tput['throughput']:.1f} | "
          f"{tput['throughput_bi']:.1f} | {summary['throughput_ratio_median']:.2f} |")
    print(f"| batch-1 latency (128 in / {out_len} out) | {lat['latency']:.3f} s | {lat['latency_bi']:.3f} s | "
          f"{summary['latency_ratio_median']:.2f} |")
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


if __name__ == "__main__":
    main()
