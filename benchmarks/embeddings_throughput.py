"""Embedding throughput over HTTP: the dynamic batcher on vs one input per forward pass, vs the library
in-process (issue 14's embeddings benchmark), ratios from one run.

    .venv/bin/python benchmarks/embeddings_throughput.py [--num-sentences 1024] [--clients 64] [--tokens 64]

Sentences of exactly --tokens tokens (special tokens included) for all-minilm-l6-v2. --clients concurrent
HTTP clients each send one sentence per ``/v1/embeddings`` request (base64, as the openai client does) to a
``flotilla serve`` started here: once as is (dynamic batching, ``max_batch_size`` = --max-num-seqs 128, queue
delay 0) and once with ``--max-num-seqs 1`` (Triton's ``max_batch_size: 1``). The in-process reference is
``SentenceTransformer.encode(sentences, batch_size=32)``; "batch compute" is its time for one batch of
--clients sentences (what one batched forward pass costs). flotilla's own forward pass in-process at batch 1
and at batch --clients gives the compute ceiling of batching on this machine. Prints sentences/s, p50/p99 latency, the ratios,
and a JSON line. On a shared machine the numbers are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import subprocess
import sys
import time

import aiohttp
import httpx
import numpy as np

MODEL = "all-minilm-l6-v2"
WORDS = ("the quick brown fox jumps over a lazy dog while engineers deploy inference servers and measure "
         "latency under load across many replicas").split()


def make_sentences(tokenizer, n: int, tokens: int, seed: int) -> list[str]:
    rng, out = random.Random(seed), []
    while len(out) < n:
        ids = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(tokens + 16)),
                               add_special_tokens=False)[:tokens - 2]
        text = tokenizer.decode(ids)
        if len(tokenizer.encode(text)) == tokens:
            out.append(text)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``flotilla serve MODEL --port P *args`` in a child process, healthy on enter, stopped on exit."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "flotilla.entrypoints.cli", "serve", MODEL,
                                      "--port", str(self.port), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the server did not become healthy")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def load(url: str, sentences: list[str], clients: int) -> tuple[float, float, float]:
    """(sentences/s, p50 s, p99 s) with ``clients`` concurrent clients, one sentence per request.

    The clients use aiohttp (as vLLM's serving benchmark does): on a 2-core machine the load generator shares
    the cores with the server, and httpx spends about twice aiohttp's CPU per request."""
    queue: asyncio.Queue = asyncio.Queue()
    for s in sentences:
        queue.put_nowait(s)
    latencies: list[float] = []
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as c:
        async def post(body: dict) -> None:
            async with c.post(url + "/v1/embeddings", json=body) as r:
                r.raise_for_status()
                await r.read()

        async def client() -> None:
            while not queue.empty():
                s = queue.get_nowait()
                t = time.perf_counter()
                await post({"model": MODEL, "input": s, "encoding_format": "base64"})
                latencies.append(time.perf_counter() - t)
        await post({"model": MODEL, "input": sentences[:clients]})  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return len(sentences) / elapsed, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def forward_rates(path_or_alias: str, tokens: int, clients: int) -> tuple[float, float]:
    """flotilla's own forward pass in-process (no HTTP, no batcher): sentences/s at batch 1 and at batch
    ``clients``. Their ratio is the most that batching can buy on this machine's compute."""
    from flotilla.engine.arg_utils import EngineArgs
    from flotilla.engine.embedding import Embedder
    embedder = Embedder(EngineArgs(model=path_or_alias).create_engine_config())
    params = embedder.check_params(None)
    ids = [embedder.tokenizer.encode("hello")[0]] * tokens  # (tokens,) token ids: only the shape matters here

    def rate(batch: int, reps: int) -> float:
        embedder.run_batch([ids] * batch, [params] * batch)  # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            embedder.run_batch([ids] * batch, [params] * batch)
        return batch * reps / (time.perf_counter() - start)
    return rate(1, 64), rate(clients, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-sentences", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--num-sentences-unbatched", type=int, default=None,
                    help="fewer sentences for the --max-num-seqs 1 run (a rate; default: --num-sentences)")
    args = ap.parse_args()

    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from flotilla.models.loader import get_alias
    path = get_alias(MODEL).locate()
    sentences = make_sentences(AutoTokenizer.from_pretrained(path), args.num_sentences, args.tokens, seed=0)

    results = {}
    with Server() as srv:
        results["batched"] = asyncio.run(load(srv.url, sentences, args.clients))
    with Server("--max-num-seqs", "1") as srv:
        results["max_num_seqs_1"] = asyncio.run(load(srv.url, sentences[:args.num_sentences_unbatched],
                                                     args.clients))
    st = SentenceTransformer(path, device="cpu")
    st.encode(sentences[:64], batch_size=32)  # warm-up
    start = time.perf_counter()
    st.encode(sentences, batch_size=32)
    st_rate = len(sentences) / (time.perf_counter() - start)
    start = time.perf_counter()
    st.encode(sentences[:args.clients], batch_size=args.clients)
    batch_compute = time.perf_counter() - start

    one, full = forward_rates(MODEL, args.tokens, args.clients)

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    b, u = results["batched"], results["max_num_seqs_1"]
    for label, (rate, p50, p99) in results.items():
        print(f"{label:16s}: {rate:8.1f} sentences/s  p50 {p50 * 1e3:7.1f} ms  p99 {p99 * 1e3:7.1f} ms")
    print(f"st.encode(bs=32): {st_rate:8.1f} sentences/s in-process; one batch of {args.clients}: "
          f"{batch_compute * 1e3:.1f} ms")
    print(f"flotilla forward in-process: {one:.1f} sentences/s at batch 1, {full:.1f} at batch {args.clients} "
          f"(the compute ceiling of batching: {full / one:.2f}x)")
    print(f"batched / unbatched = {b[0] / u[0]:.2f}x ; batched / st.encode = {b[0] / st_rate:.2f}x ; "
          f"batched p99 / batch compute = {b[2] / batch_compute:.2f}")
    print(json.dumps({
        "cpu": cpu.split(":", 1)[-1].strip() or platform.processor(), "commit": commit, "model": MODEL,
        "num_sentences": args.num_sentences, "clients": args.clients, "tokens": args.tokens,
        "batched": b, "max_num_seqs_1": u, "st_encode_bs32_per_s": round(st_rate, 1),
        "batch_compute_s": round(batch_compute, 4),
        "forward_batch1_per_s": round(one, 1), f"forward_batch{args.clients}_per_s": round(full, 1), "speedup_vs_unbatched": round(b[0] / u[0], 2),
        "ratio_vs_st_encode": round(b[0] / st_rate, 2), "p99_over_batch_compute": round(b[2] / batch_compute, 2)}))


if __name__ == "__main__":
    main()
