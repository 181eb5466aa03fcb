"""Calibration: the cost model's runtime overheads and scales, stored per machine and refit from measured runs.

``load_calibration(hardware)`` returns the stored values for ``hardware.key`` (in
``FLOTILLA_CACHE_DIR/planner/calibration-<key>.json``) or the hardware's priors. ``refit`` adjusts them so the
simulator reproduces measured runs: Gauss-Newton on the log of each parameter, the residuals being the log
ratios of predicted to measured output throughput and median TPOT of every run, with a ridge pull towards
the starting values (weight ``RIDGE``) so a few runs cannot push a parameter anywhere. Each prediction is a
full simulation of the run's workload, so the fit accounts for queueing and batching as they happened.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from flotilla import envs
from flotilla.planner.cost import Calibration
from flotilla.planner.hardware import Hardware
from flotilla.planner.metrics import PlanMetrics

RIDGE = 0.15
BASE_PARAMS = ("step", "per_seq", "kernel_scale")


@dataclass(frozen=True)
class Measured:
    """One measured run to fit: the predictor's input ``key`` (opaque to this module) and the ``metrics``
    measured; ``parallel``: whether it ran with TP or PP > 1 (then ``comm_scale`` is fitted too);
    ``contended``: whether its ranks' threads wanted more cores than the serving processes left them (then
    ``host_cores`` is fitted too)."""

    key: object
    metrics: PlanMetrics
    parallel: bool = False
    contended: bool = False


def calibration_path(hardware: Hardware) -> str:
    return os.path.join(envs.cache_dir(), "planner", f"calibration-{hardware.key}.json")


def load_calibration(hardware: Hardware) -> Calibration:
    """The stored calibration of ``hardware`` (by its key), else its priors."""
    try:
        with open(calibration_path(hardware), encoding="utf-8") as f:
            data = json.load(f)
        return Calibration.prior(hardware).with_values(
            **{k: data[k] for k in Calibration.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError):
        return Calibration.prior(hardware)


def save_calibration(hardware: Hardware, calibration: Calibration) -> str:
    """Store ``calibration`` for ``hardware``; returns the file."""
    path = calibration_path(hardware)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(calibration), f, indent=1)
    os.replace(tmp, path)
    return path


def refit(runs: list[Measured], start: Calibration,
          predict: Callable[[Calibration, object], PlanMetrics], iterations: int = 4) -> Calibration:
    """Fit ``start``'s parameters to ``runs`` (see the module docstring); ``predict(calibration, key)`` is the
    simulated ``PlanMetrics`` of a run. Returns the fitted calibration (``fitted_from`` counts every run it
    has been fitted on)."""
    import numpy as np
    if not runs:
        return start
    names = list(BASE_PARAMS) + (["comm_scale"] if any(r.parallel for r in runs) else []) \
        + (["host_cores"] if any(r.contended for r in runs) and start.host_cores > 0 else [])
    theta0 = np.array([math.log(max(getattr(start, n), 1e-9)) for n in names])
    theta = theta0.copy()

    def residuals(th) -> np.ndarray:
        calib = start.with_values(**{n: float(math.exp(v)) for n, v in zip(names, th)})
        out = []
        for run in runs:
            pred = predict(calib, run.key)
            out.append(math.log(max(pred.output_throughput, 1e-12) / max(run.metrics.output_throughput, 1e-12)))
            out.append(math.log(max(pred.tpot_p50, 1e-12) / max(run.metrics.tpot_p50, 1e-12)))
        return np.concatenate([np.array(out), RIDGE * (th - theta0)])

    step = 0.05
    r = residuals(theta)
    for _ in range(iterations):
        jac = np.stack([(residuals(theta + step * e) - r) / step for e in np.eye(len(names))], axis=1)
        delta, *_ = np.linalg.lstsq(jac, -r, rcond=None)
        delta = np.clip(delta, -1.5, 1.5)  # at most a factor e^1.5 per iteration
        for shrink in (1.0, 0.5, 0.25):  # backtrack until the error falls
            trial = residuals(theta + shrink * delta)
            if float(np.sum(trial ** 2)) < float(np.sum(r ** 2)):
                theta, r = theta + shrink * delta, trial
                break
        else:
            break
    fitted = {n: float(math.exp(v)) for n, v in zip(names, theta)}
    return start.with_values(**fitted, fitted_from=start.fitted_from + len(runs))
