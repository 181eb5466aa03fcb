"""Run a function on N local ranks over Gloo: for tests and benchmarks of the parallel layers and models.

    results = run_ranks(my_check, tp_size=2, pp_size=1, args=(path,), timeout_s=120)

Each rank is a fresh ``spawn``-ed process (no inherited state) that joins a process group on a free
127.0.0.1 port, installs its TP/PP groups with ``init_distributed``, calls ``fn(rank, *args)`` and sends
the (picklable) result back, pickled to bytes, over a local multiprocessing queue. Everything is bounded: a rank that fails
makes ``run_ranks`` raise with that rank's traceback, and no process outlives the call.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, tp_size: int, pp_size: int, init_method: str, args: tuple,
               results, timeout_s: float) -> None:
    import torch

    from flotilla.distributed.parallel_state import destroy_distributed, init_distributed
    torch.set_num_threads(1)
    try:
        init_distributed(tp_size * pp_size, rank, tp_size, pp_size, backend="gloo", init_method=init_method,
                         timeout_s=timeout_s)
        # Plain pickle (a copy): torch's queue reductions would share tensor storage through a file
        # descriptor served by this process, which may have exited before the parent reads the result.
        results.put((rank, True, pickle.dumps(fn(rank, *args))))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        destroy_distributed()


def run_ranks(fn: Callable[..., Any], tp_size: int, pp_size: int = 1, args: tuple = (),
              timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``tp_size * pp_size`` spawned ranks; return results in rank order.

    ``fn`` must be importable by module path (a module-level function). Raises RuntimeError with the
    failing rank's traceback if any rank raises or exits without a result, TimeoutError if the ranks do
    not all finish within ``timeout_s``; the processes are terminated in every case.
    """
    world = tp_size * pp_size
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(fn, r, tp_size, pp_size, init_method, args, results,
                                                  min(timeout_s, 60.0)), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = _collect(procs, results, world, time.monotonic() + timeout_s)
    except BaseException:
        _reap(procs, grace_s=1.0)  # the others may be blocked in a collective with the failed rank
        raise
    _reap(procs)
    return out


def _collect(procs, results, world: int, deadline: float) -> list[Any]:
    out: dict[int, Any] = {}
    while len(out) < world:
        try:
            rank, ok, value = results.get(timeout=0.5)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode is not None]
            if dead:
                raise RuntimeError(f"rank(s) {dead} exited (codes {[procs[r].exitcode for r in dead]}) "
                                   f"without a result") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(out))} did not finish in time") \
                    from None
            continue
        if not ok:
            raise RuntimeError(f"rank {rank} failed:\n{value}")
        out[rank] = pickle.loads(value)
    return [out[r] for r in range(world)]


def _reap(procs, grace_s: float = 10.0) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
