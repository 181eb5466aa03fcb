"""Every private Ray API flotilla uses, in one place (written against Ray 2.60).

Ray has no public way to do either job below. Each function names the private API it touches, why it is
needed, and what happens when that API is gone (a warning, and Ray's public default behaviour).
``tests/test_ray_compat.py`` starts a real Ray instance and a real Serve replica and fails when either API
changes. Ray is imported only inside the functions, so this module is importable without Ray (by
``executor/`` and ``deploy/`` alike).

- ``loopback_only_ray()``: a Ray instance started inside it listens on 127.0.0.1 only.
  Private: ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` (and the environment variable
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` that sets it when Ray is imported).
- ``bind_replica_grpc_to_node_ip()``: a Serve replica's inter-deployment gRPC server listens on the
  node IP instead of every interface. Private: ``ray.serve._private.replica.add_port_to_grpc_server``.
- ``proxy_callback_env(import_path)``: Serve's HTTP proxy wraps its ASGI app in the middlewares a callback
  returns. Private: the setting ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
  (``ray.serve._private.constants``), applied by ``ray.serve._private.http_util.configure_http_middlewares``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

from flotilla import envs

logger = logging.getLogger(__name__)

RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's env var behind ENABLE_RAY_CLUSTER
PROXY_CALLBACK_SETTING = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # read by Serve's proxy at start-up
_WILDCARD_HOSTS = ("[::]", "0.0.0.0", "::", "")  # hosts that mean "every interface" in a gRPC address


@contextlib.contextmanager
def loopback_only_ray() -> Iterator[None]:
    """Keep a Ray instance started (``ray.init(address="local")``, ``ray.cluster_utils.Cluster``) or
    joined by address inside this block on 127.0.0.1; restores everything on exit.

    Why private: on Linux Ray rewrites a loopback node IP (``ray.init(_node_ip_address="127.0.0.1")``,
    ``ray start --node-ip-address 127.0.0.1``) to the host's routable address (``resolve_ip_for_localhost``),
    and its GCS, raylet, agents and workers then listen on that address or on every interface. The only
    way to stay on loopback is Ray's single-machine mode, the one it uses on macOS and Windows:
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` false. Ray reads it from
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at import, so we set the constant in this process and the
    variable in the environment the daemons (and through them every worker and every process a worker
    starts, e.g. an engine core that joins the instance by its loopback address) inherit.

    If Ray no longer has the constant: a warning, and the instance gets Ray's public default (the
    routable address); callers check ``ray.util.get_node_ip_address()`` afterwards.
    """
    try:
        from ray._private import ray_constants
        saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    except (ImportError, AttributeError):
        ray_constants, saved_flag = None, None
        logger.warning("Ray's single-machine switch (ray._private.ray_constants.ENABLE_RAY_CLUSTER) is gone in "
                       "this Ray version: the Ray instance may listen beyond loopback")
    saved_env = envs.named(RAY_CLUSTER_SWITCH)
    with _environment(RAY_CLUSTER_SWITCH, "0", saved_env):
        if ray_constants is not None:
            ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            yield
        finally:
            if ray_constants is not None:
                ray_constants.ENABLE_RAY_CLUSTER = saved_flag


@contextlib.contextmanager
def _environment(key: str, value: str, saved: str | None) -> Iterator[None]:
    """Set ``key`` in this process's environment for the block, then put back ``saved`` (None: unset)."""
    os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def bind_replica_grpc_to_node_ip() -> bool:
    """Make this Serve replica's inter-deployment gRPC server listen on the node IP only; call it from the
    deployment's constructor. Returns True when the bind is (or already was) restricted.

    Why private: Ray Serve 2.60 starts that server in ``ReplicaBase._on_initialized``, after the constructor
    returns, with ``add_port_to_grpc_server(server, "[::]:0")`` (every interface) and has no setting for
    the host. Its peers reach it at the node IP (``RunningReplicaInfo.node_ip``), so binding there loses
    nothing and keeps a loopback-only instance on loopback. We wrap the module-level
    ``ray.serve._private.replica.add_port_to_grpc_server`` so a wildcard host becomes the node IP (other
    addresses pass through); each bind is recorded (``replica_grpc_binds``).

    If Ray no longer has that function: a warning, and the replica keeps Ray's default bind (every interface).
    """
    try:
        from ray.serve._private import replica as replica_module
        original = replica_module.add_port_to_grpc_server
    except (ImportError, AttributeError):
        logger.warning("cannot restrict the Serve replica's gRPC server to the node IP: "
                       "ray.serve._private.replica.add_port_to_grpc_server is gone in this Ray version; "
                       "it listens on every interface")
        return False
    if getattr(original, "flotilla_binds", None) is not None:
        return True
    import ray
    ip = ray.util.get_node_ip_address()
    replica_module.add_port_to_grpc_server = _node_ip_bind(original, f"[{ip}]" if ":" in ip else ip)
    return True


def _node_ip_bind(original: Callable, host: str) -> Callable:
    """``add_port_to_grpc_server(server, address)`` with a wildcard host replaced by ``host``."""
    binds: list[tuple[str, str, int]] = []

    def add_port(server, address: str):
        wildcard, sep, port = address.rpartition(":")
        bound = f"{host}:{port}" if sep and wildcard in _WILDCARD_HOSTS else address
        result = original(server, bound)
        binds.append((address, bound, result))
        return result

    add_port.flotilla_binds = binds
    return add_port


def replica_grpc_binds() -> list[tuple[str, str, int]]:
    """``(address Ray asked for, address bound, port)`` of each gRPC bind in this process since
    ``bind_replica_grpc_to_node_ip``; empty when it was not applied."""
    try:
        from ray.serve._private import replica as replica_module
    except ImportError:
        return []
    return list(getattr(replica_module.add_port_to_grpc_server, "flotilla_binds", None) or [])


def proxy_callback_env(import_path: str) -> dict[str, str]:
    """Environment variables that make Ray Serve's HTTP proxy call ``import_path()`` when it starts and wrap
    its ASGI app in the Starlette ``Middleware`` list it returns; pass them as the Serve controller's
    ``runtime_env`` ``env_vars`` (``serve.start(controller_options=...)``), which the proxy actor inherits.
    Empty (and a warning) when this Ray no longer has the setting.

    Why private: Ray Serve 2.60 removed ``HTTPOptions.middlewares``; what is left is the setting
    ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, read into ``ray.serve._private.constants`` when the proxy
    process imports Serve and applied by ``http_util.configure_http_middlewares`` in ``ProxyActor.__init__``.
    The controller options are applied only when the controller is created: on a cluster whose Serve
    instance is already running, the proxy keeps whatever it started with.

    If Ray no longer reads it: a warning, and the proxy answers its own errors as Ray does (text/plain).
    """
    try:
        from ray.serve._private import constants, http_util
        known = hasattr(constants, PROXY_CALLBACK_SETTING) and hasattr(http_util, "configure_http_middlewares")
    except ImportError:
        known = False
    if not known:
        logger.warning("Ray Serve no longer has the proxy callback setting %s: errors that Serve's proxy answers "
                       "itself (a replica that died mid-request) stay text/plain", PROXY_CALLBACK_SETTING)
        return {}
    return {PROXY_CALLBACK_SETTING: import_path}
