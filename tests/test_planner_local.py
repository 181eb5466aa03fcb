"""``--hardware local`` measured for real (shortened: fewer matmul sizes and messages) and cached, and a
``--probe`` of a tiny model: a real ``flotilla serve`` driven by the bench client, then the refit."""

from __future__ import annotations

import math
import os

import pytest

from flotilla import envs
from flotilla.planner import measure
from flotilla.planner.metrics import parse_slo
from flotilla.planner.model import load_model_desc
from flotilla.planner.search import search
from flotilla.planner.workload import parse_workload


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model_desc(tiny_llama[0])


@pytest.fixture(scope="module")
def local(tiny, tmp_path_factory):
    """(hardware, log lines of the first and of a second call), measured into a fresh cache."""
    cache = tmp_path_factory.mktemp("planner_cache")
    # The fresh cache is for the planner's files; the CPU kernel library (built by setup.sh) is shared, or
    # the measurement and the probe's server would each compile it first.
    kernels = os.path.join(envs.cache_dir(), "cpu_kernels")
    if os.path.isdir(kernels):
        os.symlink(kernels, cache / "cpu_kernels")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOTILLA_CACHE_DIR", str(cache))
        mp.setattr(measure, "ROWS", (1, 16, 64))
        mp.setattr(measure, "MAX_COPIES", 4)
        mp.setattr(measure, "SYNC_ITERATIONS", 20)
        mp.setattr(measure, "MESSAGE_BYTES", (256, 65536, 1 << 20))
        real_bandwidth = measure.measure_bandwidth
        mp.setattr(measure, "measure_bandwidth", lambda: real_bandwidth(size_mib=32))
        first, second = [], []
        hw = measure.local_hardware(tiny, ["float32"], log=first.append)
        again = measure.local_hardware(tiny, ["float32"], log=second.append)
        yield hw, again, first, second


def test_local_hardware_is_measured_then_cached(local):
    hw, again, first, second = local
    assert first and not second  # the second call reads the cache
    assert hw == again and hw.key == measure.machine_key() and measure.cpu_model() in hw.name
    assert hw.shared and hw.devices_per_node == measure.num_cores()
    ar, sr = hw.collectives["all_reduce"], hw.collectives["send_recv"]
    assert ar.alpha > 0 and sr.alpha > 0 and ar.beta > 0  # gloo between two processes: latency and bytes cost
    assert hw.oversubscribed_sync >= 0 and hw.sync_penalty(hw.devices_per_node) == 0.0
    # one thread (two threads' speed swings with what else runs on a shared machine)
    assert hw.matmul_rate("float32", 64, threads=1) > hw.matmul_rate("float32", 1, threads=1) > 0
    assert hw.bandwidth(1) > 0


@pytest.mark.slow
def test_probe_runs_a_plan_for_real_and_refits(tiny, local):
    from flotilla.planner.probe import refit_from_probes, run_plan
    from flotilla.planner.search import predict
    hw = local[0]
    report = search(tiny, hw, parse_workload("isl=32,osl=8,range=0,concurrency=2,requests=6"), parse_slo("none"),
                    tp=[1], pp=[1], replicas=[1], max_num_seqs=[4], dtype="float32")
    best = report.best
    assert best.label.startswith("TP1 PP1 x1 seqs=4 thr=") and 1 <= best.plan.num_threads <= measure.num_cores()
    run = run_plan(report, best, log=lambda msg: None)
    assert run.measured.completed == 6 and run.measured.failed == 0 and run.measured.output_throughput > 0
    fitted = refit_from_probes(report, [run], store=False)
    assert fitted.fitted_from == 1

    def error(calibration):
        """The fit's objective on this run: squared log errors of throughput and median TPOT."""
        p = predict(report.model, hw, report.workload, report.slo, calibration, best)
        return (math.log(p.output_throughput / run.measured.output_throughput) ** 2
                + math.log(p.tpot_p50 / run.measured.tpot_p50) ** 2)
    assert error(fitted) <= error(report.calibration), (run.measured, fitted)  # never worse than the start


def test_serve_resolves_parallel_auto_on_this_machine(local, tiny_llama, tmp_path):
    """``flotilla serve --config`` with ``parallel: auto``: planned on the measured machine (the cache above)
    with the chat workload shortened to the tiny model's 512-token context; the result is a valid engine."""
    from flotilla.entrypoints.cli import build_parser
    from flotilla.entrypoints.openai.server import deployment_from_args
    path = tmp_path / "deploy.yaml"
    path.write_text(f"models:\n  - name: tiny\n    model: {tiny_llama[0]}\n    parallel: auto\n"
                    f"    engine: {{dtype: float32, max_num_seqs: 4}}\n")
    (spec,) = deployment_from_args(build_parser().parse_args(["serve", "--config", str(path)])).models
    assert not spec.parallel_auto and spec.engine["max_num_seqs"] == 4 and spec.engine["max_model_len"] == 512
    assert spec.tensor_parallel_size * spec.pipeline_parallel_size * spec.replicas <= measure.num_cores()
    config = spec.engine_args().create_engine_config()
    assert config.cache.num_blocks == spec.engine["num_kv_blocks"] and config.device.num_threads >= 1
