"""Process-level parallel state behind one accessor: the tensor-, pipeline-parallel and world groups.

At world size 1 (the default, set up implicitly) every collective is a no-op and nothing touches
``torch.distributed`` (it is imported lazily, only by code paths that run at size > 1), so a
single-process run costs nothing.

A multi-process run calls ``init_distributed`` once per process, before the model is built. Ranks are laid
out as a (pp, tp) grid: ``rank = pp_rank * tp_size + tp_rank``, so the ranks of one tensor-parallel group
are contiguous (one node's GPUs) and a pipeline-parallel group strides by ``tp_size``.

Each group with more than one rank holds two process groups:
- ``device_group``: tensors of the forward pass (all-reduce, all-gather, pipeline sends) on the model's
  device: NCCL on CUDA, Gloo on CPU;
- ``cpu_group``: Gloo, for control messages (``broadcast_bytes``, message headers, ``barrier``). With the
  Gloo backend both are the same process group.

Every collective must be called by all ranks of its group, in the same order. Collectives time out after
``init_distributed``'s ``timeout_s`` (Gloo honours it for every operation; NCCL needs
``TORCH_NCCL_ASYNC_ERROR_HANDLING``), so a dead peer surfaces as an exception rather than a hang.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import time

import torch

from flotilla.wire import Codec, WireStruct

DEFAULT_TIMEOUT_S = 120.0


def _dist():
    """torch.distributed, imported only when a group of size > 1 needs it."""
    import torch.distributed as dist
    return dist


@dataclass
class GroupCoordinator:
    """One communication group (tensor-, pipeline-parallel or world) as seen from this rank.

    ``ranks`` are the global ranks of the group in group order; ``rank_in_group`` indexes into it. Every
    ``src``/``dst`` argument below is a rank *in the group*, not a global rank.

    Contract: at ``world_size == 1`` ``all_reduce``/``all_gather``/``broadcast*`` return their input
    unchanged, ``barrier`` and ``send_tensors`` do nothing, and nothing imports torch.distributed.
    """

    rank_in_group: int = 0
    world_size: int = 1
    ranks: list[int] | None = None  # global ranks; default: [0, 1, ..., world_size - 1]
    device_group: object | None = None  # a torch.distributed ProcessGroup when world_size > 1
    cpu_group: object | None = None  # a Gloo ProcessGroup for control messages when world_size > 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    comm_seconds: float = 0.0  # wall time spent in this group's forward-pass communication (for benchmarks)

    def __post_init__(self) -> None:
        if self.ranks is None:
            self.ranks = list(range(self.world_size))
        if len(self.ranks) != self.world_size or not 0 <= self.rank_in_group < self.world_size:
            raise ValueError(f"inconsistent group: rank_in_group={self.rank_in_group}, "
                             f"world_size={self.world_size}, ranks={self.ranks}")

    # ---- topology -----------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self.ranks[self.rank_in_group]

    @property
    def first_rank(self) -> int:
        """Global rank of the group's first member (the first pipeline stage for the PP group)."""
        return self.ranks[0]

    @property
    def last_rank(self) -> int:
        """Global rank of the group's last member (the last pipeline stage for the PP group)."""
        return self.ranks[-1]

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def next_rank(self) -> int:
        """Rank in group of the next member (wraps around)."""
        return (self.rank_in_group + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        """Rank in group of the previous member (wraps around)."""
        return (self.rank_in_group - 1) % self.world_size

    # ---- device collectives -------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group. May reduce in place: callers must use the returned tensor."""
        if self.world_size == 1:
            return x
        if not x.is_contiguous():
            x = x.contiguous()
        start = time.perf_counter()
        _dist().all_reduce(x, group=self.device_group)
        self.comm_seconds += time.perf_counter() - start
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` (same shape on all ranks) along ``dim``, in group order."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        start = time.perf_counter()
        _dist().all_gather(parts, x, group=self.device_group)
        self.comm_seconds += time.perf_counter() - start
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``x`` (same shape and dtype on all ranks) with rank ``src``'s; returns it."""
        if self.world_size == 1:
            return x
        _dist().broadcast(x, self.ranks[src], group=self.device_group)
        return x

    # ---- control messages (CPU group) ---------------------------------------------------------------
    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """Rank ``src`` passes ``data``; every rank returns it (others pass None). Size first, then the
        payload, as uint8 tensors over the CPU group."""
        if self.world_size == 1:
            if data is None:
                raise ValueError("broadcast_bytes at world size 1 needs the data")
            return bytes(data)
        dist, root = _dist(), self.ranks[src]
        is_src = self.rank_in_group == src
        if is_src and data is None:
            raise ValueError("broadcast_bytes: the source rank must pass the data")
        size = torch.tensor([len(data) if is_src else 0], dtype=torch.int64)
        dist.broadcast(size, root, group=self.cpu_group)
        n = int(size.item())
        if n == 0:
            return b""
        payload = _bytes_to_tensor(data) if is_src else torch.empty(n, dtype=torch.uint8)
        dist.broadcast(payload, root, group=self.cpu_group)
        return bytes(data) if is_src else payload.numpy().tobytes()

    def send_bytes(self, data: bytes, dst: int) -> None:
        """Point-to-point bytes to rank ``dst`` of the group (size, then payload) over the CPU group."""
        if self.world_size == 1:
            return
        dist, peer = _dist(), self.ranks[dst]
        dist.send(torch.tensor([len(data)], dtype=torch.int64), peer, group=self.cpu_group)
        if data:
            dist.send(_bytes_to_tensor(data), peer, group=self.cpu_group)

    def recv_bytes(self, src: int) -> bytes:
        """Receive what rank ``src`` of the group sent with ``send_bytes``."""
        if self.world_size == 1:
            raise RuntimeError("recv_bytes at world size 1: there is no peer to receive from")
        dist, peer = _dist(), self.ranks[src]
        size = torch.zeros(1, dtype=torch.int64)
        dist.recv(size, peer, group=self.cpu_group)
        n = int(size.item())
        if n == 0:
            return b""
        payload = torch.empty(n, dtype=torch.uint8)
        dist.recv(payload, peer, group=self.cpu_group)
        return payload.numpy().tobytes()

    def barrier(self) -> None:
        """Wait until every rank of the group reaches the barrier (over the CPU group)."""
        if self.world_size == 1:
            return
        _dist().barrier(group=self.cpu_group)

    # ---- pipeline point-to-point --------------------------------------------------------------------
    def send_tensors(self, tensors: dict[str, torch.Tensor], dst: int | None = None) -> None:
        """Send named tensors to rank ``dst`` of the group (default: the next stage).

        A header (a list of ``TensorHeader``) goes first over the CPU group, so the receiver needs to know
        nothing in advance; then each tensor over the device group, in header order.
        """
        if self.world_size == 1:
            return
        dst = self.next_rank if dst is None else dst
        header = [TensorHeader(name, str(t.dtype).removeprefix("torch."), list(t.shape))
                  for name, t in tensors.items()]
        start = time.perf_counter()
        self.send_bytes(_TENSOR_HEADERS.encode(header), dst)
        dist, peer = _dist(), self.ranks[dst]
        for t in tensors.values():
            if t.numel():
                dist.send(t.contiguous(), peer, group=self.device_group)
        self.comm_seconds += time.perf_counter() - start

    def recv_tensors(self, src: int | None = None) -> dict[str, torch.Tensor]:
        """Receive what ``send_tensors`` sent from rank ``src`` of the group (default: the previous stage);
        tensors are allocated on this group's ``device``."""
        if self.world_size == 1:
            raise RuntimeError("recv_tensors at world size 1: there is no peer to receive from")
        src = self.prev_rank if src is None else src
        start = time.perf_counter()
        header = _TENSOR_HEADERS.decode(self.recv_bytes(src))
        dist, peer = _dist(), self.ranks[src]
        out: dict[str, torch.Tensor] = {}
        for h in header:
            t = torch.empty(h.shape, dtype=_dtype(h.dtype), device=self.device)
            if t.numel():
                dist.recv(t, peer, group=self.device_group)
            out[h.name] = t
        self.comm_seconds += time.perf_counter() - start
        return out


class TensorHeader(WireStruct):
    """One tensor of a pipeline hand-off: its ``name``, torch ``dtype`` name ("float32") and ``shape``."""

    name: str
    dtype: str
    shape: list[int]


_TENSOR_HEADERS: Codec[list[TensorHeader]] = Codec(list[TensorHeader], "pipeline tensor header")


def _bytes_to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # (len(data),)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a tensor message header")
    return dtype


@dataclass
class ParallelState:
    """This process's place in the tensor x pipeline grid, plus the group of all ranks."""

    tp: GroupCoordinator
    pp: GroupCoordinator
    world: GroupCoordinator = field(default_factory=GroupCoordinator)


_STATE = ParallelState(tp=GroupCoordinator(), pp=GroupCoordinator())


def init_parallel_state(tp: GroupCoordinator, pp: GroupCoordinator,
                        world: GroupCoordinator | None = None) -> None:
    """Install this process's groups (called once per worker process before the model is built)."""
    global _STATE
    _STATE = ParallelState(tp=tp, pp=pp, world=world or GroupCoordinator())


def get_tp_group() -> GroupCoordinator:
    return _STATE.tp


def get_pp_group() -> GroupCoordinator:
    return _STATE.pp


def get_world_group() -> GroupCoordinator:
    return _STATE.world


def get_parallel_state() -> ParallelState:
    return _STATE


def tp_group_ranks(tp_size: int, pp_size: int) -> list[list[int]]:
    """Global ranks of each tensor-parallel group, in creation order: contiguous blocks of ``tp_size``."""
    return [[p * tp_size + t for t in range(tp_size)] for p in range(pp_size)]


def pp_group_ranks(tp_size: int, pp_size: int) -> list[list[int]]:
    """Global ranks of each pipeline-parallel group (stage order), in creation order: stride ``tp_size``."""
    return [[p * tp_size + t for p in range(pp_size)] for t in range(tp_size)]


def init_distributed(world_size: int, rank: int, tp_size: int, pp_size: int, backend: str | None = None,
                     init_method: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     device: str | torch.device = "cpu") -> ParallelState:
    """Join the process group and install the TP, PP and world groups for this rank.

    ``world_size`` must equal ``tp_size * pp_size``. ``backend`` defaults to "nccl" when ``device`` is
    CUDA, else "gloo"; ``init_method`` defaults to "env://" (MASTER_ADDR/MASTER_PORT), e.g.
    "tcp://10.0.0.1:29500". At world size 1 nothing is initialized and the no-op groups are installed.
    Every rank must call this with the same sizes (all ranks create every group, in the same order).
    Returns the installed state; undo with ``destroy_distributed``.
    """
    if world_size != tp_size * pp_size:
        raise ValueError(f"world size {world_size} != tensor parallel {tp_size} x pipeline parallel {pp_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    device = torch.device(device)
    if world_size == 1:
        init_parallel_state(GroupCoordinator(device=device), GroupCoordinator(device=device),
                            GroupCoordinator(device=device))
        return _STATE
    dist = _dist()
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized; call destroy_distributed() first")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    timeout = timedelta(seconds=timeout_s)
    init_method = init_method or "env://"
    if init_method.startswith("tcp://"):
        store = _tcp_store(init_method, rank, world_size, timeout)
        dist.init_process_group(backend=backend, store=store, world_size=world_size, rank=rank, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=rank,
                                timeout=timeout)
    make = _GroupFactory(rank, backend, timeout, device)
    world = make.groups([list(range(world_size))], world=True)
    tp = make.groups(tp_group_ranks(tp_size, pp_size))
    pp = make.groups(pp_group_ranks(tp_size, pp_size))
    init_parallel_state(tp, pp, world)
    return _STATE


def _tcp_store(init_method: str, rank: int, world_size: int, timeout: timedelta):
    """A rendezvous store whose server (on rank 0) listens only on the address named in ``init_method``,
    not on every interface as torch's default does (loopback for local ranks, the cluster interface
    otherwise)."""
    import socket
    from urllib.parse import urlparse
    url = urlparse(init_method)
    host, port = url.hostname, url.port
    dist = _dist()
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen()
    # The store's server thread owns the descriptor from now on; Python must never close it under it.
    return dist.TCPStore(host, port, world_size, True, timeout, master_listen_fd=sock.detach(), use_libuv=False)


@dataclass
class _GroupFactory:
    """Creates process groups the same way on every rank and keeps the ones this rank belongs to."""

    rank: int
    backend: str
    timeout: timedelta
    device: torch.device

    def groups(self, all_ranks: list[list[int]], world: bool = False) -> GroupCoordinator:
        """Create every group of ``all_ranks`` (every rank must call new_group for all of them, in order);
        return this rank's. Groups of size 1 create nothing (the same decision on every rank)."""
        dist = _dist()
        mine = None
        for ranks in all_ranks:
            if len(ranks) == 1:
                if self.rank in ranks:
                    mine = GroupCoordinator(0, 1, list(ranks), device=self.device)
                continue
            if world:
                device_group = dist.group.WORLD
            else:
                device_group = dist.new_group(ranks, timeout=self.timeout, backend=self.backend)
            cpu_group = device_group if self.backend == "gloo" else \
                dist.new_group(ranks, timeout=self.timeout, backend="gloo")
            if self.rank in ranks:
                mine = GroupCoordinator(ranks.index(self.rank), len(ranks), list(ranks), device_group,
                                        cpu_group, self.device)
        if mine is None:
            raise RuntimeError(f"rank {self.rank} is in none of the groups {all_ranks}")
        return mine


def destroy_distributed() -> None:
    """Tear down every process group (if any) and reinstall the size-1 no-op groups. Idempotent."""
    init_parallel_state(GroupCoordinator(), GroupCoordinator())
    import sys
    if "torch.distributed" not in sys.modules:
        return
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

