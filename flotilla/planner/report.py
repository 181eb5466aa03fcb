"""The plan table ``flotilla plan`` prints (plain text, fixed-width columns)."""

from __future__ import annotations

from flotilla.planner.search import Evaluated, PlanReport

GiB = 1 << 30
MAX_REJECTED_LINES = 12


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}" if seconds < 10 else f"{seconds * 1e3:.2g}"


def _lat(a: float, b: float) -> str:
    if max(a, b) >= 1:
        return f"{a:.2f}/{b:.2f} s"
    return f"{_ms(a)}/{_ms(b)} ms"


def _short(text: str, limit: int = 90) -> str:
    first = text.split(";")[0].split(": ")[0]
    return first if len(first) <= limit else first[:limit - 3] + "..."


def header(report: PlanReport) -> list[str]:
    m, hw = report.model, report.hardware
    quant = f" + int8 weights" if report.ranked and report.ranked[0].plan.quantization else ""
    cal = report.calibration
    calibration = (f"fitted on {cal.fitted_from} measured run(s)" if cal.fitted_from
                   else "priors (flotilla plan --probe N measures and refits)")
    return [f"model:       {m.name} ({m.architecture or 'decoder'}, {m.num_layers} layers, {m.num_heads} heads / "
            f"{m.num_kv_heads} KV heads, {m.num_params / 1e9:.2f}B parameters, {report.dtype}{quant})",
            f"hardware:    {hw.name} ({hw.num_devices} devices; {_short(hw.source)})",
            f"workload:    {report.workload.describe()}",
            f"SLO:         {report.slo.describe()}; goodput = requests/s within it",
            f"calibration: {calibration}"]


def row(i: int | str, e: Evaluated) -> str:
    m = e.metrics
    mem = f"{e.memory_per_device / GiB:.2f} GiB"
    kv = f"{e.kv_blocks}"
    if m is None:
        return f"{i!s:>3}  {e.label:<31} {kv:>7} {mem:>10}"
    return (f"{i!s:>3}  {e.label:<31} {kv:>7} {mem:>10} {m.output_throughput:>9.1f} {m.request_throughput:>7.2f} "
            f"{_lat(m.ttft_p50, m.ttft_p99):>15} {_lat(m.tpot_p50, m.tpot_p99):>15} {m.goodput:>8.2f}")


COLUMNS = (f"{'#':>3}  {'plan':<31} {'KV blk':>7} {'mem/dev':>10} {'tok/s':>9} {'req/s':>7} "
           f"{'TTFT p50/p99':>15} {'TPOT p50/p99':>15} {'goodput':>8}")


def format_report(report: PlanReport, top: int = 5) -> str:
    """The header, the top ``top`` plans (meeting the SLO), then the rejected candidates with their
    reasons (simulated SLO misses with their figures first)."""
    lines = header(report) + [""]
    if report.ranked:
        lines.append(f"plans meeting the SLO ({len(report.ranked)}), by goodput:")
        lines.append(COLUMNS)
        lines += [row(i + 1, e) for i, e in enumerate(report.ranked[:top])]
    else:
        lines.append("no plan meets the SLO; the closest are listed first below (relax --slo, or add hardware)")
    shown = report.rejected[:MAX_REJECTED_LINES]
    if shown:
        lines += ["", f"rejected ({len(report.rejected)}):"]
        for e in shown:
            if e.metrics is not None:
                lines.append(row("-", e))
                lines.append(f"{'':5}{'':31} why: {e.rejected}")
            else:
                lines.append(f"{'-':>3}  {e.label:<31} why: {e.rejected}")
        hidden = len(report.rejected) - len(shown)
        if hidden:
            reasons: dict[str, int] = {}
            for e in report.rejected[len(shown):]:
                kind = (e.rejected or "").split(":")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
            lines.append(f"    ... and {hidden} more: " + ", ".join(f"{n} {k}" for k, n in reasons.items()))
    best = report.best
    if best is not None:
        p = best.plan
        threads = f", num_threads {p.num_threads}" if p.num_threads else ""
        lines += ["", f"best: {best.label} ({p.num_devices} device(s)), KV {best.kv_blocks} blocks of {p.block_size} "
                      f"({p.kv_cache_bytes / GiB:.2f} GiB per rank), max_model_len {p.max_model_len}{threads}"]
    return "\n".join(lines)
