"""Rank discovery under external launchers: torchrun, Open MPI's mpirun, Slurm's srun.

The same ``flotilla serve`` command started N times by a launcher finds its rank, the world size and where
rank 0 listens from the launcher's environment variables. Everything here is a pure function of an env
mapping (the caller passes ``envs.launcher_environment()``: ``flotilla.envs`` is the only module that reads
the environment), so each launcher is unit-tested with a plain dict.

Precedence when several launchers' variables are present: torchrun (its workers may themselves run inside
an mpirun or srun allocation), then Open MPI (mpirun inside a Slurm allocation inherits SLURM_PROCID=0 on
every rank), then Slurm.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in a launcher-started job.

    ``master_addr``/``master_port`` locate rank 0's rendezvous (a TCP store); ``launcher`` is one of
    "torchrun", "mpirun", "srun".
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def init_method(self) -> str:
        """The torch.distributed init method reaching rank 0's store, e.g. "tcp://node01:29500".

        Under torchrun it is "env://": torchrun's agent already serves the store on MASTER_PORT."""
        if self.launcher == "torchrun":
            return "env://"
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"


def detect_launch(env: Mapping[str, str], master_addr: str | None = None,
                  master_port: int | None = None) -> LaunchInfo | None:
    """The launcher context described by ``env``, or None when no launcher's variables are present.

    ``master_addr``/``master_port`` (command-line options) override MASTER_ADDR/MASTER_PORT from ``env``.
    Raises ValueError for malformed values, and under mpirun with several nodes and no master address.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return _torchrun(env, master_addr, master_port)
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        return _mpirun(env, master_addr, master_port)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return _srun(env, master_addr, master_port)
    return None


def _torchrun(env, addr, port) -> LaunchInfo:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    return _info(rank, world, local, addr or env.get("MASTER_ADDR") or "127.0.0.1",
                 port or _port(env), "torchrun")


def _mpirun(env, addr, port) -> LaunchInfo:
    rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0
    addr = addr or env.get("MASTER_ADDR")
    if addr is None:
        local_size = env.get("OMPI_COMM_WORLD_LOCAL_SIZE")
        if world == 1 or (local_size is not None and _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") == world):
            addr = "127.0.0.1"  # every rank on this node
        else:
            raise ValueError("running under mpirun across nodes: set MASTER_ADDR (e.g. mpirun -x "
                             "MASTER_ADDR=<host of rank 0>) or pass --master-addr")
    return _info(rank, world, local, addr, port or _port(env), "mpirun")


def _srun(env, addr, port) -> LaunchInfo:
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    if addr is None:
        addr = env.get("MASTER_ADDR")
    if addr is None:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
        addr = expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1"
    return _info(rank, world, local, addr, port or _port(env), "srun")


def _info(rank: int, world: int, local: int, addr: str, port: int, launcher: str) -> LaunchInfo:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"{launcher}: rank {rank} is outside world size {world}")
    if local < 0:
        raise ValueError(f"{launcher}: local rank {local} is negative")
    if not 0 < port < 65536:
        raise ValueError(f"{launcher}: master port {port} is not a TCP port")
    return LaunchInfo(rank, world, local, addr, port, launcher)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _port(env: Mapping[str, str]) -> int:
    return _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else DEFAULT_MASTER_PORT


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list: "node[01-03,07],gpu5" -> ["node01", "node02", "node03", "node07", "gpu5"].

    Supports comma-separated items, any number of bracket groups per item (expanded as a cartesian
    product) and zero-padded ranges. Raises ValueError on unbalanced brackets or malformed ranges.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_item(item))
    if not hosts:
        raise ValueError(f"empty Slurm node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm node list {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in Slurm node list {text!r}")
    items.append(text[start:])
    return [s for s in items if s]


def _expand_item(item: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.find("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    values: list[str] = []
    for part in body.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise ValueError(f"malformed range {part!r} in Slurm node list item {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in Slurm node list item {item!r}")
        values.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    tails = _expand_item(rest)
    return [prefix + v + t for v in values for t in tails]
