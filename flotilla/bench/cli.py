"""``flotilla bench ...`` argument parsing (vLLM's option names)."""

from __future__ import annotations

import argparse

from flotilla.bench.datasets import random_requests, shared_prefix_requests
from flotilla.deploy.engine_args import finite_float, rate_float


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="benchmark an OpenAI-compatible server (vLLM's bench serve metrics)")
    p.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (default: from --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset-name", choices=["random", "shared-prefix"], default="random")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=finite_float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=49152, help="random token ids are drawn below this")
    p.add_argument("--shared-prefix-groups", type=int, default=1)
    p.add_argument("--shared-prefix-prompts-per-group", type=int, default=64)
    p.add_argument("--shared-prefix-system-len", type=int, default=1024)
    p.add_argument("--shared-prefix-question-len", type=int, default=32)
    p.add_argument("--request-rate", type=rate_float, default=float("inf"),
                   help="requests per second (inf: all at once)")
    p.add_argument("--burstiness", type=finite_float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--result-filename", default=None, help="write vLLM-style JSON results here")
    p.set_defaults(func=cmd_bench_serve)


def build_requests(ns: argparse.Namespace):
    if ns.dataset_name == "shared-prefix":
        return shared_prefix_requests(ns.shared_prefix_groups, ns.shared_prefix_prompts_per_group,
                                      ns.shared_prefix_system_len, ns.shared_prefix_question_len,
                                      ns.random_output_len, ns.vocab_size, ns.seed)
    return random_requests(ns.num_prompts, ns.random_input_len, ns.random_output_len, ns.random_range_ratio,
                           ns.vocab_size, ns.seed)


def cmd_bench_serve(ns: argparse.Namespace) -> int:
    import logging

    from flotilla.bench.serve import ServeBenchConfig, run_and_report
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    base = ns.base_url or f"http://{ns.host}:{ns.port}"
    cfg = ServeBenchConfig(base_url=base.rstrip("/"), model=ns.model, endpoint=ns.endpoint,
                           max_concurrency=ns.max_concurrency, request_rate=ns.request_rate,
                           burstiness=ns.burstiness, ignore_eos=ns.ignore_eos, api_key=ns.api_key, seed=ns.seed)
    data = run_and_report(cfg, build_requests(ns), ns.result_filename)
    return 0 if data["failed"] == 0 else 1


def add_bench_parser(sub) -> None:
    """Register ``flotilla bench`` and its subcommands on the top-level subparsers."""
    bench = sub.add_parser("bench", help="benchmarks with vLLM's metric definitions")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    add_serve_parser(bench_sub)
    from flotilla.bench.latency import add_latency_parser
    from flotilla.bench.roofline import add_roofline_parser
    from flotilla.bench.throughput import add_throughput_parser
    add_throughput_parser(bench_sub)
    add_latency_parser(bench_sub)
    add_roofline_parser(bench_sub)
