"""The Ray Serve ingress <-> replica messages of repository models and embedding models (``flotilla.wire``:
typed msgpack bytes, never pickle). The generative models' messages are ``serve_wire``'s.

Repository models (``RepositoryModelServer``, ``flotilla.deploy.ray_replicas``):
- ``infer(InferMessage bytes)`` -> ``InferReply`` (the version that served, its outputs and response
  parameters) or ``InferFailure`` (Triton's status code name and message, exactly as the replica's
  ``ModelRepository`` raised it), both as ``INFER_RESULT`` bytes.
- ``info()`` -> ``ModelInfo`` bytes: the replica's index rows of its model, and per loaded version its
  readiness, v2 metadata, effective config (the serialized ``ModelConfig``) and Triton statistics.

Embedding models (``EmbeddingServer``): ``embed(EmbedMessage bytes)`` -> ``EmbedReply`` (one float32 row per
input, little-endian, row-major) or ``EmbedFailure`` as ``EMBED_RESULT`` bytes.

Tensors travel as ``WireTensor``: a v2 datatype, a shape and either the row-major little-endian bytes of a
fixed-size type or, for BYTES, the list of elements. ``tensor_from_wire`` checks the size against the shape
(``WireError`` otherwise), so a replica never builds an array from a malformed message.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flotilla.repository import dtypes
from flotilla.wire import Codec, WireError, WireStruct

Scalar = bool | int | float | str


class WireTensor(WireStruct):
    """One tensor: ``datatype`` a v2 name (``FP32``, ``BYTES``, ...), ``shape`` its dimensions, ``data`` the
    row-major little-endian bytes of a fixed-size type (BOOL: one byte per element), ``elements`` the
    row-major elements of a BYTES tensor."""

    name: str
    datatype: str
    shape: list[int]
    data: bytes = b""
    elements: list[bytes] = []


class InferMessage(WireStruct):
    """Ingress -> repository replica: one inference request, decoded and checked by the ingress's codec.

    ``version``: "" for the model's latest ready version (the version policy's pick, resolved in the replica);
    ``requested_outputs``: output names (empty: every output); ``parameters``: the request parameters the
    model receives (Triton's reserved ones already applied); ``priority`` / ``timeout_us``: for the batcher.
    """

    model: str
    version: str
    inputs: list[WireTensor]
    requested_outputs: list[str] = []
    parameters: dict[str, Scalar] = {}
    priority: int = 0
    timeout_us: int = 0


class InferReply(WireStruct, tag="ok"):
    """Repository replica -> ingress: ``version`` served the request; ``parameters`` are the response's."""

    version: str
    outputs: list[WireTensor]
    parameters: dict[str, Any] = {}


class InferFailure(WireStruct, tag="error"):
    """Repository replica -> ingress: the request failed with Triton's ``code`` (``INVALID_ARG``,
    ``NOT_FOUND``, ``UNAVAILABLE``, ...) and ``message``."""

    code: str
    message: str


class TensorInfo(WireStruct):
    """One input or output as v2 metadata shows it (batch dimension first as -1 when the model batches)."""

    name: str
    datatype: str
    shape: list[int]


class VersionInfo(WireStruct):
    """One loaded version in a replica: ``ready`` (admitting requests), ``platform``, inputs and outputs as
    v2 metadata, ``config`` the effective ``ModelConfig`` serialized, ``statistics`` Triton's
    ``ModelStatistics`` JSON of this replica, ``pending`` the requests in its batcher's queue now."""

    version: str
    ready: bool
    platform: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    config: bytes
    statistics: dict[str, Any]
    pending: int = 0


class IndexRow(WireStruct):
    """One repository index row of the replica's model (``state`` READY, UNAVAILABLE, LOADING, UNLOADING or
    "" when not loaded; ``reason`` why it is unavailable)."""

    version: str = ""
    state: str = ""
    reason: str = ""


class ModelInfo(WireStruct):
    """Repository replica -> ingress: what the replica serves of its model (``name``)."""

    name: str
    replica_id: str
    rows: list[IndexRow]
    versions: list[VersionInfo]


class EmbedMessage(WireStruct):
    """Ingress -> embedding replica: inputs already tokenized and checked by the ingress, with one set of
    pooling parameters (``dimensions``: Matryoshka truncation, ``normalize``: None for the model's default)."""

    token_ids: list[list[int]]
    dimensions: int | None = None
    normalize: bool | None = None


class EmbedReply(WireStruct, tag="ok"):
    """Embedding replica -> ingress: ``dim`` values per input, all rows as float32 little-endian bytes."""

    dim: int
    data: bytes


class EmbedFailure(WireStruct, tag="error"):
    """Embedding replica -> ingress: ``kind`` is ``invalid`` (the request's fault: a 400 naming ``param``),
    ``dead`` (the replica's model stopped) or ``failed`` (a forward pass failed); ``message`` plain words."""

    kind: str
    message: str
    param: str | None = None


INFER_MESSAGE: Codec[InferMessage] = Codec(InferMessage, "repository infer request")
INFER_RESULT: Codec[InferReply | InferFailure] = Codec(InferReply | InferFailure, "repository infer result")
MODEL_INFO: Codec[ModelInfo] = Codec(ModelInfo, "repository model info")
EMBED_MESSAGE: Codec[EmbedMessage] = Codec(EmbedMessage, "embedding request")
EMBED_RESULT: Codec[EmbedReply | EmbedFailure] = Codec(EmbedReply | EmbedFailure, "embedding result")


def tensor_to_wire(name: str, array: np.ndarray) -> WireTensor:
    """``array`` (any v2 type's numpy form: BYTES as an object array of bytes/str) as a ``WireTensor``."""
    array = np.asarray(array)
    kind = dtypes.from_numpy(array.dtype)
    shape = [int(d) for d in array.shape]
    if kind.is_bytes:
        return WireTensor(name, kind.v2_name, shape, elements=list(dtypes.as_bytes_array(array).reshape(-1)))
    array = np.ascontiguousarray(array)
    if kind.itemsize > 1 and array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return WireTensor(name, kind.v2_name, shape, data=array.tobytes())


def tensor_from_wire(tensor: WireTensor) -> np.ndarray:
    """The numpy array of ``tensor``; ``WireError`` when its datatype is unknown or its size does not match
    its shape."""
    try:
        kind = dtypes.from_v2(tensor.datatype)
    except ValueError:
        raise WireError(f"tensor '{tensor.name}': unknown datatype {tensor.datatype!r}") from None
    if any(d < 0 for d in tensor.shape):
        raise WireError(f"tensor '{tensor.name}': negative dimension in shape {tensor.shape}")
    count = math.prod(tensor.shape)
    if kind.is_bytes:
        if len(tensor.elements) != count:
            raise WireError(f"tensor '{tensor.name}': {len(tensor.elements)} elements for shape {tensor.shape}")
        out = np.empty(count, dtype=np.object_)
        out[:] = list(tensor.elements)
        return out.reshape(tensor.shape)
    if len(tensor.data) != count * kind.itemsize:
        raise WireError(f"tensor '{tensor.name}': {len(tensor.data)} bytes for shape {tensor.shape} of "
                        f"{kind.v2_name}")
    if kind.v2_name == "BOOL":
        return (np.frombuffer(tensor.data, dtype=np.uint8) != 0).reshape(tensor.shape)
    return np.frombuffer(tensor.data, dtype=kind.numpy).copy().reshape(tensor.shape)
