"""The hardware YAML's schema (pydantic, strict, unknown keys refused) and its translation to ``Hardware``
(units: GB, GB/s, TFLOPS, microseconds, milliseconds, as datasheets give them; see
``flotilla.planner.hardware``)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flotilla.planner.hardware import GB, Hardware, Link, Overheads

DTYPES = ("float32", "bfloat16", "float16", "int8")


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class _Device(_Section):
    memory_gb: float = Field(gt=0)
    memory_bandwidth_gbps: float = Field(gt=0)
    tflops: dict[Literal[DTYPES], float]


class _Link(_Section):
    bandwidth_gbps: float = Field(gt=0)
    latency_us: float = Field(ge=0)


class _Links(_Section):
    intra_node: _Link
    inter_node: Optional[_Link] = None


class _Efficiency(_Section):
    matmul: float = Field(default=0.7, gt=0, le=1)
    memory: float = Field(default=0.85, gt=0, le=1)
    link: float = Field(default=0.8, gt=0, le=1)


class _Runtime(_Section):
    memory_utilization: float = Field(default=0.9, gt=0, le=1)
    reserved_gb: float = Field(default=0.0, ge=0)
    step_overhead_ms: float = Field(default=1.0, ge=0)
    per_seq_overhead_us: float = Field(default=10.0, ge=0)
    per_layer_overhead_us: float = Field(default=10.0, ge=0)


class _HardwareFile(_Section):
    name: str = Field(min_length=1)
    source: str = Field(min_length=1)
    device_kind: Literal["gpu", "cpu"]
    nodes: int = Field(default=1, ge=1)
    devices_per_node: int = Field(ge=1)
    shared: bool = False
    device: _Device
    links: _Links
    efficiency: _Efficiency = _Efficiency()
    runtime: _Runtime = _Runtime()


def parse_hardware(data: Any, source: str = "<hardware>") -> Hardware:
    """Validate a parsed hardware YAML document; ValueError ``"<source>: <key.path>: <problem>"``."""
    try:
        doc = _HardwareFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{source}: {key}: {first['msg']}") from None
    if doc.nodes > 1 and doc.links.inter_node is None:
        raise ValueError(f"{source}: links.inter_node: required when nodes > 1")
    dev, rt, eff = doc.device, doc.runtime, doc.efficiency
    inter = doc.links.inter_node or doc.links.intra_node
    return Hardware(
        name=doc.name, source=doc.source.strip(), device_kind=doc.device_kind, nodes=doc.nodes,
        devices_per_node=doc.devices_per_node, shared=doc.shared, memory=dev.memory_gb * GB,
        memory_bandwidth=dev.memory_bandwidth_gbps * GB, flops={k: v * 1e12 for k, v in dev.tflops.items()},
        intra_node=_link(doc.links.intra_node), inter_node=_link(inter), matmul_efficiency=eff.matmul,
        memory_efficiency=eff.memory, link_efficiency=eff.link, memory_utilization=rt.memory_utilization,
        reserved=rt.reserved_gb * GB,
        overheads=Overheads(step=rt.step_overhead_ms * 1e-3, per_seq=rt.per_seq_overhead_us * 1e-6,
                            per_layer=rt.per_layer_overhead_us * 1e-6),
        bf16_native="bfloat16" in dev.tflops, key=f"file-{doc.name}")


def _link(link: _Link) -> Link:
    return Link(bandwidth=link.bandwidth_gbps * GB, latency=link.latency_us * 1e-6)
