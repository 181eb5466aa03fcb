"""A plan as a deployment file (``flotilla serve --config``): one model entry with the plan's parallel sizes,
replicas and engine settings."""

from __future__ import annotations

import re

from flotilla.planner.cost import Plan
from flotilla.planner.search import Evaluated, PlanReport

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


def engine_settings(plan: Plan, device_kind: str, kv_blocks: int, source_kind: str | None = None) -> dict:
    """The ``engine:`` overrides (EngineArgs fields) of ``plan``. A GGUF model planned with float weights gets
    ``quantization: none``: the cost model prices float matmuls, and the CPU default for a GGUF file would
    keep its blocks quantized (a different kernel mix than the plan predicts)."""
    engine = {"dtype": plan.dtype, "max_model_len": plan.max_model_len, "max_num_seqs": plan.max_num_seqs,
              "max_num_batched_tokens": plan.max_num_batched_tokens, "block_size": plan.block_size,
              "num_kv_blocks": kv_blocks}
    if plan.quantization:
        engine["quantization"] = plan.quantization
    elif source_kind == "gguf" and device_kind != "gpu":
        engine["quantization"] = "none"
    if plan.num_threads:
        engine["num_threads"] = plan.num_threads
    if device_kind == "gpu":
        engine["device"] = "cuda"
    return engine


def deployment_document(report: PlanReport, chosen: Evaluated | None = None, name: str | None = None) -> dict:
    """The deployment document of ``chosen`` (default: the report's best plan). ValueError when no plan fits."""
    chosen = chosen or report.best
    if chosen is None or chosen.plan is None:
        raise ValueError("no plan fits this model on this hardware: nothing to write")
    plan, model = chosen.plan, report.model
    name = name or (model.name if NAME_RE.match(model.name) else "model")
    return {"models": [{"name": name, "model": model.model,
                        "parallel": {"tensor": plan.tp, "pipeline": plan.pp}, "replicas": plan.replicas,
                        "engine": engine_settings(plan, report.hardware.device_kind, chosen.kv_blocks,
                                                  model.source_kind)}]}


def deployment_yaml(report: PlanReport, chosen: Evaluated | None = None, name: str | None = None) -> str:
    """``deployment_document`` as YAML, with the prediction as a comment."""
    import yaml
    chosen = chosen or report.best
    doc = deployment_document(report, chosen, name)
    lines = [f"# flotilla plan: {report.model.name} on {report.hardware.name}",
             f"# workload: {report.workload.describe()}; SLO: {report.slo.describe()}"]
    m = chosen.metrics
    if m is not None:
        lines.append(f"# predicted: {m.output_throughput:.1f} output tok/s, {m.goodput:.2f} req/s goodput, TTFT p99 "
                     f"{m.ttft_p99:.3f} s, TPOT p99 {m.tpot_p99 * 1e3:.1f} ms ({chosen.rejected or 'meets the SLO'})")
    if report.model.source_kind == "config":
        lines.append(f"# planned from a config only: point `model` at a directory holding {report.model.model}'s "
                     f"weights before serving")
    return "\n".join(lines) + "\n" + yaml.safe_dump(doc, sort_keys=False)
