"""Serving-benchmark metrics with vLLM's definitions (``vllm bench serve``), computed from timestamps.

TTFT: send -> first chunk with choices. ITL: gaps between successive such chunks, pooled over requests.
E2EL: send -> last token chunk. TPOT per request: (E2EL - TTFT) / (output_tokens - 1), only when
output_tokens > 1. Percentiles use numpy's linear interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestResult:
    """One request's raw measurements (seconds, relative to its own send time)."""

    success: bool
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2EL
    error: str = ""


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    duration: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    stats_ms: dict[str, dict[str, float]]  # metric -> {"mean", "median", "std", "p99"}


def _summary(values: list[float], percentiles: tuple[float, ...] = (99,)) -> dict[str, float]:
    arr = np.asarray(values if values else [0.0], dtype=np.float64) * 1000.0  # ms
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(arr, p))
    return out


def calculate_metrics(results: list[RequestResult], duration: float,
                      percentiles: tuple[float, ...] = (99,)) -> BenchmarkMetrics:
    """Aggregate per-request results over a run of ``duration`` seconds (first dispatch -> last done)."""
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.latency for r in ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    duration = max(duration, 1e-9)
    stats = {"ttft": _summary(ttfts, percentiles), "tpot": _summary(tpots, percentiles),
             "itl": _summary(itls, percentiles), "e2el": _summary(e2els, percentiles)}
    return BenchmarkMetrics(len(ok), len(results) - len(ok), total_in, total_out, duration, len(ok) / duration,
                            total_out / duration, (total_in + total_out) / duration, stats)


def metrics_to_json(m: BenchmarkMetrics, results: list[RequestResult]) -> dict:
    """vLLM's JSON keys (plus per-request lists)."""
    out = {"duration": m.duration, "completed": m.completed, "failed": m.failed,
           "total_input_tokens": m.total_input, "total_output_tokens": m.total_output,
           "request_throughput": m.request_throughput, "output_throughput": m.output_throughput,
           "total_token_throughput": m.total_token_throughput}
    for metric in PERCENTILE_METRICS:
        for stat, value in m.stats_ms[metric].items():
            out[f"{stat}_{metric}_ms"] = value
    out["input_lens"] = [r.prompt_len for r in results]
    out["output_lens"] = [r.output_tokens for r in results]
    out["ttfts"] = [r.ttft for r in results]
    out["itls"] = [r.itl for r in results]
    out["errors"] = [r.error for r in results]
    return out


_TITLES = {"ttft": ("Time to First Token", "TTFT"), "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
           "itl": ("Inter-token Latency", "ITL"), "e2el": ("End-to-end Latency", "E2EL")}


def format_result_block(m: BenchmarkMetrics, max_concurrency: int | None, request_rate: float) -> str:
    """The ``Serving Benchmark Result`` block as vLLM prints it."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    rows = [("Successful requests:", m.completed), ("Failed requests:", m.failed)]
    if max_concurrency is not None:
        rows.append(("Maximum request concurrency:", max_concurrency))
    rows += [("Request rate configured (RPS):", f"{request_rate:.2f}"),
             ("Benchmark duration (s):", f"{m.duration:.2f}"), ("Total input tokens:", m.total_input),
             ("Total generated tokens:", m.total_output),
             ("Request throughput (req/s):", f"{m.request_throughput:.2f}"),
             ("Output token throughput (tok/s):", f"{m.output_throughput:.2f}"),
             ("Total Token throughput (tok/s):", f"{m.total_token_throughput:.2f}")]
    lines += [f"{k:<40}{v:<10}" for k, v in rows]
    for metric in PERCENTILE_METRICS:
        title, short = _TITLES[metric]
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for stat, value in m.stats_ms[metric].items():
            label = {"mean": "Mean", "median": "Median", "std": "Std"}.get(stat, stat.upper())
            if stat == "std":
                continue
            lines.append(f"{f'{label} {short} (ms):':<40}{value:<10.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)
