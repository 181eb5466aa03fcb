"""``flotilla plan``: flags and the command (the CLI module registers them with ``add_arguments`` / ``run``)."""

from __future__ import annotations

import argparse
import sys

from flotilla.planner.metrics import DEFAULT_SLO


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="alias, HF directory, .gguf file, a config.json (no weights needed), or a shipped config: "
                        "llama-3.1-8b, llama-3.1-70b, qwen3-32b")
    p.add_argument("--hardware", default="local", help="local (this machine, measured once and cached), a shipped "
                                                      "system (8xh200, 8xa100-80gb, epyc-9654-2s) or a YAML file")
    p.add_argument("--workload", default="chat", help="preset and/or key=value pairs: isl, osl, range, prefix, rate "
                                                      "or concurrency (auto), requests, seed (default: chat = "
                                                      "isl=512,osl=128,range=0.25, concurrency auto)")
    p.add_argument("--slo", default=DEFAULT_SLO, help=f"latency targets: ttft_p50/ttft_p99/tpot_p50/tpot_p99 in s or "
                                                      f"ms, or none (default: {DEFAULT_SLO})")
    p.add_argument("--top", type=int, default=5, help="plans to show (default 5)")
    p.add_argument("--emit", default=None, metavar="DEPLOY_YAML", help="write the best plan as a deployment file")
    p.add_argument("--probe", type=int, default=0, metavar="N",
                   help="run the top N plans for real on this machine, compare, and refit the calibration")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", "-q", choices=["int8"], default=None)
    p.add_argument("--tensor-parallel-size", "-tp", dest="tp", type=_int_list, default=None,
                   help="only these TP sizes (comma-separated; default: all that fit)")
    p.add_argument("--pipeline-parallel-size", "-pp", dest="pp", type=_int_list, default=None)
    p.add_argument("--replicas", type=_int_list, default=None)
    p.add_argument("--max-num-seqs", type=_int_list, default=None, help="candidates (default 4,8,...,256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-simulations", type=int, default=12, help="simulate at most this many candidates")
    p.add_argument("--refresh-hardware", action="store_true", help="measure --hardware local again")


def run(ns: argparse.Namespace) -> int:
    from flotilla.planner.api import plan
    from flotilla.planner.report import format_report

    def log(msg: str) -> None:
        print(f"flotilla plan: {msg}", file=sys.stderr, flush=True)

    if ns.top < 1 or ns.max_simulations < 1 or ns.probe < 0:
        print("error: --top and --max-simulations must be >= 1, --probe >= 0", file=sys.stderr)
        return 2
    try:
        report = plan(ns.model, ns.hardware, ns.workload, ns.slo, refresh_hardware=ns.refresh_hardware, log=log,
                      tp=ns.tp, pp=ns.pp, replicas=ns.replicas, max_num_seqs=ns.max_num_seqs, dtype=ns.dtype,
                      quantization=ns.quantization, max_num_batched_tokens=ns.max_num_batched_tokens,
                      max_simulations=ns.max_simulations)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report, ns.top))
    if ns.emit:
        from flotilla.planner.emit import deployment_yaml
        if report.best is None:
            print("error: no plan fits: nothing to --emit", file=sys.stderr)
            return 1
        with open(ns.emit, "w", encoding="utf-8") as f:
            f.write(deployment_yaml(report))
        print(f"\nwrote {ns.emit} ({report.best.label}); serve it with: flotilla serve --config {ns.emit}")
    if ns.probe:
        return _probe(report, ns.probe, log)
    return 0


def _probe(report, n: int, log) -> int:
    from flotilla.planner.probe import probe, refit_from_probes
    from flotilla.planner.search import predict
    chosen = (report.ranked + [e for e in report.rejected if e.metrics is not None])[:n]
    if not chosen:
        print("error: no simulated plan to probe", file=sys.stderr)
        return 1
    try:
        runs = probe(report, chosen, log)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    fitted = refit_from_probes(report, runs)
    print("\npredicted vs measured (output tok/s, TPOT p50, TTFT p99, goodput req/s); refit: the new calibration's "
          "prediction")
    print(f"{'plan':<31} {'tok/s pred/meas':>18} {'TPOT p50 ms':>16} {'TTFT p99 s':>14} {'goodput':>12} "
          f"{'refit tok/s':>11} {'refit TPOT':>10}")
    for run in runs:
        p, m = run.evaluated.metrics, run.measured
        q = predict(report.model, report.hardware, report.workload, report.slo, fitted, run.evaluated)
        print(f"{run.evaluated.label:<31} {p.output_throughput:>8.1f}/{m.output_throughput:<9.1f} "
              f"{p.tpot_p50 * 1e3:>7.1f}/{m.tpot_p50 * 1e3:<8.1f} {p.ttft_p99:>6.2f}/{m.ttft_p99:<7.2f} "
              f"{p.goodput:>5.2f}/{m.goodput:<6.2f} {q.output_throughput:>11.1f} {q.tpot_p50 * 1e3:>8.1f}ms")
    print(f"calibration refit on {len(runs)} run(s) and stored: step {fitted.step * 1e3:.2f} ms, per sequence "
          f"{fitted.per_seq * 1e6:.0f} us, kernel scale {fitted.kernel_scale:.2f}, comm scale {fitted.comm_scale:.2f}, "
          f"serving processes' cores {fitted.host_cores:.2f}")
    return 0
