"""The executor interface: how the engine drives its workers (one in-process, or many processes)."""

from __future__ import annotations

import abc
from collections.abc import Callable

from flotilla.config import EngineConfig
from flotilla.scheduler.output import ModelRunnerOutput, SchedulerOutput


class StepHandle:
    """The result of one ``execute_model_async`` call: available now, or fetched on ``result()``.

    Contract: ``result()`` returns the step's ModelRunnerOutput (or raises the executor's error); handles
    of one executor resolve in the order their steps were submitted.
    """

    def __init__(self, resolve: Callable[["StepHandle"], None] | None = None):
        self._resolve = resolve
        self._done = False
        self._value: ModelRunnerOutput | None = None
        self._error: BaseException | None = None

    @classmethod
    def ready(cls, value: ModelRunnerOutput) -> "StepHandle":
        handle = cls()
        handle.set_result(value)
        return handle

    def done(self) -> bool:
        return self._done

    def set_result(self, value: ModelRunnerOutput) -> None:
        self._value, self._done = value, True

    def set_error(self, error: BaseException) -> None:
        self._error, self._done = error, True

    def result(self) -> ModelRunnerOutput:
        if not self._done and self._resolve is not None:
            self._resolve(self)
        if self._error is not None:
            raise self._error
        return self._value


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

    @property
    def max_concurrent_batches(self) -> int:
        """How many steps may be in flight at once (the pipeline depth; 1 without pipeline parallelism)."""
        return 1

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Submit a step; the default runs it to completion now."""
        return StepHandle.ready(self.execute_model(scheduler_output))

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
