"""The planner's Python API: ``plan`` (search), ``get_hardware``, and ``resolve_deployment`` /
``load_deployment`` (a deployment file's ``parallel: auto`` entries filled in with the best plan)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from flotilla.planner.calibration import load_calibration
from flotilla.planner.cost import Calibration
from flotilla.planner.hardware import Hardware, load_hardware
from flotilla.planner.metrics import SLO, parse_slo
from flotilla.planner.model import ModelDesc, load_model_desc
from flotilla.planner.search import PlanReport, search
from flotilla.planner.workload import Workload, fit_to_context, parse_workload

logger = logging.getLogger(__name__)


def get_hardware(spec: str | Hardware, model: ModelDesc, dtype: str = "auto", quantization: str | None = None,
                 refresh: bool = False, log: Callable[[str], None] = logger.info) -> Hardware:
    """``spec`` as ``Hardware``: "local" (this machine, measured at ``model``'s shapes in the dtype it will
    run in; cached), a shipped system's name or a YAML file."""
    if isinstance(spec, Hardware):
        return spec
    if spec.strip().lower() != "local":
        return load_hardware(spec)
    from flotilla.engine.arg_utils import cpu_has_native_bf16
    from flotilla.planner.measure import local_hardware
    dtypes = [model.runtime_dtype("cpu", cpu_has_native_bf16(), dtype)]
    if quantization == "int8":
        dtypes.append("int8")
    return local_hardware(model, dtypes, refresh=refresh, log=log)


def plan(model: str | ModelDesc, hardware: str | Hardware = "local", workload: str | Workload | None = None,
         slo: str | SLO | None = None, calibration: Calibration | None = None, refresh_hardware: bool = False,
         log: Callable[[str], None] = logger.info, **search_args) -> PlanReport:
    """Rank the parallel plans of ``model`` on ``hardware`` for ``workload`` under ``slo`` (strings as the CLI
    takes them; None: the defaults). ``calibration``: default the stored one of this hardware, or its priors.
    ``search_args``: ``flotilla.planner.search.search``'s keywords (tp, pp, replicas, max_num_seqs, dtype,
    quantization, max_num_batched_tokens, max_simulations)."""
    wl = workload if isinstance(workload, Workload) else parse_workload(workload)
    target = slo if isinstance(slo, SLO) else parse_slo(slo)
    desc = model if isinstance(model, ModelDesc) else load_model_desc(model)
    hw = get_hardware(hardware, desc, search_args.get("dtype", "auto"), search_args.get("quantization"),
                      refresh_hardware, log)
    return search(desc, hw, wl, target, calibration or load_calibration(hw), **search_args)


def resolve_deployment(deployment, hardware: str | Hardware = "local", workload: str | Workload | None = None,
                       slo: str | SLO | None = None, log: Callable[[str], None] = logger.info):
    """``deployment`` (a ``DeploymentConfig``) with every ``parallel: auto`` model planned: its tensor and
    pipeline sizes and replicas are the best plan's, its engine settings the plan's (``max_num_seqs``,
    KV blocks, ``max_model_len``, ...) under the keys the file sets itself, which are kept and constrain
    the search (``max_num_seqs``, ``dtype``, ``quantization``, ``max_num_batched_tokens``). The default
    workload (chat) is shortened to fit a model whose context is shorter. ``DeploymentConfigError`` naming the
    model when nothing fits."""
    from flotilla.deploy.spec import DeploymentConfigError
    models = []
    for i, spec in enumerate(deployment.models):
        if not spec.parallel_auto:
            models.append(spec)
            continue
        engine = dict(spec.engine)
        args = {"dtype": engine.get("dtype", "auto"), "quantization": engine.get("quantization")}
        if "max_num_seqs" in engine:
            args["max_num_seqs"] = [engine["max_num_seqs"]]
        if engine.get("max_num_batched_tokens"):
            args["max_num_batched_tokens"] = engine["max_num_batched_tokens"]
        try:
            desc = load_model_desc(spec.model)
            wl = workload if isinstance(workload, Workload) else parse_workload(workload)
            if workload is None:  # the default chat workload, shortened for a model with a short context
                wl = fit_to_context(wl, min(desc.max_position_embeddings, engine.get("max_model_len") or 1 << 30))
            report = plan(desc, hardware, wl, slo, log=log, **args)
        except (ValueError, OSError) as e:
            raise DeploymentConfigError(deployment.source, f"models[{i}].parallel", f"auto: {e}") from None
        best = report.best
        if best is None:
            reasons = "; ".join(sorted({(e.rejected or "").split(":")[0] for e in report.rejected}))
            raise DeploymentConfigError(deployment.source, f"models[{i}].parallel",
                                        f"auto: no plan fits {spec.model} on {report.hardware.name} ({reasons})")
        from flotilla.planner.emit import engine_settings
        planned = engine_settings(best.plan, report.hardware.device_kind, best.kv_blocks, desc.source_kind)
        if "kv_cache_memory" in engine:
            planned.pop("num_kv_blocks")
        log(f"{spec.name}: parallel: auto -> {best.label} (predicted {best.metrics.output_throughput:.0f} tok/s, "
            f"{best.metrics.goodput:.2f} req/s goodput)")
        models.append(dataclasses.replace(spec, tensor_parallel_size=best.plan.tp,
                                          pipeline_parallel_size=best.plan.pp, replicas=best.plan.replicas,
                                          engine={**planned, **engine}, parallel_auto=False))
    return dataclasses.replace(deployment, models=tuple(models))


def load_deployment(path: str, **resolve_args):
    """``flotilla.deploy.config.load_deployment_config(path)`` with ``parallel: auto`` resolved
    (``resolve_deployment``'s keywords)."""
    from flotilla.deploy.config import load_deployment_config
    return resolve_deployment(load_deployment_config(path), **resolve_args)
