"""How well does ``flotilla plan`` predict, and does its pick hold up when measured?

    .venv/bin/python benchmarks/planner_accuracy.py [--model smollm2-135m-instruct] \
        [--configs 1x1x1x4,...] [--out benchmarks/results/planner_accuracy.json] [--quiet-load 1.0]

The machine is shared: the hardware is measured, and each configuration run, holding the shared lock
(``--lock``, as tests that start servers do) once the 1-minute load average is below ``--quiet-load`` (or
after ``--max-wait-s``); the load before and after each run is recorded. With ``--nice N`` (negative: needs
root) the script and everything it starts (the servers, their engine and worker processes, the client) run
at that niceness, so other work on the machine yields to the measured system, as on a dedicated machine.

The default configurations of the embedded SmolLM2-135M-Instruct give every rank one thread: TP 1 (with
``thr=1``) / 3, PP 1 / 2, replicas 1 / 2, ``max_num_seqs`` 4 / 16. TP 2 is listed too: SmolLM2's 9 heads / 3 KV
heads do not split 2 ways, so the planner rejects it (the table says why) and TP 3 (three one-thread ranks on
two cores) is the tensor-parallel configuration that runs. On this shared two-core machine a rank with two
OpenMP threads runs a small matmul in 0.3 ms or 30 ms depending on what the other sessions do at that moment
(measured minutes apart), which no model, and no single measurement, predicts.

Each configuration TPxPPxREPLICASxMAX_NUM_SEQS is sized and simulated by the planner on this machine's
measured hardware (``--hardware local``), then served for real (``flotilla serve --config`` with the plan's
deployment file: mp executor for TP/PP, embedded replicas) and driven with the same workload by the bench
client. Reported per configuration: predicted (with the priors, and leave-one-out: calibration refit on the
other configurations' measurements only) and measured output tok/s, TPOT p50, TTFT p99 and goodput.
Summary: median absolute error of throughput and TPOT (priors, leave-one-out), and the planner's top pick
(by predicted goodput; priors, and calibration refit on all runs) against the best measured goodput.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

DEFAULT_CONFIGS = "1x1x1x4t1,1x1x1x16t1,2x1x1x4,3x1x1x4,3x1x1x16,1x2x1x4,1x2x1x16,1x1x2x4,1x1x2x16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help="TPxPPxREPLICASxMAX_NUM_SEQS[tTHREADS], comma-separated")
    ap.add_argument("--workload", default="isl=128,osl=32,range=0.25,rate=2,concurrency=16,requests=32")
    ap.add_argument("--slo", default="ttft_p99=15s,tpot_p99=250ms")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default="benchmarks/results/planner_accuracy.json")
    ap.add_argument("--lock", default="/tmp/flotilla-ray-tests.lock",
                    help="taken for each measured run; '' when the whole run holds it (flock LOCK python ...)")
    ap.add_argument("--quiet-load", type=float, default=1.0)
    ap.add_argument("--max-wait-s", type=float, default=1800)
    ap.add_argument("--refresh-hardware", action="store_true")
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--from", dest="from_file", default=None, metavar="JSON",
                    help="re-predict the measured runs of an earlier output (same --model, --workload, --slo) "
                         "with the current cost model, without serving anything")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop a probed server on the way out
    if args.nice:
        os.nice(args.nice)
    quiet = lambda: quiet_lock(args.lock, args.quiet_load, args.max_wait_s)  # noqa: E731
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    from flotilla.planner.api import get_hardware
    from flotilla.planner.calibration import load_calibration
    from flotilla.planner.cost import Calibration, Plan
    from flotilla.planner.measure import cpu_model
    from flotilla.planner.metrics import parse_slo
    from flotilla.planner.model import load_model_desc
    from flotilla.planner.probe import refit_from_probes, run_plan
    from flotilla.planner.search import PlanReport, evaluate, predict
    from flotilla.planner.workload import parse_workload

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    model = load_model_desc(args.model)
    with quiet():
        hw = get_hardware("local", model, args.dtype, refresh=args.refresh_hardware, log=log)
    workload, slo = parse_workload(args.workload), parse_slo(args.slo)
    prior = Calibration.prior(hw)
    dtype = model.runtime_dtype("cpu", hw.bf16_native, args.dtype)
    report = PlanReport(model, hw, workload, slo, prior, dtype)
    earlier = _load_earlier(args.from_file, workload.describe(), slo.describe()) if args.from_file else None
    rows, rejected = [], []
    for tp, pp, r, seqs, threads in (parse_config(c) for c in args.configs.split(",")):
        plan = Plan(tp=tp, pp=pp, replicas=r, max_num_seqs=seqs, dtype=dtype, num_threads=threads,
                    max_model_len=max(2048, workload.max_seq_len))
        ev = evaluate(model, hw, workload, slo, prior, plan)
        if ev.metrics is None:
            log(f"{ev.label}: not runnable: {ev.rejected}")
            rejected.append({"config": ev.label, "rejected": ev.rejected})
            continue
        if earlier is not None:
            if ev.label not in earlier:
                log(f"{ev.label}: not in {args.from_file}")
                continue
            rows.append(_replayed_row(earlier[ev.label], ev))
            continue
        with quiet():
            load_before = os.getloadavg()[0]
            start = time.monotonic()
            run = run_plan(report, ev, log=log)
            rows.append({"config": ev.label, "run": run, "wall_s": time.monotonic() - start,
                         "load_before": load_before, "load_after": os.getloadavg()[0]})
        with open(args.out + ".partial", "w", encoding="utf-8") as f:  # measurements so far, in case of a crash
            json.dump([{"config": r["config"], "load_before": r["load_before"], "load_after": r["load_after"],
                        "predicted_prior": _metrics_json(r["run"].evaluated.metrics),
                        "measured": _metrics_json(r["run"].measured)} for r in rows], f, indent=1)
        m = run.measured
        log(f"{ev.label}: predicted {ev.metrics.output_throughput:.1f} tok/s TPOT {ev.metrics.tpot_p50 * 1e3:.1f} ms, "
            f"measured {m.output_throughput:.1f} tok/s TPOT {m.tpot_p50 * 1e3:.1f} ms (load {load_before:.1f})")
    runs = [row["run"] for row in rows]

    def pred(calibration, run):
        return predict(model, hw, workload, slo, calibration, run.evaluated)

    full = refit_from_probes(report, runs, store=False)
    for i, row in enumerate(rows):
        others = [r for j, r in enumerate(runs) if j != i]
        row["loo"] = pred(refit_from_probes(report, others, store=False), row["run"])
        row["refit_all"] = pred(full, row["run"])
        log(f"{row['config']}: leave-one-out {row['loo'].output_throughput:.1f} tok/s "
            f"TPOT {row['loo'].tpot_p50 * 1e3:.1f} ms")
    summary = summarize(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"cpu": cpu_model(), "cores": hw.devices_per_node, "python": platform.python_version(), "commit": commit,
           "niceness": os.nice(0), "measurements_from": args.from_file and {
               "file": args.from_file, "commit": earlier_doc_commit(args.from_file)},
           "model": args.model, "dtype": dtype, "workload": workload.describe(), "slo": slo.describe(),
           "stored_calibration": vars(load_calibration(hw)), "refit_all": vars(full), "summary": summary,
           "rows": [_row_json(row) for row in rows], "rejected": rejected}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    print(markdown(doc))


def _load_earlier(path: str, workload: str, slo: str) -> dict:
    """{config label: row} of an earlier output, checked to be of the same workload and SLO."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if (doc["workload"], doc["slo"]) != (workload, slo):
        raise SystemExit(f"{path} was measured with workload {doc['workload']!r}, SLO {doc['slo']!r}: pass the same "
                         f"--workload and --slo (got {workload!r}, {slo!r})")
    return {row["config"]: row for row in doc["rows"]}


def earlier_doc_commit(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("commit", "?")


def _replayed_row(row: dict, evaluated) -> dict:
    """A row of this run from an earlier measurement of the same configuration (``--from``)."""
    from flotilla.planner.metrics import PlanMetrics
    from flotilla.planner.probe import ProbeRun
    m = row["measured"]
    measured = PlanMetrics(m["tok_s"], m["req_s"], m["ttft_p50"], m["ttft_p99"], m["tpot_p50"], m["tpot_p99"],
                           m["goodput"], m["goodput"] / m["req_s"] if m["req_s"] else 0.0, 0)
    return {"config": row["config"], "run": ProbeRun(evaluated, measured, row["startup_s"]), "wall_s": row["wall_s"],
            "load_before": row["load_before"], "load_after": row["load_after"]}


def parse_config(text: str) -> tuple:
    """``TPxPPxREPLICASxSEQS`` with an optional ``tTHREADS`` (threads per rank; default: the cores' share)."""
    shape, _, threads = text.partition("t")
    tp, pp, r, seqs = (int(x) for x in shape.split("x"))
    return tp, pp, r, seqs, int(threads) if threads else None


@contextlib.contextmanager
def quiet_lock(path: str, load: float, max_wait_s: float):
    """Hold the shared lock, taken once the 1-minute load average is below ``load`` (or ``max_wait_s``); with
    no ``path`` (``--lock ''``: the caller holds it for the whole run, ``flock LOCK python ...``) only wait."""
    import fcntl
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] >= load and time.monotonic() < deadline:
        time.sleep(15)
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _err(pred: float, meas: float) -> float:
    return abs(pred / meas - 1) if meas else float("inf")


def summarize(rows: list[dict]) -> dict:
    measured = [row["run"].measured for row in rows]
    best = max(m.goodput for m in measured)
    out = {"best_measured_goodput": best}
    for name, get in (("prior", lambda row: row["run"].evaluated.metrics), ("loo", lambda row: row["loo"]),
                      ("refit_all", lambda row: row["refit_all"])):
        preds = [get(row) for row in rows]
        out[f"{name}_median_abs_err_throughput"] = statistics.median(
            _err(p.output_throughput, m.output_throughput) for p, m in zip(preds, measured))
        out[f"{name}_median_abs_err_tpot"] = statistics.median(_err(p.tpot_p50, m.tpot_p50)
                                                              for p, m in zip(preds, measured))
        out[f"{name}_median_abs_err_ttft_p50"] = statistics.median(_err(p.ttft_p50, m.ttft_p50)
                                                                  for p, m in zip(preds, measured))
        pick = max(range(len(rows)), key=lambda i: (preds[i].goodput, preds[i].output_throughput))
        out[f"{name}_pick"] = rows[pick]["config"]
        out[f"{name}_pick_share_of_best"] = measured[pick].goodput / best if best else 0.0
    return out


def _metrics_json(m) -> dict:
    return {"tok_s": m.output_throughput, "req_s": m.request_throughput, "ttft_p50": m.ttft_p50,
            "ttft_p99": m.ttft_p99, "tpot_p50": m.tpot_p50, "tpot_p99": m.tpot_p99, "goodput": m.goodput}


def _row_json(row: dict) -> dict:
    run = row["run"]
    return {"config": row["config"], "wall_s": row["wall_s"], "load_before": row["load_before"],
            "load_after": row["load_after"], "startup_s": run.startup_s, "kv_blocks": run.evaluated.kv_blocks,
            "num_threads": run.evaluated.plan.num_threads, "predicted_prior": _metrics_json(run.evaluated.metrics),
            "predicted_loo": _metrics_json(row["loo"]), "predicted_refit_all": _metrics_json(row["refit_all"]),
            "measured": _metrics_json(run.measured)}


def markdown(doc: dict) -> str:
    lines = ["| config | tok/s prior / LOO / measured | TPOT p50 ms prior / LOO / measured | TTFT p99 s "
             "prior / LOO / measured | goodput req/s LOO / measured |", "| --- | --- | --- | --- | --- |"]
    for row in doc["rows"]:
        p, q, m = row["predicted_prior"], row["predicted_loo"], row["measured"]
        lines.append(f"| {row['config']} | {p['tok_s']:.1f} / {q['tok_s']:.1f} / {m['tok_s']:.1f} | "
                     f"{p['tpot_p50'] * 1e3:.0f} / {q['tpot_p50'] * 1e3:.0f} / {m['tpot_p50'] * 1e3:.0f} | "
                     f"{p['ttft_p99']:.2f} / {q['ttft_p99']:.2f} / {m['ttft_p99']:.2f} | "
                     f"{q['goodput']:.2f} / {m['goodput']:.2f} |")
    lines += [f"| {r['config']} | rejected by the planner: {r['rejected']} | | | |" for r in doc.get("rejected", [])]
    s = doc["summary"]
    lines += ["", f"median |error| throughput: prior {s['prior_median_abs_err_throughput']:.1%}, leave-one-out "
                  f"{s['loo_median_abs_err_throughput']:.1%}; TPOT: prior {s['prior_median_abs_err_tpot']:.1%}, "
                  f"leave-one-out {s['loo_median_abs_err_tpot']:.1%}; TTFT p50 (no target): prior "
                  f"{s['prior_median_abs_err_ttft_p50']:.0%}, leave-one-out {s['loo_median_abs_err_ttft_p50']:.0%}",
              f"top pick (prior): {s['prior_pick']} = {s['prior_pick_share_of_best']:.0%} of the best measured "
              f"goodput; (leave-one-out) {s['loo_pick']} = {s['loo_pick_share_of_best']:.0%}; (refit on all runs): "
              f"{s['refit_all_pick']} = {s['refit_all_pick_share_of_best']:.0%}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
