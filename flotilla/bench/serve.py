"""``flotilla bench serve``: an async streaming client against any OpenAI-compatible server.

Each request streams ``/v1/completions`` with ``stream_options.include_usage``; timings follow
``flotilla.bench.metrics`` (vLLM's definitions). Works against flotilla and peers alike.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from flotilla.bench.datasets import BenchRequest, arrival_gaps
from flotilla.bench.metrics import RequestResult, calculate_metrics, format_result_block, metrics_to_json


@dataclass
class ServeBenchConfig:
    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    max_concurrency: int | None = None
    request_rate: float = float("inf")
    burstiness: float = 1.0
    ignore_eos: bool = True
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = 6 * 3600


async def send_one(client: httpx.AsyncClient, cfg: ServeBenchConfig, req: BenchRequest) -> RequestResult:
    body = {"model": cfg.model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    result = RequestResult(success=False, prompt_len=req.prompt_len)
    start = last = time.perf_counter()
    tokens_seen = 0
    try:
        async with client.stream("POST", cfg.base_url + cfg.endpoint, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if chunk.get("choices"):
                    if tokens_seen == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    tokens_seen += 1
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
        result.latency = last - start
        result.output_tokens = result.output_tokens or tokens_seen
        result.success = tokens_seen > 0
        if not result.success:
            result.error = "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_benchmark(cfg: ServeBenchConfig, requests: list[BenchRequest], warmup: bool = True,
                        warmup_concurrency: int = 1):
    """Returns (metrics, per-request results). Duration: first dispatch -> last request done.

    ``warmup``: first send ``warmup_concurrency`` short requests (the first prompt, 4 tokens) at once and wait
    for them, so the batch shapes of the measured load have run once (a first forward of a new batch size
    costs several steady-state steps on CPU)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits) as client:
        if warmup and requests:
            warm = BenchRequest(requests[0].prompt, requests[0].prompt_len, 4)
            done = await asyncio.gather(*(send_one(client, cfg, warm) for _ in range(max(1, warmup_concurrency))))
            failed = [w for w in done if not w.success]
            if failed:
                raise RuntimeError(f"warm-up request failed: {failed[0].error}")
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def limited(req):
            if sem is None:
                return await send_one(client, cfg, req)
            async with sem:
                return await send_one(client, cfg, req)

        gaps = arrival_gaps(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
        start = time.perf_counter()
        tasks = []
        for req, gap in zip(requests, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return calculate_metrics(results, duration), results


def run_and_report(cfg: ServeBenchConfig, requests: list[BenchRequest], result_file: str | None) -> dict:
    metrics, results = asyncio.run(run_benchmark(cfg, requests))
    print(format_result_block(metrics, cfg.max_concurrency, cfg.request_rate))
    data = metrics_to_json(metrics, results)
    data.update({"model_id": cfg.model, "base_url": cfg.base_url, "max_concurrency": cfg.max_concurrency,
                 "request_rate": cfg.request_rate, "burstiness": cfg.burstiness, "num_prompts": len(requests)})
    if result_file:
        with open(result_file, "w") as f:
            json.dump(data, f, indent=1)
    return data
