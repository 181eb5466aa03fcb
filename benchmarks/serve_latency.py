"""TTFT and ITL of `flotilla serve` (embedded SmolLM2) at several concurrencies, one run on this machine.

    .venv/bin/python benchmarks/serve_latency.py [--concurrency 1,16] [--input-len 128] [--output-len 64]

Starts a real server on a free port, runs `flotilla bench serve` (vLLM's metric definitions) once per
concurrency with --repeats runs each, and prints the median of the runs' median TTFT / ITL / TPOT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from compare import free_port, wait_healthy  # the same server helpers as the peer comparison


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--prompts-per-slot", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--serve-args", default="", help="extra flags for flotilla serve")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "flotilla.entrypoints.cli", "serve", "--port", str(port), *args.serve_args.split()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    try:
        wait_healthy(url, proc)
        for c in (int(x) for x in args.concurrency.split(",")):
            runs = []
            for r in range(args.repeats):
                out = tempfile.mktemp(suffix=".json")
                subprocess.run([sys.executable, "-m", "flotilla.entrypoints.cli", "bench", "serve", "--base-url", url,
                                "--random-input-len", str(args.input_len), "--random-output-len",
                                str(args.output_len), "--num-prompts", str(c * args.prompts_per_slot),
                                "--max-concurrency", str(c), "--ignore-eos", "--seed", str(r),
                                "--result-filename", out], check=True, stdout=subprocess.DEVNULL)
                with open(out) as f:
                    runs.append(json.load(f))
                os.unlink(out)
            keys = ["median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "median_tpot_ms",
                    "output_throughput"]
            results[c] = {k: statistics.median(run[k] for run in runs) for k in keys}
            results[c]["failed"] = sum(run["failed"] for run in runs)
            print(f"concurrency {c:3d}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[c].items()), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
