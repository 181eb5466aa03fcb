"""``flotilla serve``: bind, load the engines, serve with uvicorn, drain on SIGTERM, shut everything down.

Contract of ``run_server``: ``flotilla serve MODEL [flags]`` serves one model (the one-model shorthand of a
deployment file); ``flotilla serve --config deploy.yaml`` serves every model of the file in this process
(embedded mode: ``flotilla.deploy.embedded``), and model or engine flags next to ``--config`` are a usage
error (exit code 2, as is an invalid file or an unset ``api_key_env``; ``--api-key`` wins over the file's
``api_key_env``). The listening socket is bound before any model loads (a port in use fails fast with a
clear message and exit code 1); every engine core process is shut down before returning (no orphan); the
return value is the exit code: 0 after a signal-initiated drain, 1 if an engine died.

Shutdown (``DrainingServer``): the first SIGTERM or SIGINT stops admitting (new requests and /health get
503), waits until no request is in flight or ``shutdown_timeout`` has passed, then aborts what still runs
in the engine (those responses end with ``finish_reason: "abort"``) and stops uvicorn, which cancels
whatever has not ended 2 s later. A second signal exits at once. The KServe v2 gRPC endpoint
(``--grpc-port``) runs on the same loop: its requests count as in flight for the drain, new ones are refused
once it starts, and it stops (2 s grace) after the HTTP server, before the model repository closes.

Model repository (``--model-repository`` & co., or the file's ``model_repository:``): its directories must
exist (else exit code 2, before binding); the ``ModelRepository`` is built here, started on the serving loop
before HTTP is served (it loads its models) and closed after uvicorn stopped (every batcher drains, every
backend is finalized). Without a MODEL, ``--model-repository`` serves no LLM. With ``--ray`` each repository
model is a Ray Serve deployment (``flotilla.deploy.ray_repository``); model control mode poll is a usage
error there (exit code 2), as is ``--grpc-port`` (the Ray Serve ingress is HTTP only).

Batch API (``/v1/files``, ``/v1/batches``; embedded mode only): its state lives in ``--batch-data-dir``
(default FLOTILLA_CACHE_DIR/batches), locked by this server (a second server on the same directory serves
without it: those routes answer 503). Unfinished batches resume before HTTP is served; batch requests go
through the app in-process (``in_process``) and bypass nothing: on SIGTERM they drain like HTTP requests,
then the batches stop unfinished and resume at the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time

import uvicorn

from flotilla.deploy.engine_args import deployment_from_cli, flags_conflicting_with_config
from flotilla.entrypoints.openai.banner import format_banner
from flotilla.entrypoints.openai.cli_args import server_config_from
from flotilla.entrypoints.openai.listen import bind_socket, url
from flotilla.entrypoints.openai.models import ServedModels

logger = logging.getLogger("flotilla.serve")
ENGINE_DEAD_GRACE_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first signal starts a drain instead of an immediate shutdown."""

    def __init__(self, config: uvicorn.Config, served: ServedModels, shutdown_timeout: float):
        super().__init__(config)
        self.served, self.shutdown_timeout = served, shutdown_timeout
        self.drain_deadline: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame) -> None:
        # Not calling super(): it records the signal, which uvicorn re-raises after serving (exit code != 0).
        if self.drain_deadline is None and not self.should_exit:
            logger.info("%s received: draining in-flight requests (up to %.0f s)", signal.Signals(sig).name,
                        self.shutdown_timeout)
            self.begin_drain(self.shutdown_timeout)
        else:
            logger.warning("second signal: exiting now")
            self.should_exit = self.force_exit = True

    def begin_drain(self, timeout_s: float) -> None:
        self.served.tracker.draining = True
        self.drain_deadline = time.monotonic() + timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self.served.is_dead and self.exit_code == 0:
            logger.error("an engine died (%s): failing in-flight requests and exiting", self.served.dead_error)
            self.exit_code = 1
            if self.drain_deadline is None:
                self.begin_drain(ENGINE_DEAD_GRACE_S)
        if self.drain_deadline is not None and not self.should_exit:
            if self.served.tracker.in_flight == 0:
                logger.info("drained: no request in flight")
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                logger.warning("shutdown timeout: aborting %d request(s) still in flight",
                               self.served.tracker.in_flight)
                self.served.abort_all()  # their responses end (finish_reason "abort") within uvicorn's grace
                self.should_exit = True
        return await super().on_tick(counter)


def _run_on_ray(deployment, ns: argparse.Namespace, api_key: str | None) -> int:
    """``flotilla serve --ray``: the same deployment on Ray Serve (flotilla.entrypoints.openai.ray_server)."""
    try:
        from flotilla.entrypoints.openai.ray_server import run_on_ray
    except ImportError as e:
        print(f"error: --ray needs Ray Serve (pip install 'flotilla[ray]'): {e}", file=sys.stderr)
        return 2
    config = server_config_from(ns, deployment.models[0].name if deployment.models else "model", api_key)
    return run_on_ray(deployment, host=ns.host, port=ns.port, ray_address=ns.ray_address,
                      api_key=ns.api_key or api_key, server_config=config)


def run_server(ns: argparse.Namespace) -> int:
    """Serve until signalled; returns the process exit code."""
    from flotilla.deploy.embedded import check_parallel_sizes, shutdown_engines, start_engines
    try:
        deployment = deployment_from_args(ns)
        api_key = None if ns.api_key else deployment.api_key()
        server_config_from(ns, "check", api_key)  # validate the flags before the expensive load
        if deployment.model_repository is not None:
            from flotilla.deploy.model_repository import check_repository_paths
            check_repository_paths(deployment.model_repository)
            if getattr(ns, "ray", False):
                from flotilla.deploy.ray_repository import check_repository_on_ray
                check_repository_on_ray(deployment.model_repository)
    except ValueError as e:  # DeploymentConfigError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(ns, "ray", False):
        if getattr(ns, "grpc_port", None):
            print("error: --grpc-port is not available with --ray (the Ray Serve ingress is HTTP only; its "
                  "/v2 REST routes serve KServe v2)", file=sys.stderr)
            return 2
        check_parallel_sizes(deployment)  # on the driver, before Ray starts (embedded: in start_engines)
        return _run_on_ray(deployment, ns, api_key)
    try:
        sock = bind_socket(ns.host, ns.port)
    except OSError as e:
        print(f"error: cannot listen on {ns.host}:{ns.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        grpc_port = usable_grpc_port(server_config_from(ns, "check", api_key))
    except OSError as e:
        sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        try:
            engines = start_engines(deployment, on_start=lambda msg: print(f"flotilla serve: {msg}", flush=True))
        except KeyboardInterrupt:
            print("interrupted while loading", file=sys.stderr)
            return 130
        try:
            return _serve(engines, deployment, ns, sock, api_key, grpc_port)
        finally:
            shutdown_engines(engines)
    finally:
        sock.close()


def deployment_from_args(ns: argparse.Namespace):
    """The ``DeploymentConfig`` to run: the ``--config`` file (its ``parallel: auto`` models planned on this
    machine), or the one-model shorthand of the flags. ValueError (exit code 2) for model or engine flags next
    to ``--config``, or an invalid file."""
    from flotilla.deploy.config import load_deployment_config
    if ns.config is None:
        return deployment_from_cli(ns)
    conflicts = flags_conflicting_with_config(ns)
    if conflicts:
        raise ValueError(f"--config cannot be combined with model or engine flags ({', '.join(conflicts)}): "
                         "set them in the file (models[].engine, models[].parallel)")
    deployment = load_deployment_config(ns.config)
    if any(spec.parallel_auto for spec in deployment.models):  # parallel: auto -> the planner's best plan
        from flotilla.planner import resolve_deployment
        deployment = resolve_deployment(deployment, log=lambda msg: print(f"flotilla serve: {msg}", flush=True))
    return deployment


def usable_grpc_port(config) -> int:
    """The KServe v2 gRPC port to serve on (0: none), checked before any model loads by binding it once: a
    port given with --grpc-port that cannot be bound is an OSError (exit code 1), the default one only a
    warning (gRPC then stays off, so two servers with default flags still start)."""
    if not config.grpc_port:
        return 0
    try:
        bind_socket(config.host, config.grpc_port).close()
    except OSError as e:
        if config.grpc_port_required:
            raise OSError(f"cannot listen on {config.host}:{config.grpc_port} (--grpc-port): "
                          f"{e.strerror or e}") from None
        logger.warning("KServe v2 gRPC is off: the default port %s:%d is unavailable (%s); pass --grpc-port",
                       config.host, config.grpc_port, e.strerror or e)
        return 0
    return config.grpc_port


def _serve(engines: dict, deployment, ns: argparse.Namespace, sock: socket.socket, api_key: str | None,
           grpc_port: int = 0) -> int:
    from flotilla.entrypoints.openai.api_server import build_app
    config = server_config_from(ns, deployment.models[0].name if deployment.models else "model", api_key)
    repository = None      # the KServe v2 InferenceService of the repository models
    if deployment.model_repository is not None:
        from flotilla.deploy.model_repository import build_model_repository
        repository = build_model_repository(deployment.model_repository)
    served = ServedModels(engines, config, deployment.routes, deployment.seed, allow_empty=repository is not None)
    batches = batch_api(ns, deployment, config)
    app, served = build_app(served, config, repository=repository, batches=batches)
    if batches.running is not None:
        from flotilla.entrypoints.openai.in_process import InProcessClient
        batches.running.send = InProcessClient(app, config.api_key).send
    shown_url = url(ns.host, sock.getsockname()[1])
    print(format_banner(engines, config, shown_url, deployment.routes, deployment.routing), flush=True)
    return run_app(app, served, config, sock, repository=repository, grpc_port=grpc_port, batches=batches.running)


def batch_api(ns: argparse.Namespace, deployment, config):
    """The Batch API over ``--batch-data-dir`` (default FLOTILLA_CACHE_DIR/batches; off when another server holds
    that directory)."""
    from flotilla import envs
    from flotilla.entrypoints.openai.serving_batches import batch_window, open_batch_api
    data_dir = getattr(ns, "batch_data_dir", None) or os.path.join(envs.cache_dir(), "batches")
    seqs = sum(spec.engine_args().max_num_seqs * spec.replicas for spec in deployment.models)
    api = open_batch_api(data_dir, batch_window(seqs, config.max_queued_requests))
    if api.running is not None:
        print(f"flotilla serve: Batch API data in {api.running.data.root} ({api.running.window} batch requests in "
              f"flight at most)", flush=True)
    return api


def run_app(app, served: ServedModels, config, sock: socket.socket, *, repository=None, grpc_port: int = 0,
            batches=None) -> int:
    """Serve ``app`` on ``sock`` until signalled (see ``DrainingServer``); with ``grpc_port`` also the app's
    KServe v2 gRPC endpoint (``served.kserve``) on ``config.host``, started with the HTTP server and stopped
    after it drained. A ``repository`` (``ModelRepository``) is started on the serving loop first (it loads its
    models) and closed last; ``batches`` (a ``BatchManager``) resumes its unfinished batches before HTTP is
    served and is stopped after it (the batches stay unfinished for the next start). Returns the exit code (1 when a --grpc-port given explicitly cannot be bound; the
    default port only logs a warning)."""
    # HTTP parsed by h11 whatever else is installed: it bounds a request's head (h11_max_incomplete_event_size,
    # 16 KiB: larger headers get 431/400 or a closed connection, RELIABILITY.md); uvicorn's httptools protocol
    # (its "auto" choice when httptools is importable) buffers headers without a limit.
    uv_config = uvicorn.Config(app, log_level=config.log_level, timeout_graceful_shutdown=2, lifespan="off",
                               http="h11", access_log=config.log_level in ("info", "debug", "trace"))
    server = DrainingServer(uv_config, served, config.shutdown_timeout)
    grpc_server = None
    if served.kserve is not None and grpc_port:
        from flotilla.entrypoints.kserve.grpc_server import GrpcServer
        from flotilla.entrypoints.openai.api_server import engines_ready
        grpc_server = GrpcServer(served.kserve, config.host, grpc_port, api_key=config.api_key,
                                 tracker=served.tracker, ready=lambda: engines_ready(served),
                                 max_message_bytes=config.max_body_bytes)
    try:
        asyncio.run(_serve_all(server, sock, repository, grpc_server, config.grpc_port_required, batches))
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        served.close()
    logger.info("server stopped (exit code %d)", server.exit_code)
    return server.exit_code


async def _serve_all(server: DrainingServer, sock: socket.socket, repository, grpc_server,
                     grpc_required: bool = True, batches=None) -> None:
    """Load the repository's models, resume the batches, start gRPC, serve HTTP; then stop gRPC, the batches
    and close the repository (drain, finalize) after uvicorn."""
    if repository is not None:
        await repository.start()
        print(repository_banner(repository), flush=True)
    if batches is not None:
        await batches.start()
    try:
        if grpc_server is not None:
            try:
                await grpc_server.start()
            except OSError as e:     # taken since the check before loading: fatal only if asked for
                if grpc_required:
                    raise
                logger.warning("KServe v2 gRPC is off: %s", e)
                grpc_server = None
        try:
            await server.serve(sockets=[sock])
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=2.0)
    finally:
        if batches is not None:
            await batches.close()
        if repository is not None:
            await repository.close()


def repository_banner(repository) -> str:
    """One line per repository model: its ready versions, or why it is not available."""
    lines = [f"flotilla serve: model repository ({repository.mode.value} model control)"]
    for entry in repository.index():
        state = entry.state or "not loaded"
        detail = f"version {entry.version} {state}" if entry.version else state
        lines.append(f"  {entry.name:24s}{detail}" + (f": {entry.reason}" if entry.reason else ""))
    return "\n".join(lines)
