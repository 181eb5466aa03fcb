"""The in-process executor: one worker, no process group (the default for TP = PP = 1)."""

from __future__ import annotations

from flotilla.config import EngineConfig
from flotilla.executor.base import Executor
from flotilla.scheduler.output import ModelRunnerOutput, SchedulerOutput
from flotilla.worker.worker import Worker


class UniProcExecutor(Executor):
    """Runs the single worker in the engine's own process."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.worker = Worker(config, rank=0)
        self.worker.load_model()

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        return [getattr(self.worker, method)(*args, **kwargs)]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)
