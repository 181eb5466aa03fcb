"""Process-level parallel state behind one accessor.

At world size 1 (the default, set up implicitly) every collective is a no-op and nothing touches
torch.distributed, so a single-process run costs nothing. The tensor/pipeline-parallel issue fills in real
groups through ``init_parallel_state``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupCoordinator:
    """One communication group (tensor- or pipeline-parallel) as seen from this rank.

    Contract: ``all_reduce``/``all_gather`` return their input unchanged when ``world_size == 1``.
    """

    rank_in_group: int = 0
    world_size: int = 1
    device_group: object | None = None  # a torch.distributed ProcessGroup when world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        import torch.distributed as dist
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return x
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)


@dataclass
class ParallelState:
    """This process's place in the tensor x pipeline grid."""

    tp: GroupCoordinator
    pp: GroupCoordinator


_STATE = ParallelState(tp=GroupCoordinator(), pp=GroupCoordinator())


def init_parallel_state(tp: GroupCoordinator, pp: GroupCoordinator) -> None:
    """Install this process's groups (called once per worker process before the model is built)."""
    global _STATE
    _STATE = ParallelState(tp=tp, pp=pp)


def get_tp_group() -> GroupCoordinator:
    return _STATE.tp


def get_pp_group() -> GroupCoordinator:
    return _STATE.pp
