"""``ReplicaSet``: several engine replicas of one model behind one ``EngineClient`` surface (embedded mode).

Each new request goes to the replica a ``RoutingPolicy`` chooses (its prefix is the prompt's token ids,
or its text when no ids are given); aborts go to the replica holding the request.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Sequence

from flotilla.deploy.routing import ReplicaLoad, RoutingPolicy
from flotilla.engine.output_processor import OutputKind
from flotilla.errors import EngineDeadError, InvalidRequestError
from flotilla.scheduler.scheduler import SchedulerStats, add_step_counts

logger = logging.getLogger(__name__)


class ReplicaSet:
    """N engines of the same model as one ``EngineClient`` (``flotilla.engine.protocol``).

    Contract: ``generate`` routes the request when first iterated: ``policy.choose`` over the live replicas
    (``num_ongoing`` = requests this set has in flight there, ``max_ongoing`` = the replica's
    ``max_num_seqs``), then ``policy.on_routed``; the stream is the chosen replica's. ``abort`` reaches the
    replica holding each id (ids not in flight are ignored). ``is_dead`` is True as soon as any replica is
    dead (the server then reports 503 on /health and exits, as with one engine); until then new requests
    avoid dead replicas. ``num_queued_requests``, ``num_unfinished_requests``, ``num_blocks`` and the
    counters of ``latest_stats`` are sums over replicas; ``latest_stats.kv_cache_usage`` is the
    block-weighted mean. ``config``, ``model_config``, ``tokenizer`` and ``input_processor`` are the first
    replica's (every replica runs the same model and settings). ``shutdown`` stops every replica.
    Use from one event loop.
    """

    def __init__(self, replicas: Sequence, policy: RoutingPolicy, replica_ids: Sequence[str] | None = None):
        if not replicas:
            raise ValueError("a ReplicaSet needs at least one replica")
        self.replicas = tuple(replicas)
        self.replica_ids = tuple(replica_ids or (f"replica-{i}" for i in range(len(replicas))))
        if len(set(self.replica_ids)) != len(self.replicas):
            raise ValueError("replica ids must be unique, one per replica")
        self.policy = policy
        first = self.replicas[0]
        self.config, self.model_config = first.config, first.model_config
        self.tokenizer, self.input_processor = first.tokenizer, first.input_processor
        self._by_id = dict(zip(self.replica_ids, self.replicas))
        self._owner: dict[str, str] = {}  # request id -> replica id, while in flight
        self.num_ongoing = dict.fromkeys(self.replica_ids, 0)
        self.num_routed = dict.fromkeys(self.replica_ids, 0)  # requests ever sent to each replica

    # ---- EngineClient ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return sum(r.num_blocks for r in self.replicas)

    @property
    def dead_error(self) -> BaseException | None:
        return next((r.dead_error for r in self.replicas if r.dead_error is not None), None)

    @property
    def is_dead(self) -> bool:
        return any(r.is_dead for r in self.replicas)

    @property
    def num_queued_requests(self) -> int:
        return sum(r.num_queued_requests for r in self.replicas)

    @property
    def num_unfinished_requests(self) -> int:
        return sum(r.num_unfinished_requests for r in self.replicas)

    @property
    def latest_stats(self) -> SchedulerStats:
        stats = [r.latest_stats for r in self.replicas]
        blocks = [max(r.num_blocks, 0) for r in self.replicas]
        total = sum(blocks)
        usage = (sum(s.kv_cache_usage * b for s, b in zip(stats, blocks)) / total if total
                 else sum(s.kv_cache_usage for s in stats) / len(stats))
        return SchedulerStats(num_running=sum(s.num_running for s in stats),
                              num_waiting=sum(s.num_waiting for s in stats), kv_cache_usage=usage,
                              prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
                              prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
                              num_preemptions=sum(s.num_preemptions for s in stats),
                              iteration_tokens=functools.reduce(add_step_counts,
                                                                (s.iteration_tokens for s in stats), ()),
                              iteration_tokens_sum=sum(s.iteration_tokens_sum for s in stats))

    async def generate(self, prompt, sampling_params, request_id: str,
                       output_kind: OutputKind = OutputKind.CUMULATIVE, priority: int = 0) -> AsyncIterator:
        if request_id in self._owner:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        replica_id = self._route(prompt)
        self._owner[request_id] = replica_id
        self.num_ongoing[replica_id] += 1
        stream = self._by_id[replica_id].generate(prompt, sampling_params, request_id, output_kind, priority=priority)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()
            self.num_ongoing[replica_id] -= 1
            if self._owner.get(request_id) == replica_id:
                del self._owner[request_id]

    def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        by_replica: dict[str, list[str]] = {}
        for rid in ids:
            owner = self._owner.get(rid)
            if owner is not None:
                by_replica.setdefault(owner, []).append(rid)
        for replica_id, rids in by_replica.items():
            self._by_id[replica_id].abort(rids)

    def shutdown(self) -> None:
        """Shut every replica down (each is tried even if another fails; the first error is re-raised)."""
        first_error = None
        for replica_id, replica in zip(self.replica_ids, self.replicas):
            try:
                replica.shutdown()
            except Exception as e:  # noqa: BLE001 - still stop the others
                logger.error("shutting down %s failed: %s", replica_id, e)
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    # ---- routing ---------------------------------------------------------------------------------
    def replica_of(self, request_id: str) -> str | None:
        """The replica holding a request in flight (None if it is not in flight)."""
        return self._owner.get(request_id)

    def _route(self, prompt) -> str:
        live = [(rid, r) for rid, r in zip(self.replica_ids, self.replicas) if not r.is_dead]
        if not live:
            raise EngineDeadError(f"every replica is dead: {self.dead_error}")
        loads = [ReplicaLoad(rid, self.num_ongoing[rid], _max_num_seqs(r)) for rid, r in live]
        prefix = _prefix_of(prompt)
        replica_id = self.policy.choose(loads, prefix)
        self.policy.on_routed(replica_id, prefix)
        self.num_routed[replica_id] += 1
        return replica_id


def _max_num_seqs(engine) -> int | None:
    scheduler = getattr(getattr(engine, "config", None), "scheduler", None)
    return getattr(scheduler, "max_num_seqs", None)


def _prefix_of(prompt):
    """The routing prefix: token ids when the prompt carries them, else its text (None if neither)."""
    if isinstance(prompt, dict):
        ids = prompt.get("prompt_token_ids")
        return list(ids) if ids is not None else prompt.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    return None
