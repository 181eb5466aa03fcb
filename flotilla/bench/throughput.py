"""``flotilla bench throughput``: offline throughput with vLLM's ``bench throughput`` semantics.

N random-token prompts (``--num-prompts``, ``--input-len``, ``--output-len``, ``--random-range-ratio``,
``--seed``) go into ``LLM.generate`` at once, sampled as vLLM does (temperature 1.0, top_p 1.0,
``ignore_eos``, ``max_tokens`` = the request's output length), so every request produces exactly its
output length. The clock covers only that one ``generate`` call (engine start-up and the optional warm-up
are outside it). Printed as vLLM prints it::

    Throughput: X requests/s, Y total tokens/s, Z output tokens/s

``--output-json`` writes ``elapsed_time, num_requests, total_num_tokens, requests_per_second,
tokens_per_second, output_tokens_per_second`` (plus the prompt/output token totals and the workload).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

from flotilla.bench.datasets import BenchRequest, random_requests
from flotilla.deploy.engine_args import finite_float


@dataclass
class ThroughputResult:
    elapsed_time: float
    num_requests: int
    total_prompt_tokens: int
    total_output_tokens: int

    @property
    def total_num_tokens(self) -> int:
        return self.total_prompt_tokens + self.total_output_tokens

    def to_json(self) -> dict:
        t = self.elapsed_time
        return {"elapsed_time": t, "num_requests": self.num_requests, "total_num_tokens": self.total_num_tokens,
                "requests_per_second": self.num_requests / t, "tokens_per_second": self.total_num_tokens / t,
                "output_tokens_per_second": self.total_output_tokens / t,
                "total_prompt_tokens": self.total_prompt_tokens, "total_output_tokens": self.total_output_tokens}


def add_workload_args(p: argparse.ArgumentParser, *, input_len: int, output_len: int) -> None:
    """Engine flags plus the random-prompt workload flags shared by ``throughput`` and ``latency``."""
    from flotilla.deploy.engine_args import add_engine_args
    add_engine_args(p)
    p.add_argument("--input-len", type=int, default=input_len, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=output_len, help="generated tokens per request")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and of the engine")
    p.add_argument("--output-json", default=None, help="write the results as JSON here")


def build_llm(ns: argparse.Namespace):
    """An ``LLM`` from the engine flags in ``ns`` (see ``flotilla.deploy.engine_args.add_engine_args``)."""
    from flotilla.engine.llm import LLM
    from flotilla.deploy.engine_args import engine_args_from
    args = engine_args_from(ns)
    args.seed = ns.seed
    return LLM.from_engine_args(args)


def sampling_params_for(req: BenchRequest):
    """vLLM's benchmark sampling: temperature 1, top_p 1, ignore_eos, exactly ``output_len`` tokens."""
    from flotilla.sampling_params import SamplingParams
    return SamplingParams(n=1, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=req.output_len)


def warm_up(llm, vocab_size: int, num_prompts: int, seed: int) -> None:
    """A short untimed generate (distinct prompts, so nothing it caches is reused by the timed run)."""
    if num_prompts <= 0:
        return
    reqs = random_requests(num_prompts, 16, 4, 0.0, vocab_size, seed + 10_000)
    llm.generate([r.prompt for r in reqs], [sampling_params_for(r) for r in reqs])


def run_throughput(llm, requests: list[BenchRequest]) -> ThroughputResult:
    """Submit every request to ``llm.generate`` at once and time it."""
    params = [sampling_params_for(r) for r in requests]
    prompts = [r.prompt for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return ThroughputResult(elapsed, len(requests), prompt_tokens, output_tokens)


def format_result(res: ThroughputResult) -> str:
    d = res.to_json()
    return (f"Throughput: {d['requests_per_second']:.2f} requests/s, {d['tokens_per_second']:.2f} total tokens/s, "
            f"{d['output_tokens_per_second']:.2f} output tokens/s\n"
            f"Total num prompt tokens:  {res.total_prompt_tokens}\n"
            f"Total num output tokens:  {res.total_output_tokens}")


def add_throughput_parser(sub) -> None:
    p = sub.add_parser("throughput", help="offline throughput: N prompts into LLM.generate at once "
                                          "(vLLM's bench throughput)")
    add_workload_args(p, input_len=1024, output_len=128)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-range-ratio", type=finite_float, default=0.0,
                   help="lengths uniform in len * [1 - r, 1 + r] (vLLM's random dataset)")
    p.add_argument("--num-warmup-prompts", type=int, default=0,
                   help="short untimed requests run first (vLLM runs none)")
    p.set_defaults(func=cmd_bench_throughput)


def cmd_bench_throughput(ns: argparse.Namespace) -> int:
    llm = build_llm(ns)
    vocab = llm.engine.config.model.vocab_size
    requests = random_requests(ns.num_prompts, ns.input_len, ns.output_len, ns.random_range_ratio, vocab, ns.seed)
    warm_up(llm, vocab, ns.num_warmup_prompts, ns.seed)
    res = run_throughput(llm, requests)
    print(format_result(res))
    if ns.output_json:
        data = res.to_json()
        data.update(model=llm.engine.config.model.model, dtype=llm.engine.config.model.dtype,
                    input_len=ns.input_len, output_len=ns.output_len, random_range_ratio=ns.random_range_ratio)
        with open(ns.output_json, "w") as f:
            json.dump(data, f, indent=2)
    return 0
