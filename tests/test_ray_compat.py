"""The private Ray APIs of ``flotilla.distributed.ray_compat``, checked against the installed Ray.

These fail when Ray changes what flotilla relies on: a local instance started by flotilla must listen on
loopback only (every socket of every Ray process, listed with psutil), and a Serve replica must still bind
its inter-deployment gRPC server through ``ray.serve._private.replica.add_port_to_grpc_server`` with
``"[::]:0"``, which flotilla turns into the node IP; Serve's proxy must still apply the middleware named by
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, so a replica that dies mid-request gives an OpenAI JSON error
(Ray alone answers uvicorn's text/plain 500).
"""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
from ray import serve  # noqa: E402

from flotilla.distributed import ray_compat  # noqa: E402

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listening(procs) -> set[tuple[str, str, int]]:
    """(process name, local IP, port) of every TCP socket those processes listen on."""
    found = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.name(), c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


# ---- without a Ray instance --------------------------------------------------------------------------------
def test_loopback_only_ray_switches_ray_to_single_machine_mode_and_restores_it(monkeypatch):
    from ray._private import ray_constants
    monkeypatch.setenv(ray_compat.RAY_CLUSTER_SWITCH, "1")
    before = ray_constants.ENABLE_RAY_CLUSTER
    with ray_compat.loopback_only_ray():
        assert ray_constants.ENABLE_RAY_CLUSTER is False
        assert os.environ[ray_compat.RAY_CLUSTER_SWITCH] == "0"
        if not ray.is_initialized():  # Ray's own node-IP choice for a new instance now is loopback
            assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert ray_constants.ENABLE_RAY_CLUSTER == before
    assert os.environ[ray_compat.RAY_CLUSTER_SWITCH] == "1"
    monkeypatch.delenv(ray_compat.RAY_CLUSTER_SWITCH)
    with ray_compat.loopback_only_ray():
        pass
    assert ray_compat.RAY_CLUSTER_SWITCH not in os.environ


def test_replica_grpc_wildcard_address_becomes_the_node_ip():
    calls = []

    def original(server, address):
        calls.append((server, address))
        return 40000 + len(calls)

    for host, wanted in (("10.1.2.3", "10.1.2.3"), ("[fd00::7]", "[fd00::7]")):
        calls.clear()
        add_port = ray_compat._node_ip_bind(original, host)
        assert add_port("srv", "[::]:0") == 40001 and calls[-1] == ("srv", f"{wanted}:0")
        add_port("srv", "0.0.0.0:9000")
        assert calls[-1] == ("srv", f"{wanted}:9000")
        add_port("srv", "[::1]:5")  # a specific address passes through
        assert calls[-1] == ("srv", "[::1]:5")
        assert add_port.flotilla_binds == [("[::]:0", f"{wanted}:0", 40001), ("0.0.0.0:9000", f"{wanted}:9000", 40002),
                                           ("[::1]:5", "[::1]:5", 40003)]


# ---- a local instance started by flotilla --------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    """The Ray instance ``connect_ray`` starts without an address (as ``flotilla serve --ray`` does)."""
    from flotilla.deploy.ray_serve import connect_ray
    if ray.is_initialized():  # a connection left by another module would hide this instance
        ray.shutdown()
    assert connect_ray(None, 2) is True
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def test_local_instance_listens_on_loopback_only(local_ray):
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert ray_compat.RAY_CLUSTER_SWITCH not in os.environ  # restored after the start

    @ray.remote(num_cpus=0)
    def node_ip() -> str:
        return ray.util.get_node_ip_address()

    assert ray.get(node_ip.remote(), timeout=120) == "127.0.0.1"  # a worker process is up, on loopback
    found = listening(psutil.Process().children(recursive=True))
    names = {name for name, _, _ in found}
    assert {"gcs_server", "raylet"} <= names, sorted(found)  # the check sees Ray's daemons
    exposed = sorted(x for x in found if x[1] not in LOOPBACK)
    assert not exposed, f"Ray processes listen beyond loopback: {exposed}"


@serve.deployment(ray_actor_options={"num_cpus": 0})
class GrpcProbe:
    """A replica that restricts its gRPC bind as ``ModelServer`` does, and reports what was bound."""

    def __init__(self):
        self.applied = ray_compat.bind_replica_grpc_to_node_ip()

    def report(self) -> dict:
        return {"pid": os.getpid(), "applied": self.applied, "binds": ray_compat.replica_grpc_binds()}


def test_serve_replica_grpc_server_binds_the_node_ip(local_ray):
    from flotilla.deploy.ray_serve import free_port
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    handle = serve.run(GrpcProbe.bind(), name="ray-compat-probe", route_prefix=None)
    try:
        report = handle.report.remote().result(timeout_s=120)
        found = listening([psutil.Process(report["pid"])])  # while the replica is up
    finally:
        serve.delete("ray-compat-probe")
    assert report["applied"], "ray.serve._private.replica.add_port_to_grpc_server is gone"
    binds = [tuple(b) for b in report["binds"]]
    assert len(binds) == 1, f"Serve no longer binds its replica gRPC server through the patched function: {binds}"
    requested, bound, port = binds[0]
    assert requested == "[::]:0", f"Serve now asks for {requested!r}: check the patch still applies"
    assert bound == "127.0.0.1:0" and port > 0
    assert any(ip in LOOPBACK and p == port for _, ip, p in found), (port, sorted(found))
    assert not [x for x in found if x[1] not in LOOPBACK], sorted(found)


# ---- Serve's proxy with flotilla's middleware (``proxy_callback_env``) ---------------------------------------
def _dying_probe():
    """A Serve ingress whose replica process dies mid-request: ``/die`` before answering, ``/stream`` after
    its first server-sent event."""
    import asyncio

    from fastapi import FastAPI
    from starlette.responses import StreamingResponse
    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class DyingProbe:
        @api.get("/die")
        def die(self):
            os._exit(1)

        @api.get("/stream")
        def stream(self):
            async def events():
                yield b'data: {"n": 1}\n\n'
                await asyncio.sleep(0.5)
                os._exit(1)
            return StreamingResponse(events(), media_type="text/event-stream")

    return DyingProbe


def test_serve_proxy_applies_the_callback_so_its_own_errors_are_openai_json(local_ray):
    import json

    import httpx

    from flotilla.deploy.ray_serve import free_port
    from flotilla.entrypoints.openai import ray_proxy
    from flotilla.entrypoints.openai.ray_server import start_serve
    assert ray_compat.proxy_callback_env("x.y") == {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "x.y"}, \
        "Ray Serve no longer has its proxy callback setting"
    serve.shutdown()  # controller options apply when the controller starts
    port = free_port()
    start_serve("127.0.0.1", port)
    serve.run(_dying_probe().bind(), name="ray-compat-proxy", route_prefix="/probe")
    url = f"http://127.0.0.1:{port}"
    try:
        r = httpx.get(url + "/probe/die", timeout=120)  # Ray alone: uvicorn's text/plain 500
        assert r.headers["content-type"] == "application/json", (r.status_code, r.headers, r.text)
        assert r.status_code == 500 and r.json()["error"] == {"message": ray_proxy.FAILED,
                                                             "type": "InternalServerError", "param": None,
                                                             "code": 500}
        r = httpx.get(url + "/probe/stream", timeout=120)  # Ray alone: a stream cut short
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[0] == '{"n": 1}' and events[-1] == "[DONE]", r.text
        assert json.loads(events[-2])["error"]["message"] == ray_proxy.CUT
        r = httpx.get(url + "/-/healthz", timeout=30)  # Serve's own routes are left alone
        assert r.status_code == 200 and not r.headers["content-type"].startswith("application/json")
        r = httpx.get(url + "/nowhere", timeout=30)  # Serve's text/plain 404
        assert r.status_code == 404 and r.json()["error"]["code"] == 404
    finally:
        serve.delete("ray-compat-proxy")
