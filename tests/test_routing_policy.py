"""Routing policies as pure functions: synthetic replica loads, a seeded rng and a fake clock."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from flotilla.deploy.routing import (ROUTING_POLICIES, PowerOfTwoChoices, PrefixAware, ReplicaLoad, RoundRobin,
                                     choose_weighted, make_policy)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def loads(*counts: int, max_ongoing: int | None = None) -> list[ReplicaLoad]:
    return [ReplicaLoad(f"r{i}", n, max_ongoing) for i, n in enumerate(counts)]


def prefix_policy(**kw) -> tuple[PrefixAware, FakeClock]:
    clock = FakeClock()
    kw.setdefault("block_size", 4)
    return PrefixAware(clock=clock, rng=random.Random(0), **kw), clock


SYSTEM = list(range(100, 132))   # 8 full blocks of 4


# --- round robin / power of two ---

def test_round_robin_cycles_in_sorted_order():
    rr = RoundRobin()
    replicas = [ReplicaLoad("b", 0), ReplicaLoad("c", 5), ReplicaLoad("a", 9)]
    assert [rr.choose(replicas) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_round_robin_survives_replica_changes():
    rr = RoundRobin()
    assert rr.choose(loads(0, 0, 0)) == "r0"
    assert rr.choose(loads(0, 0, 0)) == "r1"
    assert rr.choose([ReplicaLoad("r0", 0), ReplicaLoad("r2", 0)]) == "r2"   # r1 left: no skip
    assert rr.choose([ReplicaLoad("r0", 0)]) == "r0"


@pytest.mark.parametrize("policy", [RoundRobin(), PowerOfTwoChoices(random.Random(0)), PrefixAware()])
def test_empty_replicas_raise(policy):
    with pytest.raises(ValueError):
        policy.choose([], [1, 2, 3])


def test_power_of_two_takes_less_loaded_of_its_samples():
    replicas = loads(5, 1, 9, 3)
    by_id = {r.replica_id: r for r in replicas}
    ref, p2c = random.Random(7), PowerOfTwoChoices(random.Random(7))
    for _ in range(200):
        a, b = ref.sample(replicas, 2)
        got = p2c.choose(replicas)
        assert got in (a.replica_id, b.replica_id)
        assert by_id[got].num_ongoing == min(a.num_ongoing, b.num_ongoing)
    # The most loaded replica is never chosen: it always loses its comparison.
    assert "r2" not in {p2c.choose(replicas) for _ in range(200)}


def test_power_of_two_spreads_load_and_handles_one_replica():
    p2c = PowerOfTwoChoices(random.Random(1))
    counts = [0] * 4
    for _ in range(400):
        replicas = loads(*counts)
        counts[int(p2c.choose(replicas)[1:])] += 1
    assert max(counts) - min(counts) <= 2
    assert PowerOfTwoChoices().choose([ReplicaLoad("only", 50)], "prompt") == "only"


# --- prefix aware ---

def route(policy: PrefixAware, replicas, prefix) -> str:
    rid = policy.choose(replicas, prefix)
    policy.on_routed(rid, prefix)
    return rid


def test_shared_prefix_sticks_to_one_replica():
    policy, _ = prefix_policy()
    replicas = loads(0, 0, 0, 0)
    first = route(policy, replicas, SYSTEM + [1, 2, 3, 4])
    for tail in range(20):
        assert route(policy, replicas, SYSTEM + [tail] * 6) == first
    assert policy.match_blocks(first, SYSTEM + [999] * 4) == 8
    # A different prefix goes wherever power-of-two sends it (not necessarily the affine replica).
    others = {route(policy, replicas, [900 + i] * 8) for i in range(30)}
    assert len(others) > 1


def test_longest_match_wins():
    policy, _ = prefix_policy()
    replicas = loads(0, 0)
    policy.on_routed("r0", SYSTEM[:8])
    policy.on_routed("r1", SYSTEM)
    assert policy.match_blocks("r0", SYSTEM) == 2
    assert policy.choose(replicas, SYSTEM) == "r1"
    assert policy.choose(replicas, SYSTEM[:8]) == "r0"   # tie on 2 blocks: r0 by id, same load


def test_overloaded_affine_replica_is_avoided():
    policy, _ = prefix_policy(imbalance_threshold=4)
    policy.on_routed("r0", SYSTEM)
    assert policy.choose(loads(4, 0, 0), SYSTEM) == "r0"        # 4 more than the least loaded: still fine
    assert policy.choose(loads(5, 0, 0), SYSTEM) != "r0"        # 5 more: overloaded, fall back
    # The next-best match is used when it is not overloaded.
    policy.on_routed("r2", SYSTEM[:12])
    assert policy.choose(loads(9, 8, 4), SYSTEM) == "r2"
    picks = {policy.choose(loads(9, 0, 5), SYSTEM) for _ in range(30)}   # both overloaded: power of two
    assert "r1" in picks and "r0" not in picks


def test_saturated_affine_replica_is_avoided():
    policy, _ = prefix_policy(saturation_fraction=0.5)
    policy.on_routed("r0", SYSTEM)
    assert policy.choose(loads(3, 0, max_ongoing=8), SYSTEM) == "r0"
    assert policy.choose(loads(4, 2, max_ongoing=8), SYSTEM) == "r1"   # 4 >= 0.5 * 8
    assert policy.choose(loads(4, 2), SYSTEM) == "r0"                 # max unknown: only imbalance counts


def test_ttl_expires_affinity():
    policy, clock = prefix_policy(ttl_s=60)
    policy.on_routed("r1", SYSTEM)
    clock.now += 60
    assert policy.match_blocks("r1", SYSTEM) == 8
    policy.on_routed("r1", SYSTEM[:4])           # refreshes the root block only
    clock.now += 1
    assert policy.match_blocks("r1", SYSTEM) == 1
    clock.now += 60
    assert policy.match_blocks("r1", SYSTEM) == 0


def test_forget_replica_drops_affinity():
    policy, _ = prefix_policy()
    policy.on_routed("r1", SYSTEM)
    policy.forget_replica("r1")
    policy.forget_replica("never-seen")
    assert policy.match_blocks("r1", SYSTEM) == 0


def test_partial_blocks_do_not_count():
    policy, _ = prefix_policy()
    policy.on_routed("r0", [1, 2, 3])                 # less than one block: nothing remembered
    assert policy.match_blocks("r0", [1, 2, 3]) == 0
    policy.on_routed("r0", [1, 2, 3, 4, 5, 6, 7])     # one full block + 3 ignored
    assert policy.match_blocks("r0", [1, 2, 3, 4, 5, 6, 7, 99]) == 1
    assert policy.match_blocks("r0", [1, 2, 3, 5]) == 0
    assert policy.match_blocks("r0", None) == 0


def test_str_and_token_prefixes():
    policy, _ = prefix_policy(block_size=8)
    text = "You are a helpful assistant. " * 3        # 87 chars: 10 full blocks
    policy.on_routed("r1", text)
    assert policy.match_blocks("r1", text + "Hello") == 10
    assert policy.match_blocks("r1", "You are a helpful") == 2
    assert policy.match_blocks("r1", "x" + text) == 0
    assert policy.choose(loads(0, 0, 0), text + "What is 2+2?") == "r1"
    assert policy.match_blocks("r1", [ord(c) for c in text]) == 0   # text and token ids never collide


def test_chain_hash_identifies_whole_prefix():
    policy, _ = prefix_policy()
    policy.on_routed("r0", [1, 2, 3, 4, 5, 6, 7, 8])
    assert policy.match_blocks("r0", [0, 0, 0, 0, 5, 6, 7, 8]) == 0   # same second block, other first


def test_max_blocks_per_replica_evicts_lru():
    policy, clock = prefix_policy(max_blocks_per_replica=4)
    a, b, c = [1] * 8, [2] * 8, [3] * 8                # 2 blocks each
    policy.on_routed("r0", a)
    clock.now += 1
    policy.on_routed("r0", b)
    clock.now += 1
    policy.on_routed("r0", a)                          # a is now more recent than b
    clock.now += 1
    policy.on_routed("r0", c)
    assert policy.match_blocks("r0", a) == 2
    assert policy.match_blocks("r0", b) == 0
    assert policy.match_blocks("r0", c) == 2
    # Deep tails go before shared roots.
    policy.on_routed("r0", [4] * 12)                   # 3 new blocks, only 4 kept
    assert policy.match_blocks("r0", [4] * 12) == 3
    assert policy.match_blocks("r0", c) == 1           # c's tail went, its root stayed
    assert policy.match_blocks("r0", a) == 0


def test_min_match_blocks():
    policy, _ = prefix_policy(min_match_blocks=3)
    policy.on_routed("r0", SYSTEM[:8])
    picks = {policy.choose(loads(0, 0, 0, 0), SYSTEM) for _ in range(40)}
    assert len(picks) > 1                              # 2 blocks < 3: no affinity


# --- weighted choice / factory ---

def test_choose_weighted_splits_by_weight_and_reproduces():
    weights = {"stable": 90, "canary": 10}
    picks = [choose_weighted(weights, random.Random(3)) for _ in range(3)]
    assert len(set(picks)) == 1                                     # same seed, same choice
    rng = random.Random(42)
    got = Counter(choose_weighted(weights, rng) for _ in range(1000))
    assert abs(got["canary"] / 1000 - 0.10) <= 0.03
    rng1, rng2 = random.Random(5), random.Random(5)
    assert [choose_weighted(weights, rng1) for _ in range(50)] == [choose_weighted(weights, rng2) for _ in range(50)]
    assert Counter(choose_weighted({"a": 1, "b": 0, "c": 3}, rng) for _ in range(1000))["b"] == 0


def test_choose_weighted_sticky():
    weights = {"v1": 70, "v2": 30}
    rng = random.Random(0)
    for user in ("alice", "bob", ""):
        first = choose_weighted(weights, rng, sticky_key=user)
        assert all(choose_weighted(dict(reversed(weights.items())), random.Random(i), sticky_key=user) == first
                   for i in range(20))
    got = Counter(choose_weighted(weights, rng, sticky_key=f"user-{i}") for i in range(1000))
    assert abs(got["v2"] / 1000 - 0.30) <= 0.04
    # Growing the first-sorted target only moves users into it.
    users = [f"user-{i}" for i in range(300)]
    before = {u for u in users if choose_weighted({"a": 10, "b": 90}, rng, u) == "a"}
    after = {u for u in users if choose_weighted({"a": 30, "b": 70}, rng, u) == "a"}
    assert before <= after and len(after) > len(before)


@pytest.mark.parametrize("weights", [{}, {"a": 0, "b": 0}, {"a": -1, "b": 2}, {"a": float("nan")},
                                     {"a": float("inf")}, {"a": "10"}])
def test_choose_weighted_bad_weights(weights):
    with pytest.raises(ValueError):
        choose_weighted(weights, random.Random(0))


def test_make_policy():
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("power_of_two", rng=random.Random(0)), PowerOfTwoChoices)
    policy = make_policy("prefix_aware", rng=random.Random(0), block_size=2, ttl_s=5.0)
    assert isinstance(policy, PrefixAware) and policy.block_size == 2 and policy.ttl_s == 5.0
    with pytest.raises(ValueError) as err:
        make_policy("least_loaded")
    assert all(name in str(err.value) for name in ROUTING_POLICIES)
