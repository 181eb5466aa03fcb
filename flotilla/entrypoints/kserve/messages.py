"""Metadata, configuration, statistics and repository index as v2 HTTP JSON and as gRPC messages.

Both protocols answer from the same service calls; these pure functions give the two shapes:
- server metadata ``{"name", "version", "extensions"}``; model metadata ``{"name", "versions", "platform",
  "inputs": [{"name", "datatype", "shape"}], "outputs": [...]}``;
- model configuration as Triton's JSON: proto field names, every field with its default, int64 values as JSON
  numbers (protobuf's JSON would quote them); over gRPC the ``ModelConfig`` message itself;
- statistics ``{"model_stats": [ModelStatistics JSON]}`` (``ServedModel.statistics()`` gives each entry);
- the repository index, entries with ``name`` and, when known, ``version``, ``state``, ``reason``.
"""

from __future__ import annotations

from typing import Any, Iterable

from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

from flotilla.entrypoints.kserve.infer_call import parse_version
from flotilla.repository.backends.python_backend import config_dict
from flotilla.repository.config import ModelConfig
from flotilla.repository.errors import InferError
from flotilla.repository.service import InferenceService, ModelMetadata, RepositoryEntry

def server_metadata_pb(metadata: dict) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=metadata.get("name", ""), version=metadata.get("version", ""),
                                     extensions=list(metadata.get("extensions", ())))


def model_metadata_json(meta: ModelMetadata) -> dict:
    def tensors(items):
        return [{"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]} for t in items]
    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)}


def model_metadata_pb(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    def tensors(items):
        return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
                for t in items]
    return pb.ModelMetadataResponse(name=meta.name, versions=list(meta.versions), platform=meta.platform,
                                    inputs=tensors(meta.inputs), outputs=tensors(meta.outputs))


def config_json(config: ModelConfig) -> dict:
    """Triton's JSON form of a model configuration (see the module contract)."""
    return config_dict(config)


def model_statistics(service: InferenceService, name: str = "", version: str | None = None) -> list[dict]:
    """Triton's ``model_stats`` entries: one model version, every ready version of one model (no version),
    or every ready model version of the server (no name). Raises InferError for an unknown model/version."""
    if name:
        version = parse_version(version)
        if version is not None:
            return [service.model(name, version).statistics()]
        versions = [e.version for e in service.index(ready_only=True) if e.name == name and e.version]
        if not versions:
            return [service.model(name).statistics()]      # NOT_FOUND / UNAVAILABLE from the service
        return [service.model(name, v).statistics() for v in versions]
    stats = []
    for entry in service.index(ready_only=True):
        try:
            stats.append(service.model(entry.name, entry.version or None).statistics())
        except InferError:          # unloaded between the index and now
            continue
    return stats


def statistics_pb(stats: Iterable[dict]) -> pb.ModelStatisticsResponse:
    response = pb.ModelStatisticsResponse()
    json_format.ParseDict({"model_stats": list(stats)}, response)
    return response


def index_json(entries: Iterable[RepositoryEntry]) -> list[dict]:
    out = []
    for e in entries:
        row: dict[str, Any] = {"name": e.name}
        for key in ("version", "state", "reason"):
            if getattr(e, key):
                row[key] = getattr(e, key)
        out.append(row)
    return out


def index_pb(entries: Iterable[RepositoryEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(models=[
        pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
        for e in entries])
