"""Prometheus metrics with vLLM's names, exported under the ``flotilla:`` and ``vllm:`` prefixes.

Contract: one registry per app, whatever the number of models; every sample is labelled ``model_name``.
Every metric is kept once (unprefixed, on a private registry) and exported under each prefix of
``ServerConfig.metrics_prefixes`` (``flotilla serve --metrics-prefixes``; default both), so the ``flotilla:``
and ``vllm:`` series of one metric always carry the same values; ``vllm:`` also gets vLLM's deprecated
``gpu_cache_usage_perc`` (= ``kv_cache_usage_perc``). Engine-side values (running/waiting requests, KV usage,
preemptions, prefix-cache queries/hits, the tokens-per-step histogram ``iteration_tokens_total``, and
``cache_config_info``) are read from the engine at scrape time by a custom collector (its counters are
cumulative, so the collector reports their current value; with ``--speculative-config`` also vLLM's
``spec_decode_num_drafts``, ``spec_decode_num_draft_tokens``, ``spec_decode_num_accepted_tokens`` and
``spec_decode_num_accepted_tokens_per_pos`` by ``position``); request-side counters and histograms are updated
by ``RequestMetrics`` as outputs arrive, per engine request (one prompt, all its ``n`` samples). Times come
from ``time.monotonic()`` (the engine's clock too): queue = first scheduled - arrival, prefill = first token -
first scheduled, decode = last token - first token, inference = last token - first scheduled;
``time_per_output_token_seconds`` observes the same intervals as ``inter_token_latency_seconds`` (vLLM's
buckets for each).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample

from flotilla.entrypoints.openai.cli_args import METRICS_PREFIXES, check_prefixes
from flotilla.outputs import RequestOutput
from flotilla.scheduler.scheduler import ITERATION_TOKENS_BUCKETS

VLLM_ONLY_ALIASES = {"kv_cache_usage_perc": "gpu_cache_usage_perc"}  # vLLM's deprecated name, same value
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to ``max_value``."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class PrefixedCollector:
    """Re-exports every family of ``source`` once per prefix (``prefix:name``), same samples."""

    def __init__(self, source: CollectorRegistry, prefixes: tuple[str, ...]):
        self.source, self.prefixes = source, prefixes

    def collect(self):
        for family in self.source.collect():
            for prefix in self.prefixes:
                yield _renamed(family, f"{prefix}:", family.name)
                alias = VLLM_ONLY_ALIASES.get(family.name)
                if prefix == "vllm" and alias:
                    yield _renamed(family, "vllm:", alias)


def _renamed(family: Metric, prefix: str, name: str) -> Metric:
    out = Metric(prefix + name, family.documentation, family.type, family.unit)
    out.samples = [Sample(prefix + name + s.name[len(family.name):], s.labels, s.value, s.timestamp, s.exemplar)
                   for s in family.samples]
    return out


class EngineStatsCollector:
    """Reports every registered engine's latest scheduler snapshot and cache configuration at each scrape
    (one sample per model)."""

    def __init__(self) -> None:
        self.engines: dict[str, object] = {}  # model name -> engine (EngineClient)

    def collect(self):
        snapshots = [(name, engine.latest_stats) for name, engine in self.engines.items()]
        for name, doc, attr in (
                ("num_requests_running", "Number of requests in model execution batches.", "num_running"),
                ("num_requests_waiting", "Number of requests waiting to be processed.", "num_waiting"),
                ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage")):
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            for model, stats in snapshots:
                gauge.add_metric([model], getattr(stats, attr))
            yield gauge
        for name, doc, attr in (
                ("num_preemptions", "Cumulative number of preemptions.", "num_preemptions"),
                ("prefix_cache_queries", "Prefix cache queries, in tokens.", "prefix_cache_queries"),
                ("prefix_cache_hits", "Prefix cache hits, in tokens.", "prefix_cache_hits")):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            for model, stats in snapshots:
                counter.add_metric([model], getattr(stats, attr))
            yield counter
        yield _iteration_tokens(snapshots)
        yield from self._spec_decode(snapshots)
        yield self._cache_config_info()

    def _spec_decode(self, snapshots):
        """vLLM's speculative-decoding counters, for the models that speculate (``--speculative-config``)."""
        spec = [(model, stats) for model, stats in snapshots
                if getattr(getattr(getattr(self.engines[model], "config", None), "speculative", None), "enabled",
                           False)]
        if not spec:
            return
        for name, doc, attr in (
                ("spec_decode_num_drafts", "Number of spec decoding drafts.", "spec_num_drafts"),
                ("spec_decode_num_draft_tokens", "Number of draft tokens.", "spec_num_draft_tokens"),
                ("spec_decode_num_accepted_tokens", "Number of accepted tokens.", "spec_num_accepted_tokens")):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            for model, stats in spec:
                counter.add_metric([model], getattr(stats, attr, 0))
            yield counter
        per_pos = CounterMetricFamily("spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft "
                                      "position.", labels=["model_name", "position"])
        for model, stats in spec:
            for pos, count in enumerate(getattr(stats, "spec_accepted_per_pos", ())):
                per_pos.add_metric([model, str(pos)], count)
        yield per_pos

    def _cache_config_info(self) -> GaugeMetricFamily:
        info = GaugeMetricFamily("cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching",
                                         "kv_cache_memory_gib"])
        for model, engine in self.engines.items():
            config = getattr(engine, "config", None)
            cache = getattr(config, "cache", None)
            if getattr(getattr(config, "model", None), "runner", "generate") == "pooling":
                continue  # an embedding model has no KV cache
            if cache is not None:
                info.add_metric([model, str(cache.block_size), str(engine.num_blocks),
                                 str(cache.enable_prefix_caching), str(cache.kv_cache_memory)], 1.0)
        return info


def _iteration_tokens(snapshots) -> HistogramMetricFamily:
    """vLLM's ``iteration_tokens_total``: tokens scheduled per engine step (from the engine's cumulative
    per-bucket step counts)."""
    family = HistogramMetricFamily("iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                   labels=["model_name"])
    bounds = [str(float(b)) for b in ITERATION_TOKENS_BUCKETS] + ["+Inf"]
    for model, stats in snapshots:
        counts = stats.iteration_tokens or (0,) * len(bounds)
        cumulative, running = [], 0
        for bound, count in zip(bounds, counts):
            running += count
            cumulative.append((bound, running))
        family.add_metric([model], cumulative, float(stats.iteration_tokens_sum))
    return family


class ServerMetrics:
    """All metrics of one app, on its own registry (so tests can build several apps); every sample carries
    a ``model_name`` label. ``prefixes``: the exported prefixes (see the module contract);
    ``max_model_len``: the largest context of the served models (the top of the token-count buckets).
    ``add_model`` registers a served model and returns its ``ModelMetrics``."""

    def __init__(self, prefixes=METRICS_PREFIXES, max_model_len: int = 8192) -> None:
        self.registry = CollectorRegistry()
        self.text_sources: list = []   # callables returning exposition text appended by render()
        self._source = CollectorRegistry(auto_describe=False)
        self.registry.register(PrefixedCollector(self._source, check_prefixes(prefixes)))
        reg, lbl = self._source, ["model_name"]
        self.engine_stats = EngineStatsCollector()
        reg.register(self.engine_stats)
        self.prompt_tokens = Counter("prompt_tokens", "Number of prefill tokens processed.", lbl, registry=reg)
        self.generation_tokens = Counter("generation_tokens", "Number of generation tokens processed.", lbl,
                                         registry=reg)
        self.request_success = Counter("request_success", "Count of finished requests by reason.",
                                       ["model_name", "finished_reason"], registry=reg)
        h, tokens = self._histogram, buckets_1_2_5(max_model_len)
        self.ttft = h("time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = h("inter_token_latency_seconds", "Inter-token latency in seconds.", ITL_BUCKETS)
        self.tpot = h("time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                      TPOT_BUCKETS)
        self.e2e = h("e2e_request_latency_seconds", "End-to-end request latency in seconds.", REQUEST_BUCKETS)
        self.queue_time = h("request_queue_time_seconds", "Time spent waiting in the queue.", REQUEST_BUCKETS)
        self.prefill_time = h("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for "
                                                              "request.", REQUEST_BUCKETS)
        self.decode_time = h("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
                             REQUEST_BUCKETS)
        self.inference_time = h("request_inference_time_seconds", "Histogram of time spent in RUNNING phase for "
                                                                  "request.", REQUEST_BUCKETS)
        self.request_prompt_tokens = h("request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self.request_generation_tokens = h("request_generation_tokens", "Number of generation tokens processed.",
                                           tokens)
        self.params_n = h("request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        self.params_max_tokens = h("request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                                   tokens)

    def _histogram(self, name: str, doc: str, buckets):
        return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self._source)

    def add_model(self, model_name: str, engine) -> "ModelMetrics":
        """Start reporting ``engine``'s stats and return the request metrics labelled ``model_name``."""
        if model_name in self.engine_stats.engines:
            raise ValueError(f"model {model_name!r} is already registered")
        self.engine_stats.engines[model_name] = engine
        return ModelMetrics(self, model_name)

    def render(self) -> bytes:
        """The exposition text: the registry, then every ``text_sources`` block (e.g. Triton's ``nv_*``
        metrics, whose counter names have no ``_total`` suffix, which prometheus_client would add)."""
        extra = "".join(source() for source in self.text_sources)
        return generate_latest(self.registry) + extra.encode()


class ModelMetrics:
    """The request-side metrics of one model (the ``model_name``-labelled children of ``ServerMetrics``)."""

    HISTOGRAMS = ("ttft", "itl", "tpot", "e2e", "queue_time", "prefill_time", "decode_time", "inference_time",
                  "request_prompt_tokens", "request_generation_tokens", "params_n", "params_max_tokens")

    def __init__(self, server: ServerMetrics, model_name: str):
        self.model_name = model_name
        self._success = server.request_success
        self.prompt_tokens = server.prompt_tokens.labels(model_name)
        self.generation_tokens = server.generation_tokens.labels(model_name)
        for name in self.HISTOGRAMS:
            setattr(self, name, getattr(server, name).labels(model_name))

    def count_finished(self, reason: str | None) -> None:
        self._success.labels(self.model_name, reason or "abort").inc()


class RequestMetrics:
    """Metrics of one engine request (``n`` samples, at most ``max_tokens`` each): feed it every (delta)
    output, then ``finish`` once."""

    def __init__(self, metrics: ModelMetrics, num_prompt_tokens: int, n: int = 1, max_tokens: int | None = None):
        self.metrics = metrics
        self.num_prompt_tokens = num_prompt_tokens
        self.n, self.max_tokens = n, max_tokens
        self.num_generation_tokens = 0
        self.last_output_time: float | None = None
        self.arrival_time: float | None = None
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_reason: str | None = None
        self.finished = False

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        m, info = self.metrics, out.metrics or {}
        if self.last_output_time is None:
            m.prompt_tokens.inc(self.num_prompt_tokens)
            self.arrival_time = info.get("arrival_time")
            self.first_scheduled_time = info.get("first_scheduled_time")
            self.first_token_time = info.get("first_token_time") or now
            if self.arrival_time is not None:
                m.ttft.observe(max(self.first_token_time - self.arrival_time, 0.0))
                if self.first_scheduled_time is not None:
                    m.queue_time.observe(max(self.first_scheduled_time - self.arrival_time, 0.0))
        else:
            m.itl.observe(now - self.last_output_time)
            m.tpot.observe(now - self.last_output_time)
        self.last_output_time = now
        new_tokens = sum(len(c.token_ids) for c in out.outputs)
        self.num_generation_tokens += new_tokens
        m.generation_tokens.inc(new_tokens)
        for c in out.outputs:
            if c.finish_reason is not None and self.finish_reason in (None, "abort"):
                self.finish_reason = c.finish_reason

    def finish(self, completed: bool) -> None:
        """Record the end of the request (``completed`` False: aborted or failed before its end)."""
        if self.finished:
            return
        self.finished = True
        m = self.metrics
        if self.arrival_time is not None:
            m.e2e.observe(max(time.monotonic() - self.arrival_time, 0.0))
        m.count_finished(self.finish_reason if completed else "abort")
        m.request_prompt_tokens.observe(self.num_prompt_tokens)
        m.request_generation_tokens.observe(self.num_generation_tokens)
        m.params_n.observe(self.n)
        if self.max_tokens:
            m.params_max_tokens.observe(self.max_tokens)
        last, first_token, scheduled = self.last_output_time, self.first_token_time, self.first_scheduled_time
        if last is not None and first_token is not None:
            m.decode_time.observe(max(last - first_token, 0.0))
            if scheduled is not None:
                m.prefill_time.observe(max(first_token - scheduled, 0.0))
                m.inference_time.observe(max(last - scheduled, 0.0))
