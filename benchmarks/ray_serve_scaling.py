"""SmolLM2 behind the Ray Serve ingress with 1 and 2 replicas, against embedded mode, in one run (issue 6).

    .venv/bin/python benchmarks/ray_serve_scaling.py [--repeats 3] [--output-json out.json]

Each configuration is one deployment file served by a real `flotilla serve --config F [--ray]` process (a
private local Ray instance for `--ray`) and measured with `flotilla bench serve` (vLLM's metric definitions),
median over ``--repeats`` runs:

* throughput: ``--num-prompts`` random prompts of ``--input-len`` tokens, ``--output-len`` out, concurrency
  ``--concurrency``, ignore_eos;
* latency: ``--latency-prompts`` prompts at concurrency 1 (same lengths): median TTFT and end-to-end latency;
  the ingress overhead is Ray's minus embedded mode's, with one replica each.

Configurations: embedded (one engine, all cores), Ray with 1 replica (all cores), Ray with 2 replicas (the
cores split between them). Writes JSON and prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from types import SimpleNamespace

from compare import bench_server, free_port, machine_description, git_commit  # same helpers as compare.py

DEPLOY = """models:
  - name: smollm2
    model: smollm2-135m-instruct
    replicas: {replicas}
    engine: {{num_threads: {threads}, max_num_seqs: 64}}
"""


def run_config(name: str, replicas: int, ray: bool, args) -> dict:
    cores = os.cpu_count() or 1
    deploy = tempfile.NamedTemporaryFile("w", prefix=f"deploy-{name}-", suffix=".yaml", delete=False)
    deploy.write(DEPLOY.format(replicas=replicas, threads=max(1, cores // replicas)))
    deploy.close()
    port = free_port()
    cmd = [sys.executable, "-m", "flotilla.entrypoints.cli", "serve", "--config", deploy.name, "--port", str(port)]
    if ray:
        cmd.append("--ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ns = SimpleNamespace(repeats=args.repeats, seed=args.seed)
    lengths = ["--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len)]
    out = {"replicas": replicas, "ray": ray}
    try:
        out["throughput"] = bench_server(f"{name}-throughput", cmd, port, ns, name, env=env, client_args=[
            *lengths, "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency)])
        port = free_port()
        cmd[cmd.index("--port") + 1] = str(port)
        out["latency"] = bench_server(f"{name}-latency", cmd, port, ns, name, env=env, client_args=[
            *lengths, "--num-prompts", str(args.latency_prompts), "--max-concurrency", "1"])
    finally:
        os.unlink(deploy.name)
    return out


def render(results: dict) -> str:
    rows = ["| configuration | output tok/s (c{c}) | median TTFT (c{c}) | median TTFT (c1) | median E2E (c1) | "
            "failed |".format(c=results["workload"]["concurrency"]), "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results["configs"].items():
        t, lat = r["throughput"], r["latency"]
        if t.get("status") != "ok" or lat.get("status") != "ok":
            rows.append(f"| {name} | skipped: {t.get('reason') or lat.get('reason')} | | | | |")
            continue
        rows.append(f"| {name} | {t['output_throughput']:.1f} | {t['median_ttft_ms']:.0f} ms | "
                    f"{lat['median_ttft_ms']:.0f} ms | {lat['median_e2el_ms']:.0f} ms | "
                    f"{t['failed'] + lat['failed']} |")
    o = results.get("ingress_overhead") or {}
    if o:
        rows += ["", f"Ingress overhead at concurrency 1 (Ray 1 replica minus embedded): TTFT "
                     f"{o['ttft_ms']:+.1f} ms, end-to-end {o['e2el_ms']:+.1f} ms; 2 replicas / 1 replica "
                     f"throughput: {results.get('scaling_2_over_1', float('nan')):.2f}x."]
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency-prompts", type=int, default=8)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    results = {"machine": machine_description(), "commit": git_commit(), "workload": vars(args), "configs": {}}
    for name, replicas, ray in (("embedded, 1 engine", 1, False), ("ray, 1 replica", 1, True),
                                ("ray, 2 replicas", 2, True)):
        print(f"{name} ...", flush=True)
        results["configs"][name] = run_config(name.replace(" ", "").replace(",", "-"), replicas, ray, args)
    c = results["configs"]
    emb, r1, r2 = c["embedded, 1 engine"], c["ray, 1 replica"], c["ray, 2 replicas"]
    if all(x["latency"].get("status") == "ok" for x in (emb, r1)):
        results["ingress_overhead"] = {
            "ttft_ms": r1["latency"]["median_ttft_ms"] - emb["latency"]["median_ttft_ms"],
            "e2el_ms": r1["latency"]["median_e2el_ms"] - emb["latency"]["median_e2el_ms"]}
    if all(x["throughput"].get("status") == "ok" for x in (r1, r2)):
        results["scaling_2_over_1"] = r2["throughput"]["output_throughput"] / r1["throughput"]["output_throughput"]
    print(render(results))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
