"""``flotilla run-batch -i IN -o OUT [MODEL | --config deploy.yaml]``: an OpenAI batch file through the engine.

Contract: the model and engine come from the same flags (or deployment file) as ``flotilla serve``; each
request runs through the server's own OpenAI app in this process (``InProcessClient``: no socket), so a
result line holds exactly what ``flotilla serve`` answers the same request. Before any engine starts, the
input is read once (requests counted, duplicate ``custom_id``s refused: exit code 2) and the output checked
(``--resume``: the ids already there are skipped; without it an existing non-empty output is refused: exit
code 2). ``--max-concurrency`` requests are in flight (default: twice the ``max_num_seqs`` of every model
replica together). Progress goes to stderr; the last line on stderr is the summary. Exit code 0 when every
line succeeded, 1 when any failed or the job was interrupted (rerun with ``--resume``), 2 for usage errors,
130 on Ctrl-C (what was written stays; ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from flotilla.deploy.engine_args import add_engine_args, finite_float

logger = logging.getLogger("flotilla.run_batch")


def add_run_batch_parser(sub) -> None:
    from flotilla.entrypoints.openai.cli_args import add_chat_args, add_model_selection_args
    p = sub.add_parser("run-batch", help="run an OpenAI batch file (custom_id, method, url, body per line) through "
                                         "the engine, like vllm run-batch; resumable")
    p.add_argument("-i", "--input-file", required=True, metavar="IN",
                   help="the batch file: a path, '-' (stdin) or any fsspec URL (s3://, gs://, ...)")
    p.add_argument("-o", "--output-file", required=True, metavar="OUT",
                   help="where result lines go: a path, '-' (stdout) or any fsspec URL; lines come in completion "
                        "order, not input order (match them by custom_id)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted job: skip the custom_ids already in OUT (a local file) and append")
    p.add_argument("--max-concurrency", type=int, default=None, metavar="N",
                   help="requests in flight (default: 2 x max_num_seqs of every model replica together)")
    p.add_argument("--progress-interval", type=finite_float, default=10.0, metavar="SECONDS",
                   help="seconds between progress log lines when stderr is not a terminal")
    add_model_selection_args(p, verb="run")
    add_engine_args(p)
    add_chat_args(p)
    p.set_defaults(func=cmd_run_batch)


def default_window(deployment) -> int:
    """Twice the sequences every model replica of ``deployment`` runs at once."""
    return 2 * sum(spec.engine_args().max_num_seqs * spec.replicas for spec in deployment.models)


def cmd_run_batch(ns: argparse.Namespace) -> int:
    from flotilla.batch.io import BatchIOError, InputFile
    from flotilla.batch.job import plan_job
    from flotilla.entrypoints.openai.cli_args import ServerConfig, chat_settings_from
    from flotilla.entrypoints.openai.server import deployment_from_args
    try:
        deployment = deployment_from_args(ns)
        if deployment.model_repository is not None or not deployment.models:
            raise ValueError("run-batch runs the models of a deployment, not a model repository")
        window = ns.max_concurrency if ns.max_concurrency is not None else default_window(deployment)
        if window < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {window}")
        config = ServerConfig(served_model_name=deployment.models[0].name, max_queued_requests=window + 1,
                              **chat_settings_from(ns))
        source = InputFile(ns.input_file)
        plan = plan_job(source, ns.output_file, ns.resume)
    except (ValueError, BatchIOError) as e:  # DeploymentConfigError and DuplicateIdsError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(ns, deployment, config, source, plan, window)
    finally:
        source.close()


def _run(ns, deployment, config, source, plan, window: int) -> int:
    from flotilla.deploy.embedded import shutdown_engines, start_engines
    say = lambda msg: print(f"flotilla run-batch: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"{plan.requests} requests in {plan.input_url}" + (f", {plan.state.succeeded + plan.state.failed} already "
                                                           f"in {plan.output_url}" if plan.resume else ""))
    try:
        engines = start_engines(deployment, on_start=say)
    except KeyboardInterrupt:
        print("interrupted while loading", file=sys.stderr)
        return 130
    try:
        summary = asyncio.run(_run_job(engines, deployment, config, source, plan, window, ns.progress_interval))
    except KeyboardInterrupt:
        print(f"interrupted: the results written so far stay in {plan.output_url}; rerun with --resume to finish",
              file=sys.stderr)
        return 130
    finally:
        shutdown_engines(engines)
    print(summary.line(), file=sys.stderr, flush=True)
    return 0 if summary.ok else 1


async def _run_job(engines: dict, deployment, config, source, plan, window: int, interval_s: float):
    from flotilla.batch.job import run_planned
    from flotilla.entrypoints.openai.api_server import build_app
    from flotilla.entrypoints.openai.in_process import InProcessClient
    app, served = build_app(engines, config, deployment.routes, deployment.seed)
    try:
        return await run_planned(plan, source, InProcessClient(app).send, window=window,
                                 progress_interval_s=interval_s)
    finally:
        served.close()
