"""Multi-rank executors: rank 0 is the driver worker inside the engine; the other ranks follow it.

The driver sends each call to every rank as one message of ``flotilla.scheduler.wire`` over the control
queues (the scheduler output is already a diff), runs its own share, and collects replies point to point
(``worker_proc`` has the other side). ``MultiprocExecutor`` spawns ranks 1..W-1 as local processes;
``ExternalLauncherExecutor`` joins ranks that torchrun / mpirun / srun started (they run
``worker_proc.run_worker``).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import subprocess
import sys

from flotilla import envs
from flotilla.config import EngineConfig
from flotilla.distributed.control import DriverChannel
from flotilla.distributed.parallel_state import destroy_distributed, get_world_group
from flotilla.distributed.utils import describe_parallel_plan
from flotilla.errors import WORKER_RANK_FAILED, EngineDeadError
from flotilla.executor.base import Executor, StepHandle
from flotilla.scheduler.wire import FROM_WORKER, TO_WORKER, Rpc, RpcResult, Shutdown, Step, StepResult, expect
from flotilla.worker.config_wire import encode_engine_config
from flotilla.scheduler.output import ModelRunnerOutput, SchedulerOutput
from flotilla.worker.worker import Worker
from flotilla.worker.worker_proc import call_worker, join_group, sampler_rank

logger = logging.getLogger(__name__)


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DriverExecutor(Executor):
    """Drives a group of ranks from rank 0 (this process). Subclasses start or find the other ranks.

    Contract: every call reaches every rank in the same order. ``execute_model_async`` returns once rank
    0 has done its share, so with pipeline parallelism up to ``max_concurrent_batches`` steps are in flight
    (stage 0 computes step N+1 while stage 1 computes step N); their results resolve in order. If any rank
    fails, calls raise ``EngineDeadError(WORKER_RANK_FAILED)`` (collectives and replies are bounded by
    ``collective_timeout_s``; the cause, e.g. Gloo's text, is logged, never put in the error) and the
    executor is unusable.
    """

    def __init__(self, config: EngineConfig, init_method: str, host: str = "127.0.0.1"):
        super().__init__(config)
        self.world_size = config.parallel.world_size
        self.sampler_rank = sampler_rank(config)
        self.timeout_s = config.parallel.collective_timeout_s
        self.dead: str | None = None
        join_group(config, 0, init_method)
        self.world = get_world_group()
        self.channel = DriverChannel(self.world, host)
        self.worker = Worker(config, rank=0)
        self.worker.load_model()
        self._pending: collections.deque[StepHandle] = collections.deque()  # owed by the sampler rank
        for line in describe_parallel_plan(config.model.num_layers, config.parallel.tensor_parallel_size,
                                           config.parallel.pipeline_parallel_size,
                                           config.parallel.pipeline_partition):
            logger.info("parallel plan: %s", line)

    @property
    def max_concurrent_batches(self) -> int:
        return self.config.parallel.pipeline_parallel_size

    def workers_alive(self) -> bool:
        return True

    def _check(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)

    def _fail(self, e: BaseException) -> EngineDeadError:
        if self.dead is None:
            logger.error("%s: %s: %s", WORKER_RANK_FAILED, type(e).__name__, e)
            self.dead = WORKER_RANK_FAILED
        return EngineDeadError(self.dead)

    def _recv(self, expected: type):
        """The next reply, which must be an ``expected`` message (anything else is a protocol error)."""
        return expect(FROM_WORKER.decode(self.channel.recv(self.timeout_s, self.workers_alive)), expected)

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        if kwargs:
            raise TypeError("collective_rpc takes positional arguments only (they travel as msgpack)")
        self._check()
        self._drain_pending()
        try:
            rpc = Rpc(method, list(args))
            self.channel.send_all(TO_WORKER.encode(rpc))
            results = {0: call_worker(self.worker, rpc)}
            while len(results) < self.world_size:
                reply = self._recv(RpcResult)
                results[reply.rank] = reply.value
        except Exception as e:  # noqa: BLE001 - a broken group is fatal for this executor
            raise self._fail(e) from e
        return [results[r] for r in range(self.world_size)]

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        self._check()
        try:
            self.channel.send_all(TO_WORKER.encode(Step(scheduler_output)))
            out = self.worker.execute_model(scheduler_output)
        except Exception as e:  # noqa: BLE001
            raise self._fail(e) from e
        if self.sampler_rank == 0:
            return StepHandle.ready(out)
        handle = StepHandle(self._resolve_until)
        self._pending.append(handle)
        return handle

    def _resolve_until(self, handle: StepHandle) -> None:
        """Read the sampler rank's replies, which arrive in step order, until ``handle`` has its own."""
        while not handle.done():
            head = self._pending.popleft()
            try:
                reply = self._recv(StepResult)
            except Exception as e:  # noqa: BLE001
                err = self._fail(e)
                head.set_error(err)
                while self._pending:
                    self._pending.popleft().set_error(err)
                raise err from e
            head.set_result(reply.output)

    def _drain_pending(self) -> None:
        if self._pending:
            self._pending[-1].result()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(scheduler_output).result()

    def shutdown(self) -> None:
        if self.dead is None:
            try:
                self._drain_pending()
                self.channel.send_all(TO_WORKER.encode(Shutdown()))
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        self.channel.close()
        destroy_distributed()


class MultiprocExecutor(DriverExecutor):
    """Spawns ranks 1..W-1 as local worker processes (``python -m flotilla.worker.worker_proc``)."""

    def __init__(self, config: EngineConfig):
        init_method = f"tcp://127.0.0.1:{free_local_port()}"
        wire = encode_engine_config(config)
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, config.parallel.world_size):
            cmd = [sys.executable, "-m", "flotilla.worker.worker_proc", "--rank", str(rank),
                   "--init-method", init_method, "--parent-pid", str(os.getpid())]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
            proc.stdin.write(wire)
            proc.stdin.close()
            self.procs.append(proc)
        try:
            super().__init__(config, init_method)
        except BaseException:
            self._kill_workers()
            raise

    def workers_alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        for proc in self.procs:
            if proc.poll() is not None and self.dead is None:
                logger.error("%s: worker process %d exited with code %s", WORKER_RANK_FAILED, proc.pid,
                             proc.returncode)
                self.dead = WORKER_RANK_FAILED
        return super().execute_model_async(scheduler_output)

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
        info = detect_launch(envs.launcher_environment())
        if info is None or info.rank != 0 or info.world_size != config.parallel.world_size:
            raise EngineDeadError(f"the external executor needs rank 0 of a launcher with world size "
                                  f"{config.parallel.world_size}; found {info}")
        super().__init__(config, info.init_method, host=_local_address_towards(info.master_addr))


def _local_address_towards(master_addr: str) -> str:
    """The local interface address used to reach ``master_addr`` (rank 0 binds its queues there)."""
    if master_addr in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master_addr, 9))  # no packet is sent: this only selects the route
        return s.getsockname()[0]
