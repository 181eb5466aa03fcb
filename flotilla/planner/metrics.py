"""Latency SLOs and the metrics a plan is ranked by, computed the same way for simulated and measured runs.

Definitions are vLLM's (``vllm bench serve``, ``flotilla.bench.metrics``): TTFT is send -> first token;
TPOT of a request is ``(E2EL - TTFT) / (output_tokens - 1)``; percentiles interpolate linearly. A plan
meets the SLO when its p50 / p99 TTFT and TPOT are within the targets. Goodput is the request rate served
within the SLO (DistServe's sense): a plan that meets the SLO serves all of its requests within it, so its
goodput is its request throughput; for one that misses it, only the requests whose own TTFT and TPOT are
within the targets count (vLLM's ``--goodput``; the p99 targets, or the p50 ones when only those are given).
``attainment`` is the fraction of requests within those per-request targets.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from flotilla.bench.metrics import RequestResult

SLO_KEYS = ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")
DEFAULT_SLO = "ttft_p99=2s,tpot_p99=100ms"


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds (None: no target)."""

    ttft_p50: float | None = None
    ttft_p99: float | None = None
    tpot_p50: float | None = None
    tpot_p99: float | None = None

    @property
    def ttft_limit(self) -> float:
        return _first(self.ttft_p99, self.ttft_p50)

    @property
    def tpot_limit(self) -> float:
        return _first(self.tpot_p99, self.tpot_p50)

    def describe(self) -> str:
        parts = [f"{k} {_fmt_s(getattr(self, k))}" for k in SLO_KEYS if getattr(self, k) is not None]
        return ", ".join(parts) or "none"

    def violations(self, m: PlanMetrics) -> list[str]:
        """What ``m`` misses, e.g. ``["TPOT p99 0.21 s > 0.1 s"]`` (empty when the SLO is met)."""
        out = []
        for key in SLO_KEYS:
            target = getattr(self, key)
            value = getattr(m, key)
            if target is not None and value > target:
                metric, q = key.split("_")
                out.append(f"{metric.upper()} {q} {_fmt_s(value)} > {_fmt_s(target)}")
        return out


def _first(*values) -> float:
    return next((v for v in values if v is not None), math.inf)


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def parse_slo(text: str | None) -> SLO:
    """``ttft_p99=2s,tpot_p99=100ms`` (units s or ms; a bare number is seconds; ``none``: no targets).
    None or "" gives the default ``DEFAULT_SLO``. ValueError naming the bad part."""
    if text is None or not text.strip():
        text = DEFAULT_SLO
    if text.strip().lower() == "none":
        return SLO()
    values = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "=" not in part:
            raise ValueError(f"SLO part {part!r}: expected key=value with a key in {', '.join(SLO_KEYS)}")
        key, raw = (s.strip() for s in part.split("=", 1))
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO key {key!r} (keys: {', '.join(SLO_KEYS)})")
        values[key] = _seconds(key, raw)
    return SLO(**values)


def _seconds(key: str, raw: str) -> float:
    scale, number = 1.0, raw.lower()
    if number.endswith("ms"):
        scale, number = 1e-3, number[:-2]
    elif number.endswith("s"):
        number = number[:-1]
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"SLO {key}: expected seconds (e.g. 2s, 150ms, 0.5), got {raw!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"SLO {key}: must be a finite time > 0, got {raw!r}")
    return value


@dataclass(frozen=True)
class PlanMetrics:
    """One run's (simulated or measured) figures: ``output_throughput`` (tokens/s), ``request_throughput``
    (requests/s), latency percentiles (seconds), ``goodput`` (requests/s served within the SLO, see the
    module docstring), ``attainment`` (the fraction of requests within the per-request targets),
    ``completed`` / ``failed`` request counts."""

    output_throughput: float
    request_throughput: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    goodput: float
    attainment: float
    completed: int
    failed: int = 0

    def scaled(self, replicas: int) -> PlanMetrics:
        """The deployment's figures from one replica's: rates times ``replicas``, latencies as they are."""
        return PlanMetrics(self.output_throughput * replicas, self.request_throughput * replicas, self.ttft_p50,
                           self.ttft_p99, self.tpot_p50, self.tpot_p99, self.goodput * replicas, self.attainment,
                           self.completed * replicas, self.failed * replicas)


def plan_metrics(results: list[RequestResult], duration: float, slo: SLO) -> PlanMetrics:
    """``PlanMetrics`` of per-request results over ``duration`` seconds."""
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [tpot(r) for r in ok if r.output_tokens > 1]
    good = sum(1 for r in ok if r.ttft <= slo.ttft_limit and (r.output_tokens <= 1 or tpot(r) <= slo.tpot_limit))
    duration = max(duration, 1e-9)
    m = PlanMetrics(
        output_throughput=sum(r.output_tokens for r in ok) / duration, request_throughput=len(ok) / duration,
        ttft_p50=percentile(ttfts, 50), ttft_p99=percentile(ttfts, 99), tpot_p50=percentile(tpots, 50),
        tpot_p99=percentile(tpots, 99), goodput=good / duration, attainment=good / max(1, len(results)),
        completed=len(ok), failed=len(results) - len(ok))
    if not slo.violations(m) and not m.failed:
        m = dataclasses.replace(m, goodput=m.request_throughput)
    return m


def tpot(r: RequestResult) -> float:
    return (r.latency - r.ttft) / (r.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """numpy's linear-interpolation percentile; 0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
