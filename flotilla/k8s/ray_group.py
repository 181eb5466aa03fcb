"""``python -m flotilla.k8s.ray_group --nodes N [--timeout S] [--address auto]``: wait until the Ray
cluster of a multi-pod group has ``N`` live nodes, so ``flotilla serve`` (started next in the leader pod by
the ``plain`` and ``kserve`` manifests) finds every rank's GPU. Exit code 0 once they have joined, 1 after
``timeout`` seconds (the pod then restarts), 2 for bad arguments."""

from __future__ import annotations

import argparse
import sys
import time


def wait_for_nodes(count: int, timeout_s: float, address: str = "auto", poll_s: float = 2.0,
                   clock=time.monotonic, sleep=time.sleep) -> int:
    """Connect to the cluster at ``address`` and return the number of live nodes once it is >= ``count``;
    ``TimeoutError`` after ``timeout_s``. Disconnects before returning."""
    import ray
    ray.init(address=address, logging_level="warning", log_to_driver=False)
    try:
        deadline = clock() + timeout_s
        while True:
            alive = sum(1 for node in ray.nodes() if node.get("Alive"))
            if alive >= count:
                return alive
            if clock() >= deadline:
                raise TimeoutError(f"{alive} of {count} Ray nodes joined within {timeout_s:g} s")
            sleep(poll_s)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flotilla.k8s.ray_group", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--address", default="auto")
    ns = p.parse_args(argv)
    if ns.nodes < 1 or not ns.timeout > 0:
        print("error: --nodes must be >= 1 and --timeout > 0", file=sys.stderr)
        return 2
    try:
        alive = wait_for_nodes(ns.nodes, ns.timeout, ns.address)
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ray group: {alive} nodes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
