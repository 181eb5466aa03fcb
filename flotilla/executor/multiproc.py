"""Multi-rank executors: rank 0 is the driver worker inside the engine; the other ranks follow it.

The driver broadcasts each call as one msgpack message over the world CPU group (the scheduler output is
already a diff), runs its own share, and collects replies point to point (``worker_proc`` has the other
side). ``MultiprocExecutor`` spawns ranks 1..W-1 as local processes; ``ExternalLauncherExecutor`` joins
ranks that torchrun / mpirun / srun started (they run ``worker_proc.run_worker``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

from flotilla.config import EngineConfig
from flotilla.distributed.parallel_state import destroy_distributed, get_world_group
from flotilla.errors import EngineDeadError
from flotilla.executor.base import Executor
from flotilla.executor.config_wire import engine_config_to_wire
from flotilla.executor.serial import pack, runner_output_from_wire, scheduler_output_to_wire, unpack
from flotilla.scheduler.output import ModelRunnerOutput, SchedulerOutput
from flotilla.worker.worker import Worker
from flotilla.worker.worker_proc import join_group, sampler_rank

logger = logging.getLogger(__name__)


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DriverExecutor(Executor):
    """Drives a group of ranks from rank 0 (this process). Subclasses start or find the other ranks.

    Contract: every call reaches every rank in the same order; if any rank fails, the call raises
    ``EngineDeadError`` (collectives are bounded by ``collective_timeout_s``) and the executor is unusable.
    """

    def __init__(self, config: EngineConfig, init_method: str):
        super().__init__(config)
        self.world_size = config.parallel.world_size
        self.sampler_rank = sampler_rank(config)
        self.dead: str | None = None
        join_group(config, 0, init_method)
        self.world = get_world_group()
        self.worker = Worker(config, rank=0)
        self.worker.load_model()

    def _check(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)

    def _fail(self, e: BaseException) -> EngineDeadError:
        self.dead = f"a worker rank failed: {type(e).__name__}: {e}"
        logger.error(self.dead)
        return EngineDeadError(self.dead)

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        if kwargs:
            raise TypeError("collective_rpc takes positional arguments only (they travel as msgpack)")
        self._check()
        try:
            self.world.broadcast_bytes(pack("rpc", {"method": method, "args": list(args)}), src=0)
            results = [getattr(self.worker, method)(*args)]
            for rank in range(1, self.world_size):
                results.append(unpack(self.world.recv_bytes(src=rank))[1])
        except Exception as e:  # noqa: BLE001 - a broken group is fatal for this executor
            raise self._fail(e) from e
        return results

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._check()
        try:
            self.world.broadcast_bytes(pack("step", scheduler_output_to_wire(scheduler_output)), src=0)
            out = self.worker.execute_model(scheduler_output)
            if self.sampler_rank != 0:
                out = runner_output_from_wire(unpack(self.world.recv_bytes(src=self.sampler_rank))[1])
        except Exception as e:  # noqa: BLE001
            raise self._fail(e) from e
        return out

    def shutdown(self) -> None:
        if self.dead is None:
            try:
                self.world.broadcast_bytes(pack("shutdown", {}), src=0)
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        destroy_distributed()


class MultiprocExecutor(DriverExecutor):
    """Spawns ranks 1..W-1 as local worker processes (``python -m flotilla.worker.worker_proc``)."""

    def __init__(self, config: EngineConfig):
        init_method = f"tcp://127.0.0.1:{free_local_port()}"
        wire = json.dumps(engine_config_to_wire(config))
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, config.parallel.world_size):
            cmd = [sys.executable, "-m", "flotilla.worker.worker_proc", "--rank", str(rank),
                   "--init-method", init_method, "--parent-pid", str(os.getpid())]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, text=True)
            proc.stdin.write(wire + "\n")
            proc.stdin.close()
            self.procs.append(proc)
        try:
            super().__init__(config, init_method)
        except BaseException:
            self._kill_workers()
            raise

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for proc in self.procs:
            if proc.poll() is not None and self.dead is None:
                self.dead = f"worker process {proc.pid} exited with code {proc.returncode}"
        return super().execute_model(scheduler_output)

    def shutdown(self) -> None:
        super().shutdown()
        self._kill_workers(grace_s=5.0)

    def _kill_workers(self, grace_s: float = 0.0) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout=grace_s) if grace_s else None
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class ExternalLauncherExecutor(DriverExecutor):
    """Rank 0 of a group started by torchrun / mpirun / srun; the environment says where to meet."""

    def __init__(self, config: EngineConfig):
        from flotilla.distributed.launch import detect_launch
        info = detect_launch(os.environ)
        if info is None or info.rank != 0 or info.world_size != config.parallel.world_size:
            raise EngineDeadError(f"the external executor needs rank 0 of a launcher with world size "
                                  f"{config.parallel.world_size}; found {info}")
        super().__init__(config, info.init_method)
