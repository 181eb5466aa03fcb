"""``--probe N``: run plans for real on this machine and compare with the prediction.

Each plan is written as a deployment file (``flotilla.planner.emit``) and served by ``flotilla serve
--config`` in a child process (its own process group, stopped with SIGTERM and, after a grace period,
SIGKILL); the workload's requests are replayed through ``flotilla bench serve``'s client (streaming
completions, ignore_eos, the same concurrency or rate as simulated, after warm-up requests at the load's
concurrency) and scored
with the planner's own metrics. ``refit_from_probes`` then fits the calibration to the measured runs and
stores it for this machine.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from flotilla.planner.calibration import Measured, refit, save_calibration
from flotilla.planner.cost import Calibration
from flotilla.planner.emit import deployment_yaml
from flotilla.planner.metrics import PlanMetrics, plan_metrics
from flotilla.planner.search import Evaluated, PlanReport, predict

PROBE_MODEL_NAME = "probe"


@dataclass(frozen=True)
class ProbeRun:
    """One plan run for real: the ``evaluated`` plan (its prediction in ``evaluated.metrics``), the
    ``measured`` metrics and the server's start-up seconds."""

    evaluated: Evaluated
    measured: PlanMetrics
    startup_s: float


def probe(report: PlanReport, plans: list[Evaluated], log: Callable[[str], None] = print,
          startup_timeout_s: float = 600.0) -> list[ProbeRun]:
    """Run each of ``plans`` for real, one after the other (see the module docstring)."""
    if report.hardware.device_kind != "cpu" or not report.hardware.key or report.hardware.nodes != 1:
        raise ValueError("--probe runs plans on this machine: use --hardware local")
    return [run_plan(report, e, log, startup_timeout_s) for e in plans]


def run_plan(report: PlanReport, evaluated: Evaluated, log: Callable[[str], None] = print,
             startup_timeout_s: float = 600.0) -> ProbeRun:
    """Serve ``evaluated.plan`` with ``flotilla serve --config`` and replay the workload against it."""
    from flotilla.bench.datasets import BenchRequest
    from flotilla.bench.serve import ServeBenchConfig, run_benchmark
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    plan, workload = evaluated.plan, report.workload
    rate, conc = evaluated.load  # what the simulation sent one replica
    n = workload.num_requests_for(rate, conc) * plan.replicas
    requests = [BenchRequest(r.prompt, len(r.prompt), r.output_len)
                for r in workload.requests(n, report.model.vocab_size)]
    with tempfile.TemporaryDirectory(prefix="flotilla-probe-") as tmp:
        path = os.path.join(tmp, "deploy.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(deployment_yaml(report, evaluated, name=PROBE_MODEL_NAME))
        log_path = os.path.join(tmp, "server.log")
        port = _free_port()
        log(f"probe {evaluated.label}: starting flotilla serve on port {port} ...")
        with open(log_path, "wb") as server_log:
            proc = subprocess.Popen([sys.executable, "-m", "flotilla.entrypoints.cli", "serve", "--config", path,
                                     "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"],
                                    stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            start = time.monotonic()
            _wait_ready(proc, port, startup_timeout_s, log_path)
            startup = time.monotonic() - start
            log(f"probe {evaluated.label}: ready in {startup:.0f} s; replaying {n} requests ...")
            cfg = ServeBenchConfig(base_url=f"http://127.0.0.1:{port}", model=PROBE_MODEL_NAME,
                                   max_concurrency=conc * plan.replicas if conc is not None else None,
                                   request_rate=rate * plan.replicas if rate is not None else math.inf,
                                   ignore_eos=True, seed=workload.seed)
            # warm up at the batch size the load reaches, so first-shape costs stay out of the measurement
            warm = min(n, conc * plan.replicas if conc is not None else plan.max_num_seqs * plan.replicas)
            metrics, results = asyncio.run(run_benchmark(cfg, requests, warmup_concurrency=warm))
        finally:
            _stop(proc)
    if metrics.failed:
        errors = {r.error for r in results if not r.success}
        raise RuntimeError(f"probe {evaluated.label}: {metrics.failed} request(s) failed: {sorted(errors)[:3]}")
    return ProbeRun(evaluated, plan_metrics(results, metrics.duration, report.slo), startup)


def refit_from_probes(report: PlanReport, runs: list[ProbeRun], store: bool = True) -> Calibration:
    """Fit the calibration to ``runs`` (``flotilla.planner.calibration.refit``) and store it for this machine."""
    measured = [Measured(key=r.evaluated, metrics=r.measured, parallel=r.evaluated.plan.world_size > 1,
                         contended=_contended(report, r.evaluated)) for r in runs]

    def predicted(calibration: Calibration, evaluated: Evaluated) -> PlanMetrics:
        return predict(report.model, report.hardware, report.workload, report.slo, calibration, evaluated)

    fitted = refit(measured, report.calibration, predicted)
    if store:
        save_calibration(report.hardware, fitted)
    return fitted


def _contended(report: PlanReport, evaluated: Evaluated) -> bool:
    """Whether the plan's ranks' threads want more cores than the serving processes leave them."""
    from flotilla.planner.cost import CostModel
    return CostModel(report.model, report.hardware, evaluated.plan, report.calibration).host < 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, port: int, timeout_s: float, log_path: str) -> None:
    import httpx
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flotilla serve exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"flotilla serve was not ready after {timeout_s:.0f} s:\n{_tail(log_path)}")


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the server's process group (it drains and exits), SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
