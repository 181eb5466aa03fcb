"""The loop of a non-driver rank: receive driver messages over the world CPU group, run them, reply.

Rank 0 (the driver, inside the engine) broadcasts one message per call (``flotilla.scheduler.wire``):
``Step``, ``Rpc`` or ``Shutdown``. Replies go back to rank 0 point to point: an ``RpcResult`` from every rank,
a step's ``StepResult`` only from the sampling rank (the first TP rank of the last pipeline stage) when that
is not rank 0. Started as ``python -m flotilla.worker.worker_proc`` (the mp executor, which writes the
engine config to its stdin: ``flotilla.worker.config_wire``), or called in-process by an external launcher
(torchrun/mpirun/srun) on ranks > 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from flotilla import envs
from flotilla.config import EngineConfig
from flotilla.distributed.parallel_state import (destroy_distributed, get_pp_group, get_tp_group,
                                                 get_world_group, init_distributed)
from flotilla.worker.config_wire import decode_engine_config
from flotilla.procutil import exit_with_parent
from flotilla.distributed.control import WorkerChannel
from flotilla.scheduler.wire import FROM_WORKER, TO_WORKER, Rpc, RpcResult, Shutdown, Step, StepResult
from flotilla.worker.worker import Worker

logger = logging.getLogger(__name__)


def sampler_rank(config: EngineConfig) -> int:
    """Global rank that samples: TP rank 0 of the last pipeline stage."""
    p = config.parallel
    return (p.pipeline_parallel_size - 1) * p.tensor_parallel_size


def join_group(config: EngineConfig, rank: int, init_method: str) -> None:
    p = config.parallel
    init_distributed(p.world_size, rank, p.tensor_parallel_size, p.pipeline_parallel_size,
                     backend=p.distributed_backend, init_method=init_method, timeout_s=p.collective_timeout_s,
                     device=config.device.device)


def serve_driver(worker: Worker, config: EngineConfig) -> None:
    """Run driver messages until shutdown (or until the group breaks: the exception ends the process)."""
    world = get_world_group()
    me = world.rank_in_group
    samples = me == sampler_rank(config)
    channel = WorkerChannel(world)
    try:
        while True:
            msg = TO_WORKER.decode(channel.recv())
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, Step):
                out = worker.execute_model(msg.scheduler_output)
                if samples:
                    channel.send(FROM_WORKER.encode(StepResult(out)))
            elif isinstance(msg, Rpc):
                channel.send(FROM_WORKER.encode(RpcResult(me, call_worker(worker, msg))))
    finally:
        channel.close()


def call_worker(worker: Worker, rpc: Rpc):
    """Run an ``Rpc`` on this rank's Worker: public methods only."""
    if rpc.method.startswith("_"):
        raise AttributeError(f"refusing to call private Worker method {rpc.method!r}")
    return getattr(worker, rpc.method)(*rpc.args)


def run_worker(config: EngineConfig, rank: int, init_method: str) -> int:
    """Join the group as ``rank``, load this rank's shard and serve the driver; returns an exit code."""
    join_group(config, rank, init_method)
    try:
        worker = Worker(config, rank=rank)
        worker.load_model()
        logger.info("rank %d ready (tp %d/%d, pp %d/%d)", rank, get_tp_group().rank_in_group,
                    get_tp_group().world_size, get_pp_group().rank_in_group, get_pp_group().world_size)
        serve_driver(worker, config)
        return 0
    finally:
        destroy_distributed()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="flotilla worker rank (started by the mp executor)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--init-method", required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ns = ap.parse_args(argv)
    exit_with_parent(ns.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=envs.log_level(), format=f"%(levelname)s %(name)s [rank {ns.rank}]: %(message)s")
    config = decode_engine_config(sys.stdin.buffer.read())
    try:
        return run_worker(config, ns.rank, ns.init_method)
    except Exception as e:  # noqa: BLE001 - a broken group or failed load ends this rank with a message
        logger.error("rank %d stopped: %s: %s", ns.rank, type(e).__name__, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
