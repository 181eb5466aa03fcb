"""The Ray executor: one Ray actor per rank, in one placement group that may span nodes.

The engine (the Ray driver) holds no model shard. It reserves ``world_size`` bundles (``{"CPU": 1}``, or
``{"GPU": 1}`` on CUDA), starts one ``RankActor`` in each bundle, asks rank 0's actor for its node IP and
a free port, and has every actor join the torch process group at ``tcp://ip:port`` and load its shard.
Every call carries bytes of ``flotilla.scheduler.wire``'s messages (the same as the mp executor's): each
step goes to every actor as a ``Step``; the sampler rank (TP rank 0 of the last pipeline stage) answers with
a ``StepResult``, the others with ``b""``. The engine config travels as ``flotilla.worker.config_wire``
bytes.
Ray runs an actor's calls in submission order, so with pipeline parallelism several steps are in flight
(stage 0 computes step N+1 while stage 1 computes step N), exactly as with the mp executor.

Health: every reply of every rank is awaited with ``ray.wait``, so a dead actor (``RayActorError``) or a
rank whose collective timed out (its call raises) surfaces at once as ``EngineDeadError``; the executor
then kills every actor, so none is left blocked in a collective, and removes the placement group.

Connection: ``ParallelConfig.ray_address`` connects to that cluster (unless this process already has a
Ray connection, which is reused); without one a local Ray instance is started on loopback with the
dashboard off. Only that local instance is shut down by ``shutdown()``, never a cluster we joined.
Ray is imported only when this executor is chosen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from flotilla.config import EngineConfig
from flotilla.distributed.utils import describe_parallel_plan
from flotilla.errors import WORKER_RANK_FAILED, EngineDeadError
from flotilla.executor.base import Executor, StepHandle
from flotilla.scheduler.output import ModelRunnerOutput, SchedulerOutput
from flotilla.scheduler.wire import FROM_WORKER, TO_WORKER, Ready, Rpc, RpcResult, Step, StepResult, expect
from flotilla.worker.config_wire import encode_engine_config
from flotilla.wire import WireError
from flotilla.worker.worker_proc import sampler_rank

logger = logging.getLogger(__name__)

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_LOOPBACK = "127.0.0.1"


class RankActor:
    """One rank of the model, living in a Ray actor process (``ray.remote`` is applied by the executor).

    Lifecycle (each call is a Ray method call, run in submission order): ``node_info()`` ->
    ``free_port()`` (rank 0 only) -> ``setup(init_method)`` -> ``rpc`` / ``execute`` ... -> ``close()``.
    The config arrives as ``config_wire`` bytes and is rebuilt here; requests and replies are bytes of
    ``flotilla.scheduler.wire`` messages, never pickled objects of ours.
    """

    def __init__(self, config: bytes, rank: int):
        from flotilla import envs
        from flotilla.worker.config_wire import decode_engine_config
        logging.basicConfig(level=envs.log_level(),
                            format=f"%(levelname)s %(name)s [ray rank {rank}]: %(message)s")
        self.config = decode_engine_config(config)
        self.rank = rank
        self.samples = rank == sampler_rank(self.config)
        self.worker = None

    def node_info(self) -> dict:
        """Where this actor runs: Ray node id, node IP and process id."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid()}

    def free_port(self) -> int:
        """A TCP port free on this node's IP (the rendezvous of the torch process group)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ray.util.get_node_ip_address(), 0))
            return s.getsockname()[1]

    def setup(self, init_method: str) -> bytes:
        """Join the process group (blocks until every rank joins), then load this rank's shard."""
        from flotilla.distributed.parallel_state import get_pp_group, get_tp_group
        from flotilla.worker.worker import Worker
        from flotilla.worker.worker_proc import join_group
        join_group(self.config, self.rank, init_method)
        self.worker = Worker(self.config, rank=self.rank)
        self.worker.load_model()
        tp, pp = get_tp_group(), get_pp_group()
        return FROM_WORKER.encode(Ready(tp.rank_in_group, pp.rank_in_group))

    def rpc(self, data: bytes) -> bytes:
        """Run an ``Rpc`` message (a public Worker method); reply with an ``RpcResult``'s bytes."""
        from flotilla.worker.worker_proc import call_worker
        rpc = expect(TO_WORKER.decode(data), Rpc)
        return FROM_WORKER.encode(RpcResult(self.rank, call_worker(self.worker, rpc)))

    def execute(self, data: bytes) -> bytes:
        """Run a ``Step`` message; the sampler rank returns its ``StepResult``'s bytes, the others b""."""
        step = expect(TO_WORKER.decode(data), Step)
        out = self.worker.execute_model(step.scheduler_output)
        return FROM_WORKER.encode(StepResult(out)) if self.samples else b""

    def close(self) -> None:
        """Leave the process group (the executor kills the actor afterwards anyway)."""
        from flotilla.distributed.parallel_state import destroy_distributed
        destroy_distributed()


class RayExecutor(Executor):
    """Drives ``world_size`` Ray actors, one per rank, placed in one placement group.

    Contract: as ``Executor``; ``collective_rpc`` results and ``execute_model`` outputs come back in rank
    and step order. Any actor failure, or a step without every reply within ``step_timeout_s`` (default
    twice the collective timeout plus 30 s), raises ``EngineDeadError``; after that every call raises it
    and the actors are gone. ``shutdown()`` kills the actors, removes the placement group and stops
    the local Ray instance if this executor started it; it may be called any number of times.

    ``placement_strategy``: Ray's bundle strategy ("PACK" fills nodes in turn and may span nodes;
    "SPREAD" prefers one rank per node). ``rank_nodes``/``rank_ips``/``rank_pids`` list the Ray node id,
    node IP and process id of each rank; ``actors`` holds the live actor handles in rank order.
    """

    def __init__(self, config: EngineConfig, *, placement_strategy: str = "PACK",
                 placement_timeout_s: float = 120.0, startup_timeout_s: float = 900.0,
                 step_timeout_s: float | None = None):
        super().__init__(config)
        if placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got "
                             f"{placement_strategy!r}")
        p = config.parallel
        self.world_size = p.world_size
        self.sampler_rank = sampler_rank(config)
        self.step_timeout_s = step_timeout_s or 2 * p.collective_timeout_s + 30.0
        self.dead: str | None = None
        self.actors: list = []
        self.rank_nodes: list[str] = []
        self.rank_ips: list[str] = []
        self.rank_pids: list[int] = []
        self._pg = None
        self._closed = False
        self._owns_ray = _connect_ray(p.ray_address, self.world_size)
        self._tag = f"flotilla-{uuid.uuid4().hex[:8]}"
        try:
            self._place(placement_strategy, placement_timeout_s)
            self._start_actors(startup_timeout_s)
        except BaseException:
            self._teardown()
            raise
        self._log_plan()

    # ----- startup -----

    def _gpu(self) -> bool:
        return self.config.device.device.startswith("cuda")

    def _bundle(self) -> dict:
        return {"GPU": 1} if self._gpu() else {"CPU": 1}

    def _place(self, strategy: str, timeout_s: float) -> None:
        """Reserve one bundle per rank; raise EngineDeadError if the cluster cannot within ``timeout_s``."""
        bundles = [self._bundle() for _ in range(self.world_size)]
        self._pg = placement_group(bundles, strategy=strategy, name=self._tag)
        try:
            ray.get(self._pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise EngineDeadError(
                f"the Ray cluster could not place {self.world_size} bundles of {self._bundle()} "
                f"(strategy {strategy}) within {timeout_s:.0f} s; available resources: "
                f"{ray.available_resources()}") from None

    def _start_actors(self, timeout_s: float) -> None:
        """Start one actor per bundle, rendezvous at rank 0's node and load every shard."""
        gpu = self._gpu()
        remote_cls = ray.remote(RankActor)
        wire = encode_engine_config(self.config)
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(placement_group=self._pg,
                                                        placement_group_bundle_index=rank)
            self.actors.append(remote_cls.options(
                num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0, max_restarts=0, max_task_retries=0,
                name=f"{self._tag}-rank{rank}", scheduling_strategy=strategy).remote(wire, rank))
        infos = self._gather([a.node_info.remote() for a in self.actors], timeout_s, "starting the rank actors")
        self.rank_nodes = [i["node_id"] for i in infos]
        self.rank_ips = [i["ip"] for i in infos]
        self.rank_pids = [i["pid"] for i in infos]
        port = self._gather([self.actors[0].free_port.remote()], timeout_s, "choosing a port", ranks=[0])[0]
        init_method = f"tcp://{_url_host(self.rank_ips[0])}:{port}"
        logger.info("ray executor: %d rank actors rendezvous at %s", self.world_size, init_method)
        # Every setup() blocks in init_distributed until all ranks have joined: submit all, then wait.
        self._gather([a.setup.remote(init_method) for a in self.actors], timeout_s,
                     "joining the process group and loading the model")

    def _log_plan(self) -> None:
        p = self.config.parallel
        for line in describe_parallel_plan(self.config.model.num_layers, p.tensor_parallel_size,
                                           p.pipeline_parallel_size, p.pipeline_partition):
            logger.info("parallel plan: %s", line)
        for rank in range(self.world_size):
            logger.info("ray executor: rank %d (pp stage %d, tp rank %d) on node %s (%s), pid %d", rank,
                        rank // p.tensor_parallel_size, rank % p.tensor_parallel_size,
                        self.rank_nodes[rank][:12], self.rank_ips[rank], self.rank_pids[rank])

    # ----- calls -----

    @property
    def max_concurrent_batches(self) -> int:
        return self.config.parallel.pipeline_parallel_size

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        if kwargs:
            raise TypeError("collective_rpc takes positional arguments only (they travel as msgpack)")
        self._check()
        data = TO_WORKER.encode(Rpc(method, list(args)))
        try:
            replies = self._gather([a.rpc.remote(data) for a in self.actors], self.step_timeout_s,
                                   f"rpc {method}")
            return [expect(FROM_WORKER.decode(r), RpcResult).value for r in replies]
        except (EngineDeadError, WireError) as e:
            raise self._fail(str(e)) from e

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        self._check()
        data = TO_WORKER.encode(Step(scheduler_output))
        try:
            refs = [a.execute.remote(data) for a in self.actors]
        except Exception as e:  # noqa: BLE001 - submitting to a dead actor
            raise self._fail(f"submitting a step failed: {type(e).__name__}: {e}") from e
        return StepHandle(lambda handle: self._resolve(handle, refs))

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(scheduler_output).result()

    def _resolve(self, handle: StepHandle, refs: list) -> None:
        """Wait for every rank's reply to one step; the sampler rank's reply is the step's output."""
        if self.dead is not None:
            handle.set_error(EngineDeadError(self.dead))
            return
        try:
            replies = self._gather(refs, self.step_timeout_s, "a model step")
            output = expect(FROM_WORKER.decode(replies[self.sampler_rank]), StepResult).output
        except (EngineDeadError, WireError) as e:
            handle.set_error(self._fail(str(e)))
            return
        handle.set_result(output)

    def _check(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self._closed:
            raise EngineDeadError("the ray executor was shut down")

    def _fail(self, message: str) -> EngineDeadError:
        """Mark the executor dead and kill every actor (none may stay blocked in a collective). ``message``
        (which rank, Ray's error text) goes to the log; the error says ``WORKER_RANK_FAILED``."""
        if self.dead is None:
            self.dead = WORKER_RANK_FAILED
            logger.error("ray executor: %s: %s; stopping every rank", WORKER_RANK_FAILED, message)
            self._kill_actors()
        return EngineDeadError(self.dead)

    def _gather(self, refs: list, timeout_s: float, what: str, ranks: list[int] | None = None) -> list:
        """``ray.get(refs)``, but the first failed or missing reply raises EngineDeadError at once.

        A failure names the rank and the cause (actor died, or the exception the rank raised, e.g. a
        collective timeout); no reply from some rank within ``timeout_s`` is a failure too.
        """
        ranks = ranks if ranks is not None else list(range(len(refs)))
        rank_of = {ref: rank for ref, rank in zip(refs, ranks)}
        pending = list(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(rank_of[r] for r in pending)
                raise EngineDeadError(f"{what}: no reply from rank(s) {missing} within {timeout_s:.0f} s")
            ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise EngineDeadError(f"rank {rank_of[ref]} failed during {what}: "
                                          f"{_describe_ray_error(e)}") from e
        return ray.get(list(refs))

    # ----- shutdown -----

    def shutdown(self) -> None:
        """Stop every rank (politely if healthy, then ``ray.kill``) and release the placement group."""
        if self._closed:
            return
        if self.dead is None and self.actors:
            with contextlib.suppress(Exception):
                ray.get([a.close.remote() for a in self.actors], timeout=10.0)
        self._teardown()

    def _teardown(self) -> None:
        self._closed = True
        self._kill_actors()
        if self._pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self._pg)
            self._pg = None
        if self._owns_ray:
            self._owns_ray = False
            with contextlib.suppress(Exception):
                ray.shutdown()

    def _kill_actors(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors = []


def _describe_ray_error(e: BaseException) -> str:
    """One line for a Ray error: the actor's own exception for a task error, else the error type."""
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause if getattr(e, "cause", None) is not None else e
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[-1] if text else ''}"
    if isinstance(e, ray.exceptions.RayActorError):
        return "its Ray actor died (killed, crashed, or its node was lost)"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _connect_ray(address: str | None, world_size: int) -> bool:
    """Make sure this process has a Ray connection; return True if we started a local instance.

    An existing connection is reused as is. With ``address`` we join that cluster (and never shut it
    down). Without one we always start a new local instance (even if RAY_ADDRESS names a cluster) bound
    to loopback, dashboard off, with at least ``world_size`` logical CPUs so every rank fits.
    """
    if ray.is_initialized():
        if address:
            logger.info("ray executor: this process is already connected to Ray; using that connection "
                        "(ray_address %s not re-initialised)", address)
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    from flotilla.distributed.ray_compat import loopback_only_ray
    with loopback_only_ray():
        # address="local": always a new instance, never a cluster found through RAY_ADDRESS or the
        # "latest cluster" file that ``ray start`` and ray.cluster_utils leave behind.
        ray.init(address="local", num_cpus=max(world_size, os.cpu_count() or 1), include_dashboard=False,
                 dashboard_host=_LOOPBACK, log_to_driver=True)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != _LOOPBACK:
        logger.warning("ray executor: the local Ray instance runs on %s, not loopback", node_ip)
    else:
        logger.info("ray executor: started a local Ray instance on loopback (dashboard off)")
    return True
