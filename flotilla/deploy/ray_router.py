"""FlotillaRequestRouter: Ray Serve's request-router hook driven by flotilla's pure routing policies.

Ray Serve asks a deployment's request router (one per deployment handle, in the calling process: here the
OpenAI ingress) to rank candidate replicas for each request. This adapter turns the candidates and their
queue lengths (Serve's cache, or a probe) into ``ReplicaLoad``s, asks the policy of
``flotilla.deploy.routing`` (prefix-aware by default) with the request's prompt token ids as the prefix,
and returns the policy's choice first and the other replicas, least loaded first, as the fallback rank
(Serve sends to the first replica of a rank that is not full). When Serve confirms a request was accepted,
the policy is told (``on_routed``); replicas that disappear are forgotten. Only Serve's public request-router
surface (``ray.serve.request_router``: ``curr_replicas``, ``replica_queue_len_cache``,
``RunningReplica.get_queue_len`` and the ``on_*`` hooks) is used.

Serve's queue-length cache lags a burst: several routing tasks choose before any of their requests is sent,
and a replica's report overwrites the cache with a count that misses requests still on their way to it. So
the router also counts its own traffic: choices not yet sent, and requests sent but not completed. A replica's
load is the larger of the cache and its outstanding count, plus its unsent choices.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict, deque
from collections.abc import Sequence

from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from flotilla.deploy import replica_failures
from flotilla.deploy.replica_failures import FailedReplicas
from flotilla.deploy.routing import ReplicaLoad, RoutingPolicy, make_policy
from flotilla.deploy.serve_wire import GenerateRequest, request_of

logger = logging.getLogger(__name__)

ROUTER_CLASS_PATH = "flotilla.deploy.ray_router.FlotillaRequestRouter"
# A choice Serve has not sent within this long went to another rank's replica or was cancelled: drop it.
UNSENT_CHOICE_TTL_S = 2.0


def generate_request(pending_request: PendingRequest | None) -> GenerateRequest | None:
    """The ``GenerateRequest`` of a ``ModelServer.generate`` call (its first argument: the request's bytes),
    else None."""
    if pending_request is None or not pending_request.args:
        return None
    return request_of(pending_request.args[0])


def request_prefix(pending_request: PendingRequest | None) -> list[int] | None:
    """The prompt token ids of a ``ModelServer.generate`` call, else None."""
    request = generate_request(pending_request)
    return None if request is None else request.prompt_token_ids


class FlotillaRequestRouter(RequestRouter):
    """Routes a model deployment's requests with a flotilla ``RoutingPolicy``.

    Contract: configured through ``RequestRouterConfig(request_router_class=ROUTER_CLASS_PATH,
    request_router_kwargs={...})``; ``initialize_state`` takes ``policy`` (a name for ``make_policy``),
    ``seed``, ``max_num_seqs`` (a replica's engine batch size: a replica with that many requests in flight
    counts as saturated) and ``policy_kwargs``. Each routing round ranks ``[[policy choice], [the others,
    least loaded first]]``; replicas whose queue length cannot be learnt, whose routing stats say their
    engine is unhealthy, or that this process saw fail a request recently (``FAILED_REPLICAS``), are left
    out while others remain. A request's own ``exclude_replicas`` (those it already failed on) are never
    offered: when no other replica exists the rank is empty and Serve backs off and asks again until one
    appears (the failed replica's replacement). The policy forgets replicas that leave.

    A replica's load is ``max(Serve's cached queue length, requests this router sent it that have not
    completed) + choices of it not yet sent`` (a choice expires after ``UNSENT_CHOICE_TTL_S``), so a burst
    routed between two cache updates still sees each earlier choice.
    """

    def initialize_state(self, policy: str = "prefix_aware", seed: int | None = None,
                         max_num_seqs: int | None = None, policy_kwargs: dict | None = None, **_ignored) -> None:
        self.policy_name = policy
        self.policy: RoutingPolicy = make_policy(policy, rng=random.Random(seed), **(policy_kwargs or {}))
        self.max_num_seqs = max_num_seqs
        self.clock = time.monotonic
        self._unsent: defaultdict[str, deque[float]] = defaultdict(deque)  # replica -> times of unsent choices
        self._outstanding: defaultdict[str, int] = defaultdict(int)       # replica -> sent, not completed
        # this process's registry (through the module: Serve pickles this class by value, and a lock cannot be)
        self.failed: FailedReplicas = replica_failures.FAILED_REPLICAS

    def _ensure_policy(self) -> None:
        if not hasattr(self, "policy"):  # initialize_state is always called by Serve; be safe in tests
            self.initialize_state()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        self._ensure_policy()
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every rank tried: back off before retrying
        request = generate_request(pending_request)
        excluded = set(request.exclude_replicas) if request is not None else set()
        allowed = [r for r in candidate_replicas if _rid(r) not in excluded]
        if not allowed:
            return []
        usable = [r for r in allowed if (r.routing_stats or {}).get("healthy", True)
                  and not self.failed.is_failed(_rid(r))]
        replicas = usable or allowed
        loads = await self._loads(replicas)
        if not loads:
            return [list(replicas)]
        by_id = {_rid(r): r for r in replicas}
        prefix = request.prompt_token_ids if request is not None else None
        chosen = self.policy.choose([load for load, _ in loads], prefix)
        self._unsent[chosen].append(self.clock())
        rest = [r for load, r in sorted(loads, key=lambda x: (x[0].num_ongoing, x[0].replica_id))
                if load.replica_id != chosen]
        return [[by_id[chosen]], rest] if rest else [[by_id[chosen]]]

    async def _loads(self, replicas: Sequence[RunningReplica]) -> list[tuple[ReplicaLoad, RunningReplica]]:
        """Each replica's requests in flight: Serve's queue-length cache, else a probe (unknown: left out)."""
        known: dict[ReplicaID, int] = {}
        missing = []
        for r in replicas:
            n = self.replica_queue_len_cache.get(r.replica_id)
            if n is None:
                missing.append(r)
            else:
                known[r.replica_id] = n
        if missing:
            known.update(await self._probe(missing))
        loads = []
        for r in replicas:
            if r.replica_id in known:
                cap = r.max_ongoing_requests
                if self.max_num_seqs:
                    cap = min(cap, self.max_num_seqs)
                rid = _rid(r)
                n = max(known[r.replica_id], self._outstanding.get(rid, 0)) + self._fresh_unsent(rid)
                loads.append((ReplicaLoad(rid, n, cap), r))
        return loads

    async def _probe(self, replicas: Sequence[RunningReplica]) -> dict[ReplicaID, int]:
        """Ask each replica for its queue length (``RunningReplica.get_queue_len``) within Serve's response
        deadline (``queue_len_response_deadline_s``); answers go into Serve's cache. A replica that does not
        answer in time is left out; one whose actor died is dropped (``on_replica_actor_died``), one that is
        unreachable for now is marked so (``on_replica_actor_unavailable``), as Serve's own routers do."""
        deadline_s = self.queue_len_response_deadline_s
        tasks = {asyncio.ensure_future(r.get_queue_len(deadline_s=deadline_s)): r for r in replicas}
        done, pending = await asyncio.wait(list(tasks), timeout=deadline_s)
        for t in pending:
            t.cancel()
            logger.warning("no queue length from replica %s within %.2f s", _rid(tasks[t]), deadline_s)
        known: dict[ReplicaID, int] = {}
        for t in done:
            if t.cancelled():
                continue
            r, error = tasks[t], t.exception()
            if error is None:
                known[r.replica_id] = t.result()
                self.replica_queue_len_cache.update(r.replica_id, known[r.replica_id])
                continue
            logger.warning("no queue length from replica %s: %s", _rid(r), error)
            if isinstance(error, ActorDiedError):
                self.on_replica_actor_died(r.replica_id)
            elif isinstance(error, ActorUnavailableError):
                self.on_replica_actor_unavailable(r.replica_id)
        return known

    def _fresh_unsent(self, rid: str) -> int:
        """Choices of this replica not yet sent, after dropping the expired ones (oldest first)."""
        times = self._unsent.get(rid)
        if not times:
            return 0
        horizon = self.clock() - UNSENT_CHOICE_TTL_S
        while times and times[0] < horizon:
            times.popleft()
        return len(times)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self._ensure_policy()
        rid = replica_id.unique_id
        times = self._unsent.get(rid)
        if times:
            times.popleft()
        self._outstanding[rid] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._ensure_policy()
        rid = replica_id.unique_id
        if self._outstanding.get(rid, 0) > 0:
            self._outstanding[rid] -= 1

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._ensure_policy()
        prefix = request_prefix(pending_request)
        if prefix:
            self.policy.on_routed(replica_id.unique_id, prefix)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        self._ensure_policy()
        before = {rid.unique_id for rid in self.curr_replicas}
        super().update_replicas(replicas)
        after = {rid.unique_id for rid in self.curr_replicas}
        for gone in before - after:
            self._forget(gone)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._ensure_policy()
        self._forget(replica_id.unique_id)

    def _forget(self, rid: str) -> None:
        self.failed.forget(rid)
        self.policy.forget_replica(rid)
        self._unsent.pop(rid, None)
        self._outstanding.pop(rid, None)


def _rid(r: RunningReplica) -> str:
    return r.replica_id.unique_id
