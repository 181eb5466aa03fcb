"""Prometheus metrics with vLLM's names (prefix ``flotilla:``) on a registry owned by one app.

Contract: one registry per app, whatever the number of models; every sample is labelled ``model_name``.
Engine-side values (running/waiting requests, KV usage, preemptions, prefix-cache queries/hits)
are read from ``engine.latest_stats`` at scrape time by a custom collector (the engine's counters are
cumulative, so the collector reports their current value); request-side counters and histograms are updated
by ``RequestMetrics`` as outputs arrive. Times come from ``time.monotonic()`` (the engine's clock too).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from flotilla.outputs import RequestOutput

PREFIX = "flotilla:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class EngineStatsCollector:
    """Reports every registered engine's latest scheduler snapshot at each scrape (one sample per model)."""

    def __init__(self) -> None:
        self.engines: dict[str, object] = {}  # model name -> engine (EngineClient)

    def collect(self):
        snapshots = [(name, engine.latest_stats) for name, engine in self.engines.items()]
        for name, doc, attr in (
                ("num_requests_running", "Number of requests in model execution batches.", "num_running"),
                ("num_requests_waiting", "Number of requests waiting to be processed.", "num_waiting"),
                ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage")):
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            for model, stats in snapshots:
                gauge.add_metric([model], getattr(stats, attr))
            yield gauge
        for name, doc, attr in (
                ("num_preemptions", "Cumulative number of preemptions.", "num_preemptions"),
                ("prefix_cache_queries", "Prefix cache queries, in tokens.", "prefix_cache_queries"),
                ("prefix_cache_hits", "Prefix cache hits, in tokens.", "prefix_cache_hits")):
            counter = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            for model, stats in snapshots:
                counter.add_metric([model], getattr(stats, attr))
            yield counter


class ServerMetrics:
    """All metrics of one app, on its own registry (so tests can build several apps); every sample carries
    a ``model_name`` label. ``add_model`` registers a served model and returns its ``ModelMetrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg, lbl = self.registry, ["model_name"]
        self.engine_stats = EngineStatsCollector()
        reg.register(self.engine_stats)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Number of prefill tokens processed.", lbl,
                                     registry=reg)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Number of generation tokens processed.",
                                         lbl, registry=reg)
        self.request_success = Counter(PREFIX + "request_success", "Count of finished requests by reason.",
                                       ["model_name", "finished_reason"], registry=reg)
        self.ttft = self._histogram("time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = self._histogram("inter_token_latency_seconds", "Inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = self._histogram("e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                                   REQUEST_BUCKETS)
        self.queue_time = self._histogram("request_queue_time_seconds", "Time spent waiting in the queue.",
                                          REQUEST_BUCKETS)

    def _histogram(self, name: str, doc: str, buckets):
        return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets, registry=self.registry)

    def add_model(self, model_name: str, engine) -> "ModelMetrics":
        """Start reporting ``engine``'s stats and return the request metrics labelled ``model_name``."""
        if model_name in self.engine_stats.engines:
            raise ValueError(f"model {model_name!r} is already registered")
        self.engine_stats.engines[model_name] = engine
        return ModelMetrics(self, model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """The request-side metrics of one model (the ``model_name``-labelled children of ``ServerMetrics``)."""

    def __init__(self, server: ServerMetrics, model_name: str):
        self.model_name = model_name
        self._success = server.request_success
        self.prompt_tokens = server.prompt_tokens.labels(model_name)
        self.generation_tokens = server.generation_tokens.labels(model_name)
        self.ttft = server.ttft.labels(model_name)
        self.itl = server.itl.labels(model_name)
        self.e2e = server.e2e.labels(model_name)
        self.queue_time = server.queue_time.labels(model_name)

    def count_finished(self, reason: str | None) -> None:
        self._success.labels(self.model_name, reason or "abort").inc()


class RequestMetrics:
    """Metrics of one engine request: feed it every (delta) output, then ``finish`` once."""

    def __init__(self, metrics: ModelMetrics, num_prompt_tokens: int):
        self.metrics = metrics
        self.num_prompt_tokens = num_prompt_tokens
        self.last_output_time: float | None = None
        self.arrival_time: float | None = None
        self.finish_reason: str | None = None
        self.finished = False

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        m, info = self.metrics, out.metrics or {}
        if self.last_output_time is None:
            m.prompt_tokens.inc(self.num_prompt_tokens)
            self.arrival_time = info.get("arrival_time")
            first_token, scheduled = info.get("first_token_time"), info.get("first_scheduled_time")
            if self.arrival_time is not None:
                m.ttft.observe(max((first_token or now) - self.arrival_time, 0.0))
                if scheduled is not None:
                    m.queue_time.observe(max(scheduled - self.arrival_time, 0.0))
        else:
            m.itl.observe(now - self.last_output_time)
        self.last_output_time = now
        m.generation_tokens.inc(sum(len(c.token_ids) for c in out.outputs))
        for c in out.outputs:
            if c.finish_reason is not None and self.finish_reason in (None, "abort"):
                self.finish_reason = c.finish_reason

    def finish(self, completed: bool) -> None:
        """Record the end of the request (``completed`` False: aborted or failed before its end)."""
        if self.finished:
            return
        self.finished = True
        if self.arrival_time is not None:
            self.metrics.e2e.observe(max(time.monotonic() - self.arrival_time, 0.0))
        self.metrics.count_finished(self.finish_reason if completed else "abort")
