"""A local two-node Ray cluster on loopback for tests (test_ray_executor, test_ray_serve)."""

from __future__ import annotations

import contextlib

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def loopback_cluster(num_cpus: int):
    """Two nodes of ``num_cpus`` logical CPUs each, dashboard off, on loopback only; shut down on exit.

    On Linux Ray rewrites a loopback address to the host's routable one; flotilla's ``loopback_only_ray``
    (Ray's single-machine mode, as on macOS) keeps the nodes and this test process's connection on
    127.0.0.1, so nothing listens beyond loopback.
    """
    import ray
    from ray.cluster_utils import Cluster

    from flotilla.distributed.ray_compat import loopback_only_ray
    if ray.is_initialized():  # a connection left by another module would hide this cluster
        ray.shutdown()
    with loopback_only_ray():
        node = {"num_cpus": num_cpus, "include_dashboard": False, "node_ip_address": LOOPBACK}
        cluster = Cluster(initialize_head=True, head_node_args=node)
        try:
            cluster.add_node(**node)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
