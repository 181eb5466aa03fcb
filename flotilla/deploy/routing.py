"""Request routing over replicas: pure policies (stdlib only, no Ray, no torch), tested with a fake clock.

A policy sees a snapshot of replica loads and returns a replica id; the caller sends the request there and
then reports it with ``on_routed`` (only the prefix-aware policy remembers anything). ``choose_weighted``
picks the target of a model alias by traffic-split weight, optionally sticky per user.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

ROUTING_POLICIES = ("prefix_aware", "power_of_two", "round_robin")

Prefix = Sequence[int] | str | None


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as the router sees it now."""
    replica_id: str
    num_ongoing: int                 # requests in flight on it (running + queued)
    max_ongoing: int | None = None   # its saturation point (e.g. max_num_seqs); None = unknown


def _check_replicas(replicas: Sequence[ReplicaLoad]) -> None:
    if not replicas:
        raise ValueError("no replicas to route to")


class RoutingPolicy:
    """Chooses a replica for each request. ``choose`` raises ValueError on an empty replica list; policies that
    ignore ``prefix`` still accept it. Implementations are safe to call from several threads."""

    def choose(self, replicas: Sequence[ReplicaLoad], prefix: Prefix = None) -> str:
        """Return the replica_id to send the request to."""
        raise NotImplementedError

    def on_routed(self, replica_id: str, prefix: Prefix) -> None:
        """Record that a request with this prefix was sent to replica_id (no-op unless the policy remembers)."""

    def forget_replica(self, replica_id: str) -> None:
        """The replica is gone: drop what is remembered about it."""


class RoundRobin(RoutingPolicy):
    """Cycles over the replicas in sorted replica_id order. It remembers the last id it chose, so replicas
    joining or leaving neither skip nor repeat the others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: str | None = None

    def choose(self, replicas: Sequence[ReplicaLoad], prefix: Prefix = None) -> str:
        _check_replicas(replicas)
        ids = sorted(r.replica_id for r in replicas)
        with self._lock:
            i = 0 if self._last is None else bisect.bisect_right(ids, self._last) % len(ids)
            self._last = ids[i]
            return ids[i]


class PowerOfTwoChoices(RoutingPolicy):
    """Samples two distinct replicas at random and takes the one with fewer requests in flight (ties: the first
    sampled). With one replica, that one."""

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()
        self._lock = threading.Lock()

    def choose(self, replicas: Sequence[ReplicaLoad], prefix: Prefix = None) -> str:
        _check_replicas(replicas)
        if len(replicas) == 1:
            return replicas[0].replica_id
        with self._lock:
            a, b = self._rng.sample(list(replicas), 2)
        return (b if b.num_ongoing < a.num_ongoing else a).replica_id


def _block_keys(prefix: Prefix, block_size: int) -> list[bytes]:
    """Chain-hashed keys of the full blocks of ``prefix``: key i identifies the whole prefix up to block i."""
    if not prefix:
        return []
    is_text = isinstance(prefix, str)
    keys: list[bytes] = []
    parent = b"t" if is_text else b"i"   # domain tag: text and token ids never share keys
    for start in range(0, len(prefix) - block_size + 1, block_size):
        block = prefix[start:start + block_size]
        payload = block.encode("utf-8") if is_text else struct.pack(f"<{block_size}q", *block)
        parent = hashlib.blake2b(parent + payload, digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixAware(RoutingPolicy):
    """Prefix-cache affinity: send a request to the replica that already saw the longest run of its leading
    blocks (so its KV prefix cache hits), unless that replica is overloaded; otherwise power-of-two choices.

    A replica is overloaded when its ``num_ongoing`` exceeds the least loaded replica's by more than
    ``imbalance_threshold``, or when ``num_ongoing >= saturation_fraction * max_ongoing`` (max_ongoing known).
    Matching replicas are tried longest match first (ties: less loaded, then replica_id); a match counts only
    when it is at least ``min_match_blocks`` full blocks of ``block_size`` tokens (characters for a str).
    Remembered blocks expire ``ttl_s`` after their last use (by ``clock``), and each replica keeps at most
    ``max_blocks_per_replica`` of them, evicting the least recently used (deepest blocks first, so shared
    roots such as a system prompt outlive the tails that branch off them).
    """

    def __init__(self, *, block_size: int = 16, min_match_blocks: int = 1, imbalance_threshold: int = 8,
                 saturation_fraction: float = 1.0, max_blocks_per_replica: int = 100_000,
                 ttl_s: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        if block_size < 1 or min_match_blocks < 1 or max_blocks_per_replica < 1:
            raise ValueError("block_size, min_match_blocks and max_blocks_per_replica must be >= 1")
        if imbalance_threshold < 0 or saturation_fraction <= 0 or ttl_s <= 0:
            raise ValueError("imbalance_threshold must be >= 0, saturation_fraction and ttl_s > 0")
        self.block_size = block_size
        self.min_match_blocks = min_match_blocks
        self.imbalance_threshold = imbalance_threshold
        self.saturation_fraction = saturation_fraction
        self.max_blocks_per_replica = max_blocks_per_replica
        self.ttl_s = ttl_s
        self._clock = clock
        self._fallback = PowerOfTwoChoices(rng)
        self._lock = threading.Lock()
        # replica_id -> block key -> last-used time, least recently used first.
        self._blocks: dict[str, OrderedDict[bytes, float]] = {}

    def _fresh_blocks(self, replica_id: str, now: float) -> OrderedDict[bytes, float] | None:
        """The replica's remembered blocks after evicting expired ones (they sit at the LRU end). Lock held."""
        blocks = self._blocks.get(replica_id)
        while blocks:
            key, t = next(iter(blocks.items()))
            if now - t <= self.ttl_s:
                break
            del blocks[key]
        return blocks

    def _match(self, replica_id: str, keys: list[bytes], now: float) -> int:
        blocks = self._fresh_blocks(replica_id, now)
        if not blocks:
            return 0
        for i in range(len(keys) - 1, -1, -1):   # chain keys: the deepest hit implies all before it
            if keys[i] in blocks:
                return i + 1
        return 0

    def match_blocks(self, replica_id: str, prefix: Prefix) -> int:
        """Number of leading full blocks of ``prefix`` this replica has seen (and not yet forgotten)."""
        keys = _block_keys(prefix, self.block_size)
        with self._lock:
            return self._match(replica_id, keys, self._clock())

    def _overloaded(self, r: ReplicaLoad, min_load: int) -> bool:
        if r.num_ongoing - min_load > self.imbalance_threshold:
            return True
        return r.max_ongoing is not None and r.num_ongoing >= self.saturation_fraction * r.max_ongoing

    def choose(self, replicas: Sequence[ReplicaLoad], prefix: Prefix = None) -> str:
        _check_replicas(replicas)
        keys = _block_keys(prefix, self.block_size)
        if keys:
            with self._lock:
                now = self._clock()
                matches = {r.replica_id: self._match(r.replica_id, keys, now) for r in replicas}
            min_load = min(r.num_ongoing for r in replicas)
            ranked = sorted(replicas, key=lambda r: (-matches[r.replica_id], r.num_ongoing, r.replica_id))
            for r in ranked:
                if matches[r.replica_id] < self.min_match_blocks:
                    break
                if not self._overloaded(r, min_load):
                    return r.replica_id
        return self._fallback.choose(replicas)

    def on_routed(self, replica_id: str, prefix: Prefix) -> None:
        keys = _block_keys(prefix, self.block_size)
        if not keys:
            return
        with self._lock:
            now = self._clock()
            blocks = self._fresh_blocks(replica_id, now)
            if blocks is None:
                blocks = self._blocks[replica_id] = OrderedDict()
            for key in reversed(keys):   # the root ends most recently used: tails are evicted first
                blocks[key] = now
                blocks.move_to_end(key)
            while len(blocks) > self.max_blocks_per_replica:
                blocks.popitem(last=False)

    def forget_replica(self, replica_id: str) -> None:
        with self._lock:
            self._blocks.pop(replica_id, None)


def make_policy(name: str, *, rng: random.Random | None = None, **kwargs) -> RoutingPolicy:
    """Build a policy by name ('prefix_aware' | 'power_of_two' | 'round_robin'); kwargs go to its constructor."""
    if name == "prefix_aware":
        return PrefixAware(rng=rng, **kwargs)
    if name == "power_of_two":
        return PowerOfTwoChoices(rng=rng, **kwargs)
    if name == "round_robin":
        return RoundRobin(**kwargs)
    raise ValueError(f"unknown routing policy {name!r}; valid choices: {', '.join(ROUTING_POLICIES)}")


def choose_weighted(weights: Mapping[str, float], rng: random.Random, sticky_key: str | None = None) -> str:
    """Pick a target of an alias with probability proportional to its weight.

    Weights need not sum to 100, but each must be finite and >= 0 and their sum > 0 (ValueError otherwise).
    Targets are laid out on [0, total) in sorted name order. Without ``sticky_key`` the point is drawn from
    ``rng``; with it (e.g. the request's ``user``), the point is a sha256 of the key, so the same user always
    lands on the same target for the same weights, users still split by the weights, and ``rng`` is unused.
    Growing the first-sorted target's weight only moves users into it, never out of it.
    """
    items = sorted(weights.items())
    if not items:
        raise ValueError("no targets to choose from")
    for target, w in items:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"weight of {target!r} must be a finite number >= 0, got {w!r}")
    total = math.fsum(w for _, w in items)
    if total <= 0:
        raise ValueError("weights must sum to more than 0")
    if sticky_key is None:
        u = rng.random()
    else:
        digest = hashlib.sha256(sticky_key.encode("utf-8")).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    point = u * total
    acc = 0.0
    for target, w in items:
        acc += w
        if w > 0 and point < acc:
            return target
    return next(t for t, w in reversed(items) if w > 0)   # float rounding at the very top
