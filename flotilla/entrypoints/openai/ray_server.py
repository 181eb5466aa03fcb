"""``flotilla serve --ray``: run a deployment on Ray Serve (``flotilla.deploy.ray_serve``'s model
deployments behind the OpenAI ingress) until SIGTERM/SIGINT.

Shutdown, as embedded mode: the first SIGTERM or SIGINT drains (``drain_ingress``): every ingress replica
answers new requests and ``/health`` with a JSON 503 while Serve's proxy stays up, until no request is in
flight or the drain budget (``drain_budget``: ``--shutdown-timeout`` less what stopping Serve and Ray
takes) has passed; then the engine requests still running are aborted (their responses end with
``finish_reason: "abort"``) and given ``ABORT_GRACE_S``; then Serve (and a Ray instance we started) shut
down and the exit code is 0. A second signal skips the rest of the drain.

Serve's proxy is started with ``flotilla.entrypoints.openai.ray_proxy``'s middleware, so the errors it
answers itself (an ingress replica that died mid-request) are OpenAI JSON too; on a cluster whose Serve
instance is already running, its proxy keeps Serve's own errors (``start_serve``).

Security: a Ray instance that ``run_on_ray`` starts itself listens on loopback only, without a dashboard;
the HTTP proxy binds the ``host`` given (127.0.0.1 by default).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import ray
from ray import serve

from flotilla.deploy.ray_serve import APP_NAME, INGRESS_NAME, connect_ray, cpus_needed
from flotilla.distributed.ray_compat import proxy_callback_env
from flotilla.entrypoints.openai import ray_proxy
from flotilla.entrypoints.openai.listen import bind_socket
from flotilla.entrypoints.openai.ray_ingress import build_openai_ray_app, server_config_for

logger = logging.getLogger(__name__)
ABORT_GRACE_S = 2.0  # after the drain limit: how long aborted requests get to end (uvicorn's grace, embedded)
DRAIN_POLL_S = 0.5
BROADCAST_TIMEOUT_S = 5.0
STOP_RESERVE_S = 15.0  # of --shutdown-timeout, kept for serve.shutdown and ray.shutdown (~10 s measured)


def _check_port(host: str, port: int) -> None:
    bind_socket(host, port).close()


def run_on_ray(config, *, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None,
               api_key: str | None = None, server_config=None) -> int:
    """Serve ``config`` on Ray Serve at ``http://host:port`` until SIGTERM/SIGINT; returns the exit code.

    Without ``ray_address`` a local Ray instance is started (loopback only, no dashboard) and stopped at the
    end; with one, that cluster is joined and only the ``flotilla`` application is deleted at the end.
    ``api_key`` overrides ``config.api_key_env``; ``server_config`` (a ``ServerConfig``) supplies the other
    HTTP settings (queue bound, body limit, ``shutdown_timeout``: the drain limit). A port in use or a model
    that fails to deploy returns 1 with a message on stderr; 0 after a signal (see the module's Shutdown).
    """
    http = server_config_for(config, api_key, host, port, server_config)  # a missing API key fails here
    if ray_address is None and not ray.is_initialized():  # the proxy will listen on this machine
        try:
            _check_port(host, port)
        except OSError as e:
            print(f"error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
            return 1
    stop, interrupted = threading.Event(), threading.Event()
    owns_ray = connect_ray(ray_address, cpus_needed(config))

    def on_signal(*_):  # the first signal drains, a second one cuts the drain short
        (interrupted if stop.is_set() else stop).set()

    # After ray.init, which installs handlers of its own.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        start_serve(host, port)
        try:
            serve.run(build_openai_ray_app(config, server_config=http), name=APP_NAME, route_prefix="/")
        except Exception as e:  # noqa: BLE001 - a deployment that cannot start
            print(f"error: the flotilla application failed to deploy: {e}", file=sys.stderr)
            return 1
        print(ray_banner(config, host, port), flush=True)
        while not stop.wait(1.0):
            pass
        drain_s = drain_budget(http.shutdown_timeout)
        logger.info("signal received: draining in-flight requests (up to %.0f s)", drain_s)
        left = drain_ingress(serve.get_deployment_handle(INGRESS_NAME, app_name=APP_NAME), drain_s, interrupted)
        if left == 0:
            logger.info("drained")
        else:
            logger.info("shutting down with %d request(s) still in flight", left)
        return 0
    finally:
        _shutdown(owns_ray)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ray_banner(config, host: str, port: int) -> str:
    """What ``run_on_ray`` prints once the application is deployed: the models, the repository models'
    deployments, and where the OpenAI and KServe v2 APIs listen."""
    shown = f"[{host}]" if ":" in host else host
    names = ", ".join(spec.name for spec in config.models) or "none"
    lines = [f"flotilla on Ray Serve: models {names}; OpenAI API on http://{shown}:{port}/v1, KServe v2 on "
             f"http://{shown}:{port}/v2"]
    if config.model_repository is not None:
        from flotilla.deploy.ray_repository import deployment_name, plan_repository
        plan = plan_repository(config.model_repository, config.model_names)
        deployed = ", ".join(f"{m} ({deployment_name(m)})" for m in plan.deployed) or "none"
        lines.append(f"  model repository ({plan.mode} model control): {deployed}")
        lines += [f"  {name:24s}UNAVAILABLE: {reason}" for name, reason in plan.unavailable.items()]
    return "\n".join(lines)


def drain_budget(shutdown_timeout_s: float) -> float:
    """The part of ``--shutdown-timeout`` the drain gets: all but ``STOP_RESERVE_S`` (a third of it when it
    is shorter than 3 x that), which is left for stopping Serve and Ray, so the process exits within the
    timeout (a Kubernetes pod's grace period is the hard bound)."""
    return shutdown_timeout_s - min(STOP_RESERVE_S, shutdown_timeout_s / 3)


def start_serve(host: str, port: int) -> None:
    """Start Serve (controller and one HTTP proxy on the head node, at ``host:port``) with flotilla's
    OpenAI-errors middleware in the proxy. Already running (a joined cluster): Serve keeps its proxy."""
    env = proxy_callback_env(ray_proxy.IMPORT_PATH)
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly",
                controller_options={"runtime_env": {"env_vars": env}} if env else None)


def drain_ingress(handle, timeout_s: float, interrupted: threading.Event, clock=time.monotonic) -> int:
    """Drain the ingress deployment behind ``handle``: broadcast ``drain`` (each replica then answers new
    requests and /health with 503, and reports its requests in flight) every ``DRAIN_POLL_S`` until all
    report 0, ``timeout_s`` has passed or ``interrupted`` is set. Past ``timeout_s``, ``abort_all`` is
    broadcast and the aborted responses get ``ABORT_GRACE_S`` to end. Returns the requests still in flight
    (0: drained). A replica that does not answer (dead) has nothing to wait for; a replica that starts during
    the drain is told to drain at the next poll."""
    deadline, aborted_at = clock() + timeout_s, None
    while True:
        in_flight = _broadcast_sum(handle, "drain")
        now = clock()
        if in_flight == 0 or interrupted.is_set():
            return in_flight
        if aborted_at is None and now >= deadline:
            logger.warning("shutdown timeout: aborting %d request(s) still in flight", in_flight)
            _broadcast_sum(handle, "abort_all")
            aborted_at = now
        elif aborted_at is not None and now >= aborted_at + ABORT_GRACE_S:
            return in_flight
        interrupted.wait(DRAIN_POLL_S)


def _broadcast_sum(handle, method: str) -> int:
    """Call ``method`` on every replica; the sum of the integers they return (failures count 0)."""
    try:
        results = handle.broadcast(method).results(timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True)
    except Exception as e:  # noqa: BLE001 - no replica at all (DeploymentUnavailableError), or a timeout
        logger.warning("ingress %s: %s", method, e)
        return 0
    return sum(r for r in results if isinstance(r, int) and not isinstance(r, bool))


def _shutdown(owns_ray: bool) -> None:
    try:
        if owns_ray:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception as e:  # noqa: BLE001
        logger.warning("shutting Serve down failed: %s", e)
    if owns_ray:
        ray.shutdown()
