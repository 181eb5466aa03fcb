"""The hardware a plan runs on: nodes x devices, their memory, FLOP/s per dtype, memory bandwidth and links,
and the rates a rank gets from them.

Two ways in: a YAML description (``load_hardware(path or shipped name)``; the shipped ones are in
``flotilla/planner/systems``: ``8xh200``, ``8xa100-80gb``, ``epyc-9654-2s``, each naming its datasheet) or
``--hardware local``, measured on this machine (``flotilla.planner.measure``). The file's schema::

    name: 8x NVIDIA H200 SXM            # shown in the plan table
    source: datasheet ...                # where the numbers come from
    device_kind: gpu                     # gpu | cpu
    nodes: 1
    devices_per_node: 8                  # GPUs; for a CPU node: cores (the most ranks it runs)
    shared: false                        # true: a node's ranks share its compute, bandwidth and memory
    device:                              # per device, or per node when shared
      memory_gb: 141
      memory_bandwidth_gbps: 4800
      tflops: {bfloat16: 989.5, float32: 67}   # dense peak per dtype
    links:                               # per direction
      intra_node: {bandwidth_gbps: 450, latency_us: 3}
      inter_node: {bandwidth_gbps: 50, latency_us: 8}
    efficiency: {matmul: 0.7, memory: 0.85, link: 0.8}   # achievable fraction of each peak
    runtime: {memory_utilization: 0.9, reserved_gb: 3, step_overhead_ms: 1.5, per_seq_overhead_us: 10,
              per_layer_overhead_us: 10}

Rates: a matmul runs at ``tflops[dtype] * efficiency.matmul``, memory at ``memory_bandwidth * efficiency.memory``
(a ``shared`` node's rate split evenly among the ranks on it); a measured machine instead carries its
measured matmul rate per (dtype, rows M, threads) and bandwidth per thread count (efficiency 1). Collectives
are alpha-beta: a ring all-reduce of n bytes over p ranks takes ``2(p-1) alpha + 2(p-1)/p n / B``, a send
``alpha + n / B``; measured machines carry the alpha and beta of all-reduce and send/recv at p = 2.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

SYSTEMS_DIR = os.path.join(os.path.dirname(__file__), "systems")
GB = 1e9


@dataclass(frozen=True)
class Link:
    """One link: ``bandwidth`` bytes/s per direction, ``latency`` seconds per message (alpha)."""

    bandwidth: float
    latency: float


@dataclass(frozen=True)
class AlphaBeta:
    """A measured message cost ``alpha + beta * bytes`` (seconds) at group size 2."""

    alpha: float
    beta: float

    def time(self, nbytes: float) -> float:
        return self.alpha + self.beta * nbytes


@dataclass(frozen=True)
class Overheads:
    """Runtime cost of an engine step beyond its kernels: ``step`` seconds per step (scheduling, inputs, the
    driver's round trip), ``per_seq`` seconds per scheduled sequence (sampling, detokenizing and streaming
    its token), ``per_layer`` seconds per decoder layer a stage runs (operator dispatch); ``host_cores``
    (shared CPU nodes): the cores' worth of CPU the serving processes (HTTP server, one engine core per
    replica) take from the ranks while they serve, which slows the ranks once their threads want more
    cores than are left."""

    step: float = 1e-3
    per_seq: float = 1e-5
    per_layer: float = 1e-5
    host_cores: float = 0.0


@dataclass(frozen=True)
class Hardware:
    """A cluster of ``nodes`` x ``devices_per_node`` devices (see the module docstring). ``memory``,
    ``memory_bandwidth`` and ``flops`` are per device, or per node when ``shared``. ``matmul_curves``
    (measured machines): dtype -> threads -> [(M, FLOP/s)]; ``bandwidth_by_threads``: threads -> bytes/s;
    ``collectives``: measured {"all_reduce", "send_recv"} alpha-betas; ``oversubscribed_sync``: seconds a
    collective or pipeline hand-off costs beyond them when a shared node runs more ranks than it has devices
    (the wait for a descheduled rank; measured). ``key`` names the machine in the calibration store."""

    name: str
    source: str
    device_kind: str
    nodes: int
    devices_per_node: int
    memory: float
    memory_bandwidth: float
    flops: dict[str, float]
    intra_node: Link
    inter_node: Link
    shared: bool = False
    matmul_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    link_efficiency: float = 1.0
    memory_utilization: float = 0.9
    reserved: float = 0.0
    overheads: Overheads = field(default_factory=Overheads)
    matmul_curves: dict[str, dict[int, list[tuple[int, float]]]] | None = None
    bandwidth_by_threads: dict[int, float] | None = None
    collectives: dict[str, AlphaBeta] | None = None
    oversubscribed_sync: float = 0.0
    bf16_native: bool = True
    key: str = ""

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def threads_per_rank(self, ranks_on_node: int) -> int:
        """Cores each rank of a shared node gets (the planner sets the engine's ``num_threads`` to it)."""
        return max(1, self.devices_per_node // max(1, ranks_on_node))

    def supports(self, dtype: str) -> bool:
        return dtype in self.flops or bool(self.matmul_curves and dtype in self.matmul_curves)

    # ------------------------------------------------------------------ compute and memory
    def matmul_rate(self, dtype: str, m: int, ranks_on_node: int = 1, threads: int | None = None) -> float:
        """FLOP/s one rank gets for a matmul with ``m`` activation rows in ``dtype``; on a shared node with
        ``threads`` threads (default: its share of the cores, ``threads_per_rank``)."""
        threads = threads or self.threads_per_rank(ranks_on_node)
        curves = (self.matmul_curves or {}).get(dtype)
        if curves:
            return _thread_interpolate({t: _log_interp(pts, m) for t, pts in curves.items()},
                                       threads) * self._oversubscription(ranks_on_node)
        if dtype not in self.flops:
            raise ValueError(f"{self.name} lists no FLOP/s for {dtype} (it lists: {', '.join(self.flops)})")
        if not self.shared:
            return self.flops[dtype] * self.matmul_efficiency
        return self.flops[dtype] * self.matmul_efficiency * min(threads, self.devices_per_node) / self.devices_per_node

    def bandwidth(self, ranks_on_node: int = 1, threads: int | None = None) -> float:
        """Memory bytes/s one rank gets (on a shared node, with ``threads`` threads: see ``matmul_rate``)."""
        threads = threads or self.threads_per_rank(ranks_on_node)
        if self.bandwidth_by_threads:
            node = max(self.bandwidth_by_threads.values())
            return min(_thread_interpolate(self.bandwidth_by_threads, threads), node / ranks_on_node) \
                * self._oversubscription(ranks_on_node)
        return self.memory_bandwidth * self.memory_efficiency / (ranks_on_node if self.shared else 1)

    def sync_penalty(self, ranks_on_node: int) -> float:
        """Seconds each collective or hand-off waits for a descheduled rank (0 unless oversubscribed)."""
        return self.oversubscribed_sync if self.shared and ranks_on_node > self.devices_per_node else 0.0

    def _oversubscription(self, ranks_on_node: int) -> float:
        """Fraction of a core a rank gets when a shared node runs more ranks than it has cores."""
        return min(1.0, self.devices_per_node / ranks_on_node) if self.shared else 1.0

    # ------------------------------------------------------------------ communication
    def all_reduce_time(self, nbytes: float, group: int, inter_node: bool = False) -> float:
        """Seconds of a ring all-reduce of ``nbytes`` over ``group`` ranks."""
        if group <= 1 or nbytes <= 0:
            return 0.0
        measured = (self.collectives or {}).get("all_reduce")
        if measured is not None and not inter_node:  # t2 = a + b n  ->  tp = (p-1) a + 2(p-1)/p b n
            return (group - 1) * measured.alpha + 2 * (group - 1) / group * measured.beta * nbytes
        link = self._link(inter_node)
        return 2 * (group - 1) * link.latency + 2 * (group - 1) / group * nbytes / link.bandwidth

    def all_gather_time(self, nbytes: float, group: int, inter_node: bool = False) -> float:
        """Seconds of a ring all-gather whose result has ``nbytes`` (half an all-reduce's two rings)."""
        if group <= 1 or nbytes <= 0:
            return 0.0
        return 0.5 * self.all_reduce_time(nbytes, group, inter_node)

    def send_time(self, nbytes: float, inter_node: bool = False) -> float:
        """Seconds to move ``nbytes`` from one rank to the next pipeline stage."""
        measured = (self.collectives or {}).get("send_recv")
        if measured is not None and not inter_node:
            return measured.time(nbytes)
        link = self._link(inter_node)
        return link.latency + nbytes / link.bandwidth

    def _link(self, inter_node: bool) -> Link:
        link = self.inter_node if inter_node else self.intra_node
        return Link(link.bandwidth * self.link_efficiency, link.latency)


def _log_interp(points: list[tuple[int, float]], m: int) -> float:
    """Piecewise power law through measured (M, rate) points (linear in log M and log rate: a memory-bound
    matmul's rate grows about linearly with M, so its time stays flat between the points), flat beyond."""
    pts = sorted(points)
    if m <= pts[0][0]:
        return pts[0][1]
    for (m0, r0), (m1, r1) in zip(pts, pts[1:]):
        if m <= m1:
            w = (math.log(m) - math.log(m0)) / (math.log(m1) - math.log(m0))
            return math.exp(math.log(r0) + w * (math.log(r1) - math.log(r0)))
    return pts[-1][1]


def _thread_interpolate(by_threads: dict[int, float], threads: int) -> float:
    """A rate at ``threads`` from rates measured at some thread counts: linear between neighbours (a rank
    with more threads than any measurement gets the largest count's rate). Measured rates are taken as
    they are, also when more threads were slower (on a machine busy with other work, OpenMP threads wait
    for each other at every operator: the engine's ranks would too)."""
    known = sorted(by_threads.items())
    if threads <= known[0][0]:
        return known[0][1] * threads / known[0][0]
    for (t0, r0), (t1, r1) in zip(known, known[1:]):
        if threads <= t1:
            return r0 + (threads - t0) / (t1 - t0) * (r1 - r0)
    return known[-1][1]


# ------------------------------------------------------------------------------------------- YAML files

def shipped_systems() -> dict[str, str]:
    """Shipped hardware descriptions: name -> path."""
    return {n.removesuffix(".yaml"): os.path.join(SYSTEMS_DIR, n) for n in sorted(os.listdir(SYSTEMS_DIR))
            if n.endswith(".yaml")}


def load_hardware(spec: str) -> Hardware:
    """A shipped system's name (``8xh200``) or a YAML file's path -> ``Hardware``. ValueError naming the
    file and key for an invalid description (``local`` is measured: ``flotilla.planner.measure``)."""
    from flotilla.planner.hardware_schema import parse_hardware
    path = shipped_systems().get(spec.strip().lower(), spec)
    if not os.path.isfile(path):
        names = ", ".join(["local", *shipped_systems()])
        raise ValueError(f"hardware {spec!r} is neither a YAML file nor a known system ({names})")
    import yaml
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    return parse_hardware(data, path)
