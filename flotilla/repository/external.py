"""Models served next to the repository (the server's LLMs and embedding models) as ensemble steps.

The layer above (``entrypoints/kserve``) hands the repository the ``ServedModel``s of its engines with
``ModelRepository.set_external_models``; an ensemble step may then name one of them, so a Triton-style LLM
pipeline (a Python pre-processing model -> the LLM -> a Python post-processing model) runs as one ensemble.

Contracts:
- ``ExternalStep(model)`` gives such a ``ServedModel`` the interface ensemble steps call: ``config()``,
  ``infer_timed(...)`` -> (InferOutcome, StepTimes) and, for a decoupled model (an LLM), ``infer_stream(...)``
  yielding one ``InferOutcome`` per response. The step's whole duration counts as compute (an engine's own
  queueing happens inside it); the model's statistics stay its own.
- ``is_decoupled(config)``: the config's ``model_transaction_policy.decoupled``.
- An external model has the single version 1 (``EXTERNAL_VERSION``).
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Mapping, Sequence

import numpy as np

from flotilla.repository.config import ModelConfig
from flotilla.repository.served import StepTimes
from flotilla.repository.service import InferOutcome

EXTERNAL_VERSION = 1


def is_decoupled(config: ModelConfig | None) -> bool:
    return config is not None and bool(config.model_transaction_policy.decoupled)


class ExternalStep:
    """One external ``ServedModel`` as an ensemble step (see the module contract)."""

    def __init__(self, model):
        self.model = model
        self.name, self.version = model.name, str(EXTERNAL_VERSION)

    def config(self) -> ModelConfig:
        return self.model.config()

    async def infer_timed(self, inputs: Mapping[str, np.ndarray], *, requested_outputs: Sequence[str] = (),
                          parameters: Mapping[str, Any] | None = None, priority: int = 0,
                          timeout_us: int = 0) -> tuple[InferOutcome, StepTimes]:
        start = time.perf_counter()
        outcome = await self.model.infer(inputs, requested_outputs=requested_outputs, parameters=parameters,
                                         priority=priority, timeout_us=timeout_us)
        return outcome, StepTimes(compute_infer_s=time.perf_counter() - start)

    async def infer_stream(self, inputs: Mapping[str, np.ndarray], *, requested_outputs: Sequence[str] = (),
                           parameters: Mapping[str, Any] | None = None, priority: int = 0,
                           timeout_us: int = 0) -> AsyncIterator[InferOutcome]:
        """The model's responses one by one (a model that does not stream answers once)."""
        stream = getattr(self.model, "infer_stream", None)
        if stream is None:
            yield await self.model.infer(inputs, requested_outputs=requested_outputs, parameters=parameters,
                                         priority=priority, timeout_us=timeout_us)
            return
        async for outcome in stream(inputs, requested_outputs=requested_outputs, parameters=parameters,
                                    priority=priority, timeout_us=timeout_us):
            yield outcome
