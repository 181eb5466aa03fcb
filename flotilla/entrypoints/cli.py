"""The ``flotilla`` command line: ``serve`` (the OpenAI-compatible server, and a model repository with
``--model-repository``), ``generate``, ``run-batch`` (an OpenAI batch file), ``models`` and ``bench``.

The engine flags and their resolution into ``EngineArgs`` live in ``flotilla.deploy.engine_args`` (shared
with the deployment file and Ray Serve)."""

from __future__ import annotations

import argparse
import logging
import sys

from flotilla import envs
from flotilla.deploy.engine_args import add_engine_args, engine_args_from, finite_float
from flotilla.errors import FlotillaError


def follow_launcher(ns: argparse.Namespace) -> int | None:
    """Under torchrun / mpirun / srun: ranks > 0 serve rank 0 and return their exit code here; rank 0
    returns None and goes on as the driver (HTTP server or generator) with the external executor."""
    from flotilla.distributed.launch import detect_launch
    info = detect_launch(envs.launcher_environment())
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
    for info in list_aliases():
        print(f"{info.alias:28s} {info.description}  [{info.state}]")
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from flotilla.entrypoints.openai.server import run_server
    return run_server(ns)


def add_plan_parser(sub) -> None:
    """``flotilla plan``: rank TP x PP x replicas x max_num_seqs for a model, hardware, workload and SLO."""
    from flotilla.planner import command
    p = sub.add_parser("plan", help="rank parallel plans (TP x PP x replicas x max_num_seqs) for a model on given "
                                    "hardware, workload and latency SLO; --emit a deployment file")
    command.add_arguments(p)
    p.set_defaults(func=command.run)


def add_k8s_command(sub) -> None:
    """``flotilla k8s``: Kubernetes manifests (plain, KServe, KubeRay) from a deployment file (flotilla.k8s)."""
    from flotilla.k8s.cli import add_k8s_parser
    add_k8s_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    from flotilla.deploy.repository_args import add_repository_args
    from flotilla.entrypoints.openai.cli_args import add_serve_args
    parser = argparse.ArgumentParser(prog="flotilla", description="Distributed LLM inference and serving")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model (or every model of a --config deployment file) over an "
                                         "OpenAI-compatible HTTP API, and a Triton-layout --model-repository")
    add_engine_args(serve)
    add_serve_args(serve)
    add_repository_args(serve)
    serve.set_defaults(func=cmd_serve)
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=finite_float, default=0.0)
    gen.add_argument("--top-p", type=finite_float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)
    from flotilla.entrypoints.openai.run_batch import add_run_batch_parser
    add_run_batch_parser(sub)
    models = sub.add_parser("models", help="list model aliases and whether they are installed")
    models.set_defaults(func=cmd_models)
    from flotilla.bench.cli import add_bench_parser
    add_bench_parser(sub)
    add_plan_parser(sub)
    add_k8s_command(sub)
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
