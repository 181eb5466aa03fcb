"""The ``flotilla`` command line: ``serve`` (the OpenAI-compatible server), ``generate`` and ``models``."""

from __future__ import annotations

import argparse
import logging
import sys

from flotilla import envs
from flotilla.errors import FlotillaError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF directory, .gguf file or alias "
                                                 "(default: smollm2-135m-instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", "-q", choices=["int8"], default=None,
                   help="weight-only int8 linear layers (faster small-batch decode; activations stay bf16)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=float, default=1.0, help="KV cache budget in GiB")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks (overrides GiB)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    p.add_argument("--batch-invariant", action="store_true",
                   help="each request's tokens and logprobs independent of the batch it runs in (slower; "
                        "not with --quantization)")
    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    par.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    par.add_argument("--pipeline-partition", default=None,
                     help="layers per pipeline stage, comma separated (default: an even split)")
    par.add_argument("--distributed-executor-backend", "--executor", dest="distributed_executor_backend",
                     choices=["uni", "mp", "ray", "external"], default=None,
                     help="how ranks run (default: uni for one rank, mp for several; external under "
                          "torchrun/mpirun/srun is detected)")
    par.add_argument("--distributed-backend", choices=["gloo", "nccl"], default=None,
                     help="torch.distributed backend (default: nccl on CUDA, gloo on CPU)")
    par.add_argument("--ray-address", default=None, help="Ray cluster address for --executor ray")
    par.add_argument("--device", default="cpu", help="cpu or cuda")


def engine_args_from(ns: argparse.Namespace):
    from flotilla.engine.arg_utils import EngineArgs
    partition = [int(x) for x in ns.pipeline_partition.split(",")] if ns.pipeline_partition else None
    return EngineArgs(model=ns.model, dtype=ns.dtype, quantization=ns.quantization, max_model_len=ns.max_model_len,
                      kv_cache_memory=ns.kv_cache_memory, num_kv_blocks=ns.num_kv_blocks, block_size=ns.block_size,
                      max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
                      enable_prefix_caching=ns.enable_prefix_caching,
                      enable_chunked_prefill=ns.enable_chunked_prefill,
                      tensor_parallel_size=ns.tensor_parallel_size, pipeline_parallel_size=ns.pipeline_parallel_size,
                      pipeline_partition=partition, distributed_executor_backend=ns.distributed_executor_backend,
                      distributed_backend=ns.distributed_backend, ray_address=ns.ray_address, device=ns.device,
                      batch_invariant=ns.batch_invariant)


def follow_launcher(ns: argparse.Namespace) -> int | None:
    """Under torchrun / mpirun / srun: ranks > 0 serve rank 0 and return their exit code here; rank 0
    returns None and goes on as the driver (HTTP server or generator) with the external executor."""
    import os

    from flotilla.distributed.launch import detect_launch
    info = detect_launch(os.environ)
    if info is None or info.world_size == 1:
        return None
    if getattr(ns, "config", None) is not None:
        raise FlotillaError("--config (embedded multi-model serving) cannot run under torchrun/mpirun/srun; "
                            "launch one model per job instead, or use Ray Serve")
    ns.distributed_executor_backend = "external"
    if info.rank == 0:
        return None
    from flotilla.worker.worker_proc import run_worker
    config = engine_args_from(ns).create_engine_config()
    return run_worker(config, info.rank, info.init_method)


def cmd_generate(ns: argparse.Namespace) -> int:
    from flotilla.engine.llm import LLM
    from flotilla.sampling_params import SamplingParams
    llm = LLM.from_engine_args(engine_args_from(ns))
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, seed=ns.seed,
                            top_p=ns.top_p, top_k=ns.top_k)
    if ns.chat:
        out = llm.chat([{"role": "user", "content": ns.prompt}], params)
    else:
        out = llm.generate(ns.prompt, params)
    print(out[0].outputs[0].text)
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    from flotilla.models.loader import list_aliases
    for alias, description, installed, path in list_aliases():
        state = f"installed at {path}" if installed else "not installed"
        print(f"{alias:28s} {description}  [{state}]")
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from flotilla.entrypoints.openai.server import run_server
    return run_server(ns)


def build_parser() -> argparse.ArgumentParser:
    from flotilla.entrypoints.openai.cli_args import add_serve_args
    parser = argparse.ArgumentParser(prog="flotilla", description="Distributed LLM inference and serving")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model (or every model of a --config deployment file) over an "
                                         "OpenAI-compatible HTTP API")
    add_engine_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)
    models = sub.add_parser("models", help="list model aliases and whether they are installed")
    models.set_defaults(func=cmd_models)
    from flotilla.bench.cli import add_bench_parser
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=envs.log_level(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if ns.command in ("serve", "generate"):
            code = follow_launcher(ns)
            if code is not None:
                return code
        return ns.func(ns)
    except FlotillaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
