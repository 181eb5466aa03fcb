"""The startup banner of ``flotilla serve``: every model's resolved settings, the routes, the server's."""

from __future__ import annotations

from collections.abc import Mapping

from flotilla.entrypoints.openai.cli_args import ServerConfig


def _model_rows(engine, routing: str | None) -> list[tuple[str, object]]:
    ec = engine.config
    if getattr(ec.model, "runner", "generate") == "pooling":
        return _embedding_rows(engine)
    replicas = getattr(engine, "replicas", None)
    count = len(replicas) if replicas is not None else 1
    per_replica = engine.num_blocks // count
    kv = f"{per_replica} blocks x {ec.cache.block_size} tokens" + (" per replica" if count > 1 else "")
    rows = [("model", f"{ec.model.model} ({ec.model.source_kind}: {ec.model.source})")]
    if count > 1:
        rows.append(("replicas", f"{count} (routing: {routing})"))
    parallel = ec.parallel
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        rows.append(("parallel", f"tensor {parallel.tensor_parallel_size} x pipeline "
                                 f"{parallel.pipeline_parallel_size}"))
    rows += [("dtype", ec.model.dtype), ("max_model_len", ec.model.max_model_len), ("KV cache", kv),
             ("max_num_seqs", ec.scheduler.max_num_seqs),
             ("max_num_batched_tokens", ec.scheduler.max_num_batched_tokens),
             ("prefix caching", ec.cache.enable_prefix_caching),
             ("chunked prefill", ec.scheduler.enable_chunked_prefill)]
    if ec.model.batch_invariant:
        rows.append(("batch invariant", True))
    return rows


def _embedding_rows(engine) -> list[tuple[str, object]]:
    ec = engine.config
    return [("model", f"{ec.model.model} ({ec.model.source_kind}: {ec.model.source})"),
            ("runner", f"pooling (embeddings, {engine.output_dim} dimensions)"),
            ("pooling", ec.model.pooler.describe()), ("dtype", ec.model.dtype),
            ("max_model_len", f"{ec.model.max_model_len} (longer texts are truncated)"),
            ("max_num_seqs", ec.scheduler.max_num_seqs),
            ("max_num_batched_tokens", f"{ec.scheduler.max_num_batched_tokens} (padded)")]


def format_banner(engines: Mapping, config: ServerConfig, url: str,
                  routes: Mapping[str, Mapping[str, float]] | None = None, routing: str | None = None) -> str:
    """The banner for ``{model name: engine}`` (``EngineClient``s; a ``ReplicaSet`` shows its replicas)."""
    lines = ["flotilla serve: resolved configuration"]
    for name, engine in engines.items():
        lines.append(f"  served model name       {name}")
        lines += [f"    {k:22s}{v}" for k, v in _model_rows(engine, routing)]
    for alias, weights in (routes or {}).items():
        total = sum(weights.values())
        split = ", ".join(f"{t} {100 * w / total:g}%" for t, w in weights.items())
        lines.append(f"  route {alias:18s}{split}")
    rows = [("max_queued_requests", f"{config.max_queued_requests} per model"),
            ("shutdown_timeout", f"{config.shutdown_timeout:g} s"),
            ("max request body", f"{config.max_body_bytes} bytes"),
            ("api key", "required" if config.api_key else "none")]
    lines += [f"  {k:24s}{v}" for k, v in rows]
    lines.append(f"Serving the OpenAI API on {url}/v1 (health: {url}/health, metrics: {url}/metrics)")
    return "\n".join(lines)
