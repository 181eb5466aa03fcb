"""The executor interface: how the engine drives its workers (one in-process, or many processes)."""

from __future__ import annotations

import abc

from flotilla.config import EngineConfig
from flotilla.scheduler.output import ModelRunnerOutput, SchedulerOutput


class Executor(abc.ABC):
    """Drives every rank of one model replica.

    Contract: ``execute_model`` runs one step on all ranks and returns rank 0's sampled tokens;
    ``collective_rpc(method, *args)`` calls a Worker method on every rank and returns their results in
    rank order. ``determine_num_blocks`` returns the minimum over ranks.
    """

    def __init__(self, config: EngineConfig):
        self.config = config

    @abc.abstractmethod
    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        ...

    @abc.abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        ...

    def determine_num_blocks(self) -> int:
        return min(self.collective_rpc("determine_num_blocks"))

    def initialize_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_cache", num_blocks)

    def shutdown(self) -> None:
        """Release workers (no-op in-process)."""

    @staticmethod
    def get_class(config: EngineConfig) -> type["Executor"]:
        kind = config.parallel.resolved_executor
        if kind == "uni":
            from flotilla.executor.uniproc import UniProcExecutor
            return UniProcExecutor
        if kind == "mp":
            from flotilla.executor.multiproc import MultiprocExecutor
            return MultiprocExecutor
        if kind == "external":
            from flotilla.executor.multiproc import ExternalLauncherExecutor
            return ExternalLauncherExecutor
        from flotilla.executor.ray_executor import RayExecutor
        return RayExecutor
