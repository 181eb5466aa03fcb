"""One model version's instances: every ``instance_group`` instance loaded through ``backends.load_backend``, and
each wrapped as the dynamic batcher's ``BatchExecutor``.

Contracts:
- ``load_instances(config, version_dir)`` loads ``instance_specs(config)`` instances in order (blocking: call
  it in a worker thread). If one fails, the ones already loaded are finalized and the ``ModelLoadError`` (or
  ``ModelConfigError``) is re-raised: a failed load leaves nothing behind.
- ``executor_for(backend)``: tensor backends (onnxruntime, PyTorch) get the batcher's ``TensorExecutor``
  (requests concatenated along the batch dimension, ragged inputs padded, outputs split back); backends that
  receive requests (python) get ``RequestsExecutor``: the batch's requests go to ``execute_requests`` as they
  arrived, each response's error fails its request alone and its parameters reach the client. Both report
  Triton's compute input / infer / output times.
- ``finalize_all(instances)`` finalizes every instance, each even if another fails (errors are logged).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from flotilla.repository.backends import Backend, BackendRequest, instance_specs, load_backend
from flotilla.repository.config import ModelConfig
from flotilla.repository.dynamic_batcher import BatchExecutor, Executed, InferRequest, TensorExecutor

logger = logging.getLogger(__name__)


def load_instances(config: ModelConfig, version_dir: Path | str) -> list[Backend]:
    """Every instance of the model version in ``version_dir`` (see the module contract)."""
    instances: list[Backend] = []
    try:
        for index in range(len(instance_specs(config))):
            instances.append(load_backend(config, str(version_dir), index))
    except BaseException:
        finalize_all(instances)
        raise
    return instances


def finalize_all(instances: Sequence[Backend]) -> None:
    for backend in instances:
        try:
            backend.finalize()
        except Exception:  # noqa: BLE001 - finalize the others; the backend contract says it never raises
            logger.exception("finalizing an instance of model '%s' failed", backend.name)


class RequestsExecutor:
    """A backend that receives the client requests (python): one ``execute_requests`` call per batch."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def execute(self, requests: Sequence[InferRequest]) -> list[Executed | BaseException]:
        t0 = time.perf_counter()
        backend_requests = [BackendRequest(r.inputs, r.requested_outputs, request_id=str(r.id),
                                           parameters=r.parameters) for r in requests]
        t1 = time.perf_counter()
        responses = self.backend.execute_requests(backend_requests)
        t2 = time.perf_counter()
        if len(responses) != len(requests):
            raise RuntimeError(f"model '{self.backend.name}' returned {len(responses)} responses for "
                               f"{len(requests)} requests")
        results: list[Executed | BaseException] = []
        for response in responses:
            if response.error is not None:
                results.append(response.error)
            else:
                results.append(Executed(response.outputs, dict(response.parameters), t1 - t0, t2 - t1, 0.0))
        return results


def executor_for(backend: Backend) -> BatchExecutor:
    """The batcher's executor of one instance (see the module contract)."""
    if backend.receives_requests:
        return RequestsExecutor(backend)
    return TensorExecutor(backend.io, backend.execute)
