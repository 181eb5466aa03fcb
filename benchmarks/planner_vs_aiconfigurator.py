"""flotilla's planner beside NVIDIA's AIConfigurator on public serving scenarios (no GPU needed: both predict).

    .venv/bin/pip install aiconfigurator==0.12.0      # runs offline; not a flotilla dependency
    .venv/bin/python benchmarks/planner_vs_aiconfigurator.py [--out benchmarks/results/planner_vs_aiconfigurator.json]

For each scenario (model, H200 GPUs, fixed ISL/OSL, TTFT and TPOT targets) it runs ``flotilla.planner.plan``
with the shipped config and ``8xh200`` description (cut to the scenario's GPU count) under the auto load, and
``aiconfigurator cli default --serving-mode agg --backend vllm`` (aggregated serving as flotilla does it; its
silicon-measured H200 database), and prints each tool's chosen TP x PP x replicas x batch with its predicted
output tokens/s per GPU, TTFT and TPOT. flotilla's tokens/s is its replay's (ramp-up and drain included, as a
measured ``flotilla bench serve`` run would be); in parentheses the same plan's steady state by
AIConfigurator's formula, ``batch x (OSL - 1) / (TTFT + (OSL - 1) x TPOT)``, from flotilla's simulated p50s. The latency targets are given to flotilla as p50 targets
(``ttft_p50``, ``tpot_p50``), since AIConfigurator checks its single predicted TTFT and TPOT against them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

SCENARIOS = (
    # (name, shipped config, AIConfigurator model path, GPUs, ISL, OSL, TTFT ms, TPOT ms)
    ("Llama-3.1-8B on 1x H200", "llama-3.1-8b", "meta-llama/Meta-Llama-3.1-8B", 1, 2048, 256, 1000, 20),
    ("Qwen3-32B on 8x H200", "qwen3-32b", "Qwen/Qwen3-32B", 8, 4000, 500, 2000, 30),
    ("Llama-3.1-70B on 8x H200", "llama-3.1-70b", "meta-llama/Meta-Llama-3.1-70B", 8, 4000, 500, 2000, 40),
)


def flotilla_plan(config: str, gpus: int, isl: int, osl: int, ttft_ms: float, tpot_ms: float) -> dict:
    from flotilla.planner import plan
    from flotilla.planner.hardware import load_hardware
    hw = dataclasses.replace(load_hardware("8xh200"), devices_per_node=gpus, name=f"{gpus}x H200")
    report = plan(config, hw, f"isl={isl},osl={osl},range=0", f"ttft_p50={ttft_ms}ms,tpot_p50={tpot_ms}ms",
                  max_num_seqs=[8, 16, 32, 64, 128, 256, 512], max_simulations=16)
    best = report.best
    p, m = best.plan, best.metrics
    # AIConfigurator's tokens/s: batch x (OSL - 1) / (TTFT + (OSL - 1) x TPOT), a steady state at full batch
    steady = p.max_num_seqs * p.replicas * (osl - 1) / (m.ttft_p50 + (osl - 1) * m.tpot_p50)
    return {"plan": f"TP{p.tp} PP{p.pp} x{p.replicas}, max_num_seqs {p.max_num_seqs}",
            "tokens_s_gpu": m.output_throughput / p.num_devices, "steady_tokens_s_gpu": steady / p.num_devices,
            "mean_batch": best.sim.mean_batch, "ttft_ms": m.ttft_p50 * 1e3, "tpot_ms": m.tpot_p50 * 1e3,
            "meets_slo": best.rejected is None, "gpus_used": p.num_devices}


def aiconfigurator_plan(model_path: str, gpus: int, isl: int, osl: int, ttft_ms: float, tpot_ms: float) -> dict:
    exe = shutil.which("aiconfigurator") or os.path.join(os.path.dirname(sys.executable), "aiconfigurator")
    with tempfile.TemporaryDirectory() as out:
        cmd = [exe, "cli", "default", "--model-path", model_path, "--total-gpus", str(gpus), "--system",
               "h200_sxm", "--backend", "vllm", "--serving-mode", "agg", "--isl", str(isl), "--osl", str(osl),
               "--ttft", str(ttft_ms), "--tpot", str(tpot_ms), "--save-dir", out]
        env = dict(os.environ, AICONFIGURATOR_LOG_LEVEL="WARNING")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"aiconfigurator failed: {proc.stderr[-2000:]}")
        (path,) = glob.glob(os.path.join(out, "**", "agg", "best_config_topn.csv"), recursive=True)
        with open(path, encoding="utf-8") as f:
            row = next(csv.DictReader(f))
    tp, pp, bs = int(row["tp"]), int(row["pp"]), int(row["bs"])
    replicas = gpus // int(row["num_total_gpus"])  # the CSV counts one replica's GPUs
    return {"plan": f"TP{tp} PP{pp} x{replicas}, batch {bs}", "tokens_s_gpu": float(row["tokens/s/gpu"]),
            "ttft_ms": float(row["ttft"]), "tpot_ms": float(row["tpot"]), "gpus_used": replicas * tp * pp,
            "perf_db": f"{row['backend']} {row['version']}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/planner_vs_aiconfigurator.json")
    args = ap.parse_args()
    rows = []
    for name, config, aic_model, gpus, isl, osl, ttft, tpot in SCENARIOS:
        ours = flotilla_plan(config, gpus, isl, osl, ttft, tpot)
        theirs = aiconfigurator_plan(aic_model, gpus, isl, osl, ttft, tpot)
        rows.append({"scenario": name, "isl": isl, "osl": osl, "ttft_ms": ttft, "tpot_ms": tpot,
                     "flotilla": ours, "aiconfigurator": theirs})
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    print("| scenario (ISL/OSL, TTFT/TPOT targets) | flotilla plan | tok/s/GPU replay (steady) | TTFT / TPOT p50 "
          "| AIConfigurator plan | tok/s/GPU | TTFT / TPOT |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        f, a = r["flotilla"], r["aiconfigurator"]
        print(f"| {r['scenario']} ({r['isl']}/{r['osl']}, {r['ttft_ms']} ms / {r['tpot_ms']} ms) | {f['plan']} | "
              f"{f['tokens_s_gpu']:.0f} ({f['steady_tokens_s_gpu']:.0f}) | {f['ttft_ms']:.0f} / {f['tpot_ms']:.1f} ms "
              f"| {a['plan']} | {a['tokens_s_gpu']:.0f} | {a['ttft_ms']:.0f} / {a['tpot_ms']:.1f} ms |")


if __name__ == "__main__":
    main()
