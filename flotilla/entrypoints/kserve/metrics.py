"""Triton's per-model metrics on ``/metrics``, computed at scrape time from the models' statistics.

Names, help texts and labels (``model``, ``version``) are Triton's, so Triton dashboards work unchanged:
``nv_inference_request_success`` / ``_failure``, ``nv_inference_count``, ``nv_inference_exec_count`` (counters)
and the cumulative durations ``nv_inference_request_duration_us``, ``nv_inference_queue_duration_us``,
``nv_inference_compute_input_duration_us``, ``nv_inference_compute_infer_duration_us``,
``nv_inference_compute_output_duration_us``; the gauge ``nv_inference_pending_request_count`` (requests
accepted and not yet executing: a repository model's dynamic-batcher queue, an LLM's or embedding model's
admitted requests without output yet; ``ServedModel.pending_request_count()``, 0 for a model without one, such
as an ensemble, whose steps' models count theirs); plus ``<prefix>:inference_batch_size``, a histogram of the
executed batch sizes, under each of the server's metric prefixes (``--metrics-prefixes``: ``flotilla``,
``vllm``), as every flotilla metric. Each scrape reads ``ServedModel.statistics()`` of every ready model version, so the
values are those of ``GET /v2/models/stats``.
"""

from __future__ import annotations

import logging

from flotilla.entrypoints.kserve.messages import model_statistics
from flotilla.repository.service import InferenceService

logger = logging.getLogger(__name__)

# (metric, help, statistics path) in Triton's order; durations are exported in microseconds.
COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     ("inference_stats", "success", "count")),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
     ("inference_stats", "fail", "count")),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)",
     ("inference_count",)),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)",
     ("execution_count",)),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds (includes "
     "cached requests)", ("inference_stats", "success", "ns")),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds (includes cached "
     "requests)", ("inference_stats", "queue", "ns")),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds (does not "
     "include cached requests)", ("inference_stats", "compute_input", "ns")),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds (does not "
     "include cached requests)", ("inference_stats", "compute_infer", "ns")),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration in microseconds "
     "(does not include cached requests)", ("inference_stats", "compute_output", "ns")),
)
PENDING = ("nv_inference_pending_request_count",
           "Instantaneous number of pending requests awaiting execution per-model.")
BATCH_SIZE = "inference_batch_size"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _value(stats: dict, path: tuple[str, ...]) -> float:
    value = stats
    for key in path:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    number = float(value) if isinstance(value, (int, float, str)) and value != "" else 0.0
    return number / 1000.0 if path[-1] == "ns" else number


def _labels(stats: dict) -> str:
    name = str(stats.get("name", "")).replace("\\", r"\\").replace('"', r"\"")
    version = str(stats.get("version", "")).replace("\\", r"\\").replace('"', r"\"")
    return f'model="{name}",version="{version}"'


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class TritonMetrics:
    """Renders the metrics of every ready model version of ``service`` (see the module contract)."""

    def __init__(self, service: InferenceService, prefixes: tuple[str, ...] = ("flotilla",)):
        self.service, self.prefixes = service, tuple(prefixes)

    def render(self) -> str:
        try:
            stats = model_statistics(self.service)
        except Exception:  # noqa: BLE001 - a scrape must not fail because a model is changing
            logger.exception("cannot read model statistics for /metrics")
            return ""
        lines = []
        for name, doc, path in COUNTERS:
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter"]
            lines += [f"{name}{{{_labels(s)}}} {_number(_value(s, path))}" for s in stats]
        name, doc = PENDING
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} gauge"]
        lines += [f"{name}{{{_labels(s)}}} {self._pending(s)}" for s in stats]
        for prefix in self.prefixes:
            name = f"{prefix}:{BATCH_SIZE}"
            lines += [f"# HELP {name} Batch sizes of the model executions (dynamic batcher).",
                      f"# TYPE {name} histogram"]
            for s in stats:
                lines += _batch_histogram(name, s)
        return "\n".join(lines) + "\n"


    def _pending(self, stats: dict) -> int:
        try:
            model = self.service.model(str(stats.get("name", "")), str(stats.get("version", "")) or None)
            count = getattr(model, "pending_request_count", None)
            return int(count()) if count is not None else 0
        except Exception:  # noqa: BLE001 - unloaded since the statistics were read
            return 0


def _batch_histogram(metric: str, stats: dict) -> list[str]:
    counts: dict[int, int] = {}
    for entry in stats.get("batch_stats", ()) or ():
        size = int(entry.get("batch_size", 0))
        count = int((entry.get("compute_infer") or {}).get("count", 0))
        counts[size] = counts.get(size, 0) + count
    labels = _labels(stats)
    lines = []
    for bound in BATCH_BUCKETS:
        total_le = sum(c for size, c in counts.items() if size <= bound)
        lines.append(f'{metric}_bucket{{{labels},le="{float(bound)}"}} {total_le}')
    total = sum(counts.values())
    lines.append(f'{metric}_bucket{{{labels},le="+Inf"}} {total}')
    lines.append(f"{metric}_count{{{labels}}} {total}")
    lines.append(f"{metric}_sum{{{labels}}} {sum(size * c for size, c in counts.items())}")
    return lines
