"""``flotilla serve``: bind, load the engine, serve with uvicorn, drain on SIGTERM, shut everything down.

Contract of ``run_server``: the listening socket is bound before the model loads (a port in use fails fast
with a clear message and exit code 1); the engine core process is always shut down before returning (no
orphan); the return value is the exit code: 0 after a signal-initiated drain, 1 if the engine died.

Shutdown (``DrainingServer``): the first SIGTERM or SIGINT stops admitting (new requests and /health get
503), waits until no request is in flight or ``shutdown_timeout`` has passed, then aborts what still runs
in the engine (those responses end with ``finish_reason: "abort"``) and stops uvicorn, which cancels
whatever has not ended 2 s later. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time

import uvicorn

from flotilla.entrypoints.openai.cli_args import resolve_model_arg, server_config_from
from flotilla.entrypoints.openai.generation import ServingContext

logger = logging.getLogger("flotilla.serve")
ENGINE_DEAD_GRACE_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first signal starts a drain instead of an immediate shutdown."""

    def __init__(self, config: uvicorn.Config, ctx: ServingContext, shutdown_timeout: float):
        super().__init__(config)
        self.ctx, self.shutdown_timeout = ctx, shutdown_timeout
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
        self.ctx.tracker.draining = True
        self.drain_deadline = time.monotonic() + timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self.ctx.engine.is_dead and self.exit_code == 0:
            logger.error("the engine died (%s): failing in-flight requests and exiting", self.ctx.engine.dead_error)
            self.exit_code = 1
            if self.drain_deadline is None:
                self.begin_drain(ENGINE_DEAD_GRACE_S)
        if self.drain_deadline is not None and not self.should_exit:
            if self.ctx.tracker.in_flight == 0:
                logger.info("drained: no request in flight")
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                logger.warning("shutdown timeout: aborting %d request(s) still in flight",
                               self.ctx.tracker.in_flight)
                self.ctx.abort_all()  # their responses end (finish_reason "abort") within uvicorn's grace
                self.should_exit = True
        return await super().on_tick(counter)


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host:port`` (IPv4 or IPv6); OSError if the address is unavailable."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def format_banner(engine, config, url: str) -> str:
    ec = engine.config
    kv = f"{engine.num_blocks} blocks x {ec.cache.block_size} tokens"
    rows = [("model", f"{ec.model.model} ({ec.model.source_kind}: {ec.model.source})"),
            ("served model name", config.served_model_name), ("dtype", ec.model.dtype),
            ("max_model_len", ec.model.max_model_len), ("KV cache", kv),
            ("max_num_seqs", ec.scheduler.max_num_seqs),
            ("max_num_batched_tokens", ec.scheduler.max_num_batched_tokens),
            ("prefix caching", ec.cache.enable_prefix_caching),
            ("chunked prefill", ec.scheduler.enable_chunked_prefill),
            ("max_queued_requests", config.max_queued_requests),
            ("shutdown_timeout", f"{config.shutdown_timeout:g} s"),
            ("max request body", f"{config.max_body_bytes} bytes"),
            ("api key", "required" if config.api_key else "none")]
    lines = ["flotilla serve: resolved configuration"] + [f"  {k:24s}{v}" for k, v in rows]
    lines.append(f"Serving the OpenAI API on {url}/v1 (health: {url}/health, metrics: {url}/metrics)")
    return "\n".join(lines)


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def run_server(ns: argparse.Namespace) -> int:
    """Serve until signalled; returns the process exit code."""
    from flotilla.engine.async_llm import AsyncLLM
    from flotilla.entrypoints.cli import engine_args_from
    from flotilla.entrypoints.openai.api_server import build_app
    try:
        resolve_model_arg(ns)
        server_config_from(ns, "check")  # validate the flags before the expensive load
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind_socket(ns.host, ns.port)
    except OSError as e:
        print(f"error: cannot listen on {ns.host}:{ns.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        args = engine_args_from(ns)
        args.served_model_name = ns.served_model_name
        print(f"flotilla serve: loading {args.model or 'the default model'} ...", flush=True)
        try:
            engine = AsyncLLM.from_engine_args(args)
        except KeyboardInterrupt:
            print("interrupted while loading", file=sys.stderr)
            return 130
        try:
            return _serve(engine, ns, sock, build_app)
        finally:
            engine.shutdown()
    finally:
        sock.close()


def _serve(engine, ns: argparse.Namespace, sock: socket.socket, build_app) -> int:
    config = server_config_from(ns, engine.model_config.name)
    app, ctx = build_app(engine, config)
    uv_config = uvicorn.Config(app, log_level=config.log_level, timeout_graceful_shutdown=2, lifespan="off",
                               access_log=config.log_level in ("info", "debug", "trace"))
    server = DrainingServer(uv_config, ctx, config.shutdown_timeout)
    print(format_banner(engine, config, _url(ns.host, sock.getsockname()[1])), flush=True)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        ctx.executor.shutdown(wait=False, cancel_futures=True)
    logger.info("server stopped (exit code %d)", server.exit_code)
    return server.exit_code
