"""``--hardware local``: this machine, measured, and cached in ``FLOTILLA_CACHE_DIR/planner`` keyed by the CPU
model and core count.

* **Matmul rate** per dtype at the model's shapes: flotilla's own linear layers (``ReplicatedLinear``, with the
  engine's oneDNN prepacking for bfloat16 or its int8 weights), the four matmuls of a decoder layer (each
  dimension capped at 2048), at ``M`` = 1 .. 2048 rows, with one thread and with every core; the rate at M is
  the layers' FLOP over their time (the fastest of 5 runs). Below 128 rows a pass runs over enough copies of
  the layer (256 MiB of weights, at most 64 copies) that they stream from memory as a model's do, not from
  the cache: that is the rate a decode step gets. Cached per dtype and shape.

Everything is measured as the machine is at the time: on a machine busy with other work, more threads can
be slower than one (OpenMP threads wait for a descheduled peer at every operator), and the planner then
prefers plans with fewer threads per rank, as it should. ``--refresh-hardware`` measures again.
* **Memory bandwidth**: a 256 MiB copy (reads + writes), one thread and every core.
* **Operator dispatch**: the time of a tiny matmul, the prior of the per-layer overhead (10 operators).
* **Collectives**: alpha and beta (seconds, seconds/byte) of a tensor-parallel all-reduce and of a pipeline
  hand-off (``send_tensors`` / ``recv_tensors`` ping-pong) between two local processes over gloo, through
  ``flotilla.distributed``'s groups; a least-squares fit over 256 B .. 4 MiB messages (about 10 s with the
  processes' start).
* **Oversubscribed synchronization**: what a collective costs when the node runs more ranks than it has cores
  (TP 3 on two cores): one-thread ranks alternate a short compute chunk (``SYNC_CHUNK_OPS`` small matmuls,
  about a decoder layer's share on a small model) with an all-reduce, once as ``cores`` ranks and once as
  ``cores + 1``; with fair time sharing the larger group would take ``(cores + 1) / cores`` times as long per
  iteration, and what it takes beyond that is the wait for a descheduled rank at every collective (about 10 s).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import statistics
import time
from collections.abc import Callable

from flotilla import envs
from flotilla.planner.hardware import AlphaBeta, Hardware, Link, Overheads
from flotilla.planner.model import ModelDesc

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
STREAM_BYTES = 256 << 20  # weights a small-M pass reads: far beyond any CPU's last-level cache
MAX_COPIES = 64  # (a tiny model's layers would be thousands of copies, all operator overhead)
ROWS = (1, 8, 32, 128, 512, 2048)
SHAPE_CAP = 2048
MESSAGE_BYTES = (256, 4096, 65536, 1 << 20, 4 << 20)
OPS_PER_LAYER = 10
SYNC_CHUNK_OPS = 4  # small matmuls between two all-reduces when measuring oversubscribed synchronization
SYNC_ITERATIONS = 300
HOST_CORES_PRIOR = 0.5  # the serving processes' CPU while ranks compute (a prior: --probe refits it)


# ------------------------------------------------------------------------------------------ the machine

def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name", from /proc/cpuinfo), or the platform's processor."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown CPU"


def num_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def total_memory() -> float:
    """Physical memory in bytes."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def machine_key() -> str:
    return re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") + f"-{num_cores()}c"


def cache_path() -> str:
    return os.path.join(envs.cache_dir(), "planner", f"hardware-{machine_key()}.json")


# ------------------------------------------------------------------------------------------ the cache

def local_hardware(model: ModelDesc, dtypes: list[str], refresh: bool = False,
                   log: Callable[[str], None] = logger.info) -> Hardware:
    """This machine as a ``Hardware`` (a shared CPU node, one device per core) with measured rates for
    ``dtypes`` ("float32", "bfloat16", "int8": int8 weights with bfloat16 activations) at ``model``'s shapes.
    Measures what the cache lacks (everything with ``refresh``) and stores it."""
    path = cache_path()
    data = {} if refresh else _read(path)
    changed = False
    if data.get("version") != CACHE_VERSION:
        log(f"measuring this machine ({cpu_model()}, {num_cores()} cores): memory bandwidth, collectives ...")
        data = {"version": CACHE_VERSION, "cpu": cpu_model(), "cores": num_cores(), "memory": total_memory(),
                "bf16_native": _bf16_native(), "bandwidth": measure_bandwidth(), "op_seconds": measure_op_seconds(),
                "collectives": measure_collectives(), "matmul": {}}
        changed = True
    if "oversubscribed_sync" not in data:  # added to the cache after its version 2: measured on its own
        log("measuring collectives with more ranks than cores ...")
        data["oversubscribed_sync"] = measure_oversubscribed_sync()
        changed = True
    for dtype in dtypes:
        key = f"{dtype}|{shape_key(model)}"
        if key not in data["matmul"]:
            log(f"measuring {dtype} matmuls at {model.name}'s shapes ...")
            data["matmul"][key] = measure_matmul_curve(model, dtype)
            changed = True
    if changed:
        _write(path, data)
    return hardware_from_cache(data, model, dtypes)


def hardware_from_cache(data: dict, model: ModelDesc, dtypes: list[str]) -> Hardware:
    """The ``Hardware`` a cache document describes (its curves for ``model``'s shapes)."""
    cores = int(data["cores"])
    curves = {}
    for dtype in dtypes:
        entry = data["matmul"][f"{dtype}|{shape_key(model)}"]
        curves[dtype] = {int(t): [(int(m), float(r)) for m, r in pts] for t, pts in entry.items()}
    bw = {int(t): float(v) for t, v in data["bandwidth"].items()}
    coll = {k: AlphaBeta(*v) for k, v in data["collectives"].items()}
    loopback = Link(bandwidth=1.0 / max(coll["send_recv"].beta, 1e-15), latency=coll["send_recv"].alpha)
    peak = {d: max(r for pts in curves[d].values() for _, r in pts) for d in curves}
    return Hardware(
        name=f"local: {data['cpu']}, {cores} cores, {data['memory'] / 2**30:.1f} GiB",
        source=f"measured, {cache_path()}", device_kind="cpu", nodes=1, devices_per_node=cores, shared=True,
        memory=float(data["memory"]), memory_bandwidth=max(bw.values()), flops=peak,
        intra_node=loopback, inter_node=loopback, memory_utilization=0.9,
        overheads=Overheads(step=1e-3, per_seq=5e-5, per_layer=OPS_PER_LAYER * float(data["op_seconds"]),
                            host_cores=HOST_CORES_PRIOR),
        matmul_curves=curves, bandwidth_by_threads=bw, collectives=coll, bf16_native=bool(data["bf16_native"]),
        oversubscribed_sync=float(data.get("oversubscribed_sync", 0.0)), key=machine_key())


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _bf16_native() -> bool:
    from flotilla.engine.arg_utils import cpu_has_native_bf16
    return cpu_has_native_bf16()


# ------------------------------------------------------------------------------------------ measuring

def shape_key(model: ModelDesc) -> str:
    return ",".join(f"{k}x{n}" for k, n in layer_shapes(model))


def layer_shapes(model: ModelDesc) -> list[tuple[int, int]]:
    """(in, out) of a decoder layer's matmuls (qkv, o, gate_up, down), each dimension capped."""
    h, q, kv, i = model.hidden_size, model.q_size, model.num_kv_heads * model.head_dim, model.intermediate_size
    return [(min(a, SHAPE_CAP), min(b, SHAPE_CAP)) for a, b in ((h, q + 2 * kv), (q, h), (h, 2 * i), (i, h))]


def _threads(n: int | None):
    """Context: torch intra-op threads set to ``n`` (None: unchanged), restored after."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def scope():
        before = torch.get_num_threads()
        if n:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    return scope()


def _time(fn, repeats: int, best: bool = False) -> float:
    """Seconds of ``fn()`` after one warm-up call: the median of ``repeats`` runs, or with ``best`` the
    fastest (what the machine can do: on a shared machine other work only ever slows a run down)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def _as_the_engine() -> None:
    """Load what the engine's ranks load before they compute: flotilla's CPU kernel library (when the kernels
    are on; it is an OpenMP library too), so the measuring process runs torch's operators as a rank does."""
    from flotilla import ops
    ops.cpu_kernels()


def measure_matmul_curve(model: ModelDesc, dtype: str, rows=ROWS, repeats: int = 5) -> dict[str, list]:
    """{threads: [[M, FLOP/s], ...]} for 1 thread and every core (see the module docstring); the fastest of
    ``repeats`` runs."""
    import torch

    from flotilla.layers.linear import ReplicatedLinear
    from flotilla.layers.quantization import prepack_model_, quantize_model_
    _as_the_engine()
    act = torch.bfloat16 if dtype == "int8" else getattr(torch, dtype)
    shapes = layer_shapes(model)
    per_layer = sum(k * n for k, n in shapes)
    copies = min(MAX_COPIES, max(1, -(-STREAM_BYTES // (per_layer * (1 if dtype == "int8" else act.itemsize)))))
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(0)
        layers = torch.nn.ModuleList(ReplicatedLinear(k, n, dtype=act) for _ in range(copies) for k, n in shapes)
        for layer in layers:
            k = layer.weight.shape[1]
            layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=gen) / k ** 0.5)
        if dtype == "int8":
            quantize_model_(layers, "int8")
        else:
            prepack_model_(layers)
        out = {}
        for threads in sorted({1, num_cores()}):
            with _threads(threads):
                points = []
                for m in rows:
                    used = layers if m < 128 else layers[:len(shapes)]  # large M: compute-bound, one copy
                    xs = [torch.randn(m, k, generator=gen).to(act) for k, _ in shapes]
                    seconds = _time(lambda: [layer(xs[i % len(xs)]) for i, layer in enumerate(used)], repeats,
                                    best=True)
                    points.append([m, 2.0 * m * per_layer * (len(used) // len(shapes)) / seconds])
                out[str(threads)] = points
    return out


def measure_bandwidth(size_mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """{threads: bytes/s} of copying ``size_mib`` MiB (reads + writes), 1 thread and every core; the fastest
    of ``repeats`` copies."""
    import torch
    _as_the_engine()
    out = {}
    with torch.inference_mode():
        src = torch.ones(size_mib * 2**20 // 4)
        dst = torch.empty_like(src)
        for threads in sorted({1, num_cores()}):
            with _threads(threads):
                out[str(threads)] = 2 * src.numel() * 4 / _time(lambda: dst.copy_(src), repeats, best=True)
    return out


def measure_op_seconds(repeats: int = 200) -> float:
    """Seconds of one tiny matmul: the cost of dispatching an operator."""
    import torch
    with torch.inference_mode():
        x, w = torch.randn(1, 16), torch.randn(16, 16)
        torch.nn.functional.linear(x, w)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(x, w)
        return (time.perf_counter() - start) / repeats


# ------------------------------------------------------------------------------------------ collectives

def measure_collectives(timeout_s: float = 120.0) -> dict[str, list[float]]:
    """{"all_reduce": [alpha, beta], "send_recv": [alpha, beta]} over gloo between two local processes."""
    port = _free_port()
    result = _run_ranks(_collective_rank, [(rank, port) for rank in (0, 1)], timeout_s, "collectives")
    return {name: list(fit_alpha_beta(points)) for name, points in result.items()}


def _run_ranks(target, rank_args: list[tuple], timeout_s: float, what: str):
    """Start one spawned process per ``rank_args`` entry running ``target(*args, queue)``; return the first
    object put on the queue (a str is an error: RuntimeError naming ``what``); the processes are joined, or
    killed after 10 s."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, queue), daemon=True) for args in rank_args]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=timeout_s)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if isinstance(result, str):
        raise RuntimeError(f"measuring {what} failed: {result}")
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_rank(rank: int, port: int, queue) -> None:
    """One of the two measuring processes; rank 0 puts {name: [(bytes, seconds)]} (or an error) on ``queue``."""
    try:
        import torch

        from flotilla.distributed.parallel_state import (destroy_distributed, get_tp_group, get_world_group,
                                                          init_distributed)
        _as_the_engine()
        torch.set_num_threads(1)
        init_distributed(2, rank, tp_size=2, pp_size=1, backend="gloo", init_method=f"tcp://127.0.0.1:{port}")
        tp, world = get_tp_group(), get_world_group()
        result = {"all_reduce": [], "send_recv": []}
        for nbytes in MESSAGE_BYTES:
            x = torch.ones(nbytes // 4)
            reps = 20 if nbytes <= 65536 else 5
            result["all_reduce"].append((nbytes, _time(lambda: tp.all_reduce(x), reps)))
            half = torch.ones(max(1, nbytes // 8))

            def ping_pong():
                if rank == 0:
                    world.send_tensors({"hidden": half, "residual": half}, dst=1)
                    world.recv_tensors(src=1)
                else:
                    got = world.recv_tensors(src=0)
                    world.send_tensors(got, dst=0)
            result["send_recv"].append((nbytes, _time(ping_pong, reps) / 2))
        world.barrier()
        destroy_distributed()
        if rank == 0:
            queue.put(result)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        if rank == 0:
            queue.put(f"{type(e).__name__}: {e}")


def measure_oversubscribed_sync(timeout_s: float = 120.0) -> float:
    """Seconds a collective costs beyond fair time sharing when a node runs ``cores + 1`` one-thread ranks
    (see the module docstring); 0 when none is seen."""
    cores = num_cores()
    fair, over = _sync_iteration(cores, timeout_s), _sync_iteration(cores + 1, timeout_s)
    return max(0.0, over - (cores + 1) / cores * fair)


def _sync_iteration(ranks: int, timeout_s: float) -> float:
    """Seconds per compute-chunk + all-reduce iteration with ``ranks`` one-thread ranks (one rank: no
    collective)."""
    port = _free_port()
    return _run_ranks(_sync_rank, [(rank, ranks, port) for rank in range(ranks)], timeout_s,
                      "oversubscribed collectives")


def _sync_rank(rank: int, ranks: int, port: int, queue) -> None:
    try:
        import torch

        from flotilla.distributed.parallel_state import destroy_distributed, get_tp_group, init_distributed
        _as_the_engine()
        torch.set_num_threads(1)
        x, w = torch.randn(8, 512), torch.randn(512, 512)

        def chunk():
            for _ in range(SYNC_CHUNK_OPS):
                torch.nn.functional.linear(x, w)
        init_distributed(ranks, rank, tp_size=ranks, pp_size=1, backend="gloo", init_method=f"tcp://127.0.0.1:{port}")
        tp = get_tp_group()
        small = torch.ones(512)
        for _ in range(20):  # warm-up
            chunk()
            tp.all_reduce(small)
        tp.barrier()
        start = time.perf_counter()
        for _ in range(SYNC_ITERATIONS):
            chunk()
            tp.all_reduce(small)
        per_iteration = (time.perf_counter() - start) / SYNC_ITERATIONS
        destroy_distributed()
        if rank == 0:
            queue.put(per_iteration)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        if rank == 0:
            queue.put(f"{type(e).__name__}: {e}")


def fit_alpha_beta(points) -> tuple[float, float]:
    """Least squares of ``t = alpha + beta * n`` in relative error (every size weighs the same), clamped
    to non-negative values."""
    import numpy as np
    n = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    a = np.stack([1.0 / t, n / t], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    return max(float(alpha), 0.0), max(float(beta), 0.0)
