"""The inference service the KServe v2 / Open Inference Protocol layer talks to (HTTP and gRPC alike).

``entrypoints/kserve`` depends only on these two protocols; the model repository manager implements them for
repository models (ONNX, PyTorch programs, Python models, ensembles), and adapters implement ``ServedModel``
for the engine's LLMs and embedding models, so every model in one ``flotilla serve`` answers ``/v2``.

Contracts:
- Every failure is an ``InferError`` (Triton's status code name + Triton's message text): NOT_FOUND for an
  unknown model or version, UNAVAILABLE for a model that is not ready or a full queue, INVALID_ARG for a bad
  request. The protocol layer maps ``code`` to the HTTP status / gRPC code and never invents messages.
- Tensors are numpy arrays; BYTES tensors are numpy object arrays of ``bytes`` (see ``repository.dtypes``).
  For a model with ``max_batch_size > 0`` the first dimension of every input and output is the batch.
- ``version`` is a string as in the protocol ("" or None: the model's version policy picks the latest ready).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Protocol, Sequence

import numpy as np

from flotilla.repository.config import ModelConfig


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output as v2 metadata shows it: ``datatype`` a v2 name ("FP32", "BYTES"), ``shape`` with
    -1 for variable dimensions and the batch dimension first (as -1) when the model batches."""
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """v2 model metadata (``GET /v2/models/{m}[/versions/{v}]``)."""
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True)
class RepositoryEntry:
    """One row of the repository index: ``state`` is READY, UNAVAILABLE, LOADING or UNLOADING (Triton's)."""
    name: str
    version: str = ""
    state: str = ""
    reason: str = ""


@dataclass
class InferOutcome:
    """A request's outputs, plus response ``parameters`` (v2 allows them; Triton's python backend sets them)."""
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)


class ServedModel(Protocol):
    """One version of one model, ready to serve.

    Optional members (callers use ``getattr``): ``infer_stream(inputs, **same keywords as infer)``, an async
    iterator of ``InferOutcome``s, one per response, for a decoupled model (``model_transaction_policy
    { decoupled: true }``: the LLMs, and ensembles with such a step); ``pending_request_count()``, the requests
    accepted and not yet executing (Triton's ``nv_inference_pending_request_count``)."""

    name: str
    version: str

    def metadata(self) -> ModelMetadata: ...

    def config(self) -> ModelConfig:
        """The effective (auto-completed) configuration, as ``GET .../config`` and gRPC ModelConfig return it."""

    def ready(self) -> bool: ...

    async def infer(self, inputs: Mapping[str, np.ndarray], *, requested_outputs: Sequence[str] = (),
                    parameters: Mapping[str, Any] | None = None, priority: int = 0,
                    timeout_us: int = 0) -> InferOutcome: ...

    def statistics(self) -> dict[str, Any]:
        """Triton's ``ModelStatistics`` as its JSON form (``name``, ``version``, ``last_inference``,
        ``inference_count``, ``execution_count``, ``inference_stats`` {success, fail, queue, compute_input,
        compute_infer, compute_output: {count, ns}}, ``batch_stats`` [{batch_size, compute_infer: {count, ns}}])."""

    def generate(self, text_input: str, parameters: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Triton's generate extension (LLMs only; others raise InferError UNSUPPORTED): yields dicts with
        ``text_output`` (the new text of each step when streaming) and the request's ``model_name`` etc."""


class InferenceService(Protocol):
    """Every model of one server, and the repository API."""

    def live(self) -> bool: ...

    def ready(self) -> bool:
        """True when every model that should be loaded is ready (Triton's strict readiness)."""

    def server_metadata(self) -> dict[str, Any]:
        """``{"name": "flotilla", "version": ..., "extensions": [...]}``."""

    def model(self, name: str, version: str | None = None) -> ServedModel:
        """The ready model version; InferError NOT_FOUND / UNAVAILABLE otherwise."""

    def model_versions(self, name: str) -> Sequence[str]: ...

    def index(self, ready_only: bool = False) -> list[RepositoryEntry]: ...

    async def load(self, name: str, config: str | None = None, files: Mapping[str, bytes] | None = None) -> None:
        """Load or reload ``name`` (explicit model control; ``config`` a JSON override, ``files`` "file:<path>"
        contents as in Triton's load API). Requests in flight on an old version finish on it."""

    async def unload(self, name: str, unload_dependents: bool = False) -> None: ...
