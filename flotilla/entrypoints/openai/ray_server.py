"""``flotilla serve --ray``: run a deployment on Ray Serve (``flotilla.deploy.ray_serve``'s model
deployments behind the OpenAI ingress) until SIGTERM/SIGINT.

Security: a Ray instance that ``run_on_ray`` starts itself listens on loopback only, without a dashboard;
the HTTP proxy binds the ``host`` given (127.0.0.1 by default).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import ray
from ray import serve

from flotilla.deploy.ray_serve import APP_NAME, connect_ray, cpus_needed
from flotilla.entrypoints.openai.listen import bind_socket
from flotilla.entrypoints.openai.ray_ingress import build_openai_ray_app, server_config_for

logger = logging.getLogger(__name__)


def _check_port(host: str, port: int) -> None:
    bind_socket(host, port).close()


def run_on_ray(config, *, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None,
               api_key: str | None = None, server_config=None) -> int:
    """Serve ``config`` on Ray Serve at ``http://host:port`` until SIGTERM/SIGINT; returns the exit code.

    Without ``ray_address`` a local Ray instance is started (loopback only, no dashboard) and stopped at the
    end; with one, that cluster is joined and only the ``flotilla`` application is deleted at the end.
    ``api_key`` overrides ``config.api_key_env``; ``server_config`` (a ``ServerConfig``) supplies the other
    HTTP settings (queue bound, body limit). A port in use or a model that fails to deploy returns 1 with a
    message on stderr; 0 after a signal.
    """
    http = server_config_for(config, api_key, host, port, server_config)  # a missing API key fails here
    if ray_address is None and not ray.is_initialized():  # the proxy will listen on this machine
        try:
            _check_port(host, port)
        except OSError as e:
            print(f"error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
            return 1
    stop = threading.Event()
    owns_ray = connect_ray(ray_address, cpus_needed(config))
    # After ray.init, which installs handlers of its own: a signal asks for an orderly shutdown.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        try:
            serve.run(build_openai_ray_app(config, server_config=http), name=APP_NAME, route_prefix="/")
        except Exception as e:  # noqa: BLE001 - a deployment that cannot start
            print(f"error: the flotilla application failed to deploy: {e}", file=sys.stderr)
            return 1
        shown = f"[{host}]" if ":" in host else host
        names = ", ".join(spec.name for spec in config.models)
        print(f"flotilla on Ray Serve: models {names}; OpenAI API on http://{shown}:{port}/v1", flush=True)
        while not stop.wait(1.0):
            pass
        logger.info("signal received: shutting the flotilla application down")
        return 0
    finally:
        _shutdown(owns_ray)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
