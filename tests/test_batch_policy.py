"""The dynamic batcher's pure policy (Triton's semantics) with a fake clock: preferred sizes, the queue delay,
queue policies (REJECT / DELAY, timeouts, max_queue_size), priority levels, batch keys, ordered release."""

from __future__ import annotations

import dataclasses
import random

import pytest

from flotilla.repository import BatcherSettings, BatchQueue, InferError, OrderedRelease, parse_model_config


def settings(db: str = "", max_batch_size: int = 8) -> BatcherSettings:
    text = f'name: "m" max_batch_size: {max_batch_size} dynamic_batching {{ {db} }}'
    config = parse_model_config(text)
    if not config.dynamic_batching.preferred_batch_size and max_batch_size:   # Triton's normalisation
        config.dynamic_batching.preferred_batch_size.append(max_batch_size)
    return BatcherSettings.from_config(config)


def fill(q: BatchQueue, n: int, now: float, start: int = 0, batch_size: int = 1, **kw) -> list[int]:
    ids = list(range(start, start + n))
    for rid in ids:
        q.enqueue(rid, batch_size, now, **kw)
    return ids


def test_a_preferred_size_is_sent_at_once_and_the_largest_reachable_wins():
    q = BatchQueue(settings("preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100000"))
    fill(q, 3, now=0.0)
    d = q.poll(0.0)
    assert d.batch == () and d.wait_s == pytest.approx(0.1)
    fill(q, 1, now=0.01, start=3)
    assert q.poll(0.01).batch == (0, 1, 2, 3)                   # 4 is preferred: no waiting for the delay
    fill(q, 10, now=0.02, start=10)
    assert q.poll(0.02).batch == tuple(range(10, 18))            # 8 reachable: the larger preferred size
    d = q.poll(0.02)
    assert d.batch == () and d.wait_s == pytest.approx(0.1)      # 2 left: wait for the delay
    assert q.poll(0.12).batch == (18, 19)                        # delay over: send what is there
    assert q.poll(0.12).wait_s is None                          # empty: nothing to wait for


def test_requests_count_with_their_batch_size():
    q = BatchQueue(settings("preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 1000000"))
    q.enqueue("a", 3, 0.0)
    q.enqueue("b", 1, 0.0)
    assert q.poll(0.0).batch == ("a", "b")                      # 3 + 1 = preferred 4
    q.enqueue("c", 3, 0.0)
    q.enqueue("d", 3, 0.0)
    assert q.poll(0.0).batch == ("c",)       # c + d passes the largest preferred size: c cannot grow, send it
    d = q.poll(0.0)
    assert d.batch == () and d.wait_s == pytest.approx(1.0)
    q.enqueue("e", 5, 0.5)                                       # up to max_batch_size 8 once delayed out
    assert q.poll(1.0).batch == ("d", "e")
    with pytest.raises(ValueError, match=r"batch size 9 outside \[1, 8\]"):
        q.enqueue("f", 9, 1.0)


def test_zero_delay_sends_whatever_is_queued_up_to_max_batch_size():
    q = BatchQueue(settings("", max_batch_size=4))               # preferred defaults to [max_batch_size]
    fill(q, 6, 0.0)
    assert q.poll(0.0).batch == (0, 1, 2, 3)
    assert q.poll(0.0).batch == (4, 5)


def test_padded_token_budget_cuts_batches_by_rows_times_the_longest():
    """flotilla's extension (an embedding model's max_num_batched_tokens): rows x longest length <= budget."""
    q = BatchQueue(dataclasses.replace(settings("", max_batch_size=8), max_batch_padded_tokens=100))
    for rid, length in enumerate([10, 20, 30, 5, 200, 10]):
        q.enqueue(rid, 1, 0.0, length=length)
    assert q.poll(0.0).batch == (0, 1, 2)      # 3 x 30 = 90; a 4th row makes 4 x 30 = 120 > 100
    assert q.poll(0.0).batch == (3,)           # 5, then 200: 2 x 200 > 100
    assert q.poll(0.0).batch == (4,)           # longer than the budget alone: runs, alone
    assert q.poll(0.0).batch == (5,)
    unlimited = BatchQueue(settings("", max_batch_size=8))
    for rid, length in enumerate([10, 20, 30, 5, 200, 10]):
        unlimited.enqueue(rid, 1, 0.0, length=length)
    assert unlimited.poll(0.0).batch == (0, 1, 2, 3, 4, 5)       # 0: no budget


def test_no_instance_free_means_no_batch_but_timeouts_still_fire():
    q = BatchQueue(settings("default_queue_policy { default_timeout_microseconds: 2000 }"))
    fill(q, 2, 0.0)
    d = q.poll(0.001, can_execute=False)
    assert d.batch == () and d.rejected == () and d.wait_s == pytest.approx(0.001)
    d = q.poll(0.002, can_execute=False)
    assert d.rejected == (0, 1) and len(q) == 0


def test_simulated_arrivals_never_wait_past_the_delay_and_batch_at_preferred_sizes():
    """An event-driven run of the policy: random arrivals, the clock jumps to each arrival or to the wait the
    policy asks for. Every request leaves within the delay; a batch sent before its oldest request's delay is
    over has a preferred size (or could not grow)."""
    delay, preferred, max_bs = 0.005, (4, 6), 8
    q = BatchQueue(settings(f"preferred_batch_size: [ 4, 6 ] max_queue_delay_microseconds: {int(delay * 1e6)}"))
    rng = random.Random(7)
    arrivals, t = [], 0.0
    for i in range(400):
        t += rng.expovariate(600.0)
        arrivals.append((t, i, rng.choice([1, 1, 1, 2, 3])))
    enqueued, sent, now, wait_until, k = {}, [], 0.0, None, 0
    while k < len(arrivals) or len(q):
        next_arrival = arrivals[k][0] if k < len(arrivals) else float("inf")
        if wait_until is not None and wait_until <= next_arrival:
            now = wait_until
        else:
            now, rid, bs = arrivals[k]
            q.enqueue(rid, bs, now)
            enqueued[rid] = (now, bs)
            k += 1
        wait_until = None
        while True:
            d = q.poll(now)
            if not d.batch:
                if d.wake_at is not None:
                    assert d.wait_s == pytest.approx(d.wake_at - now) and d.wait_s >= 0
                    wait_until = d.wake_at
                break
            sent.append((now, d.batch))
    assert sorted(r for _, b in sent for r in b) == list(range(len(arrivals)))
    done: set[int] = set()
    for when, batch in sent:
        size = sum(enqueued[r][1] for r in batch)
        oldest = min(enqueued[r][0] for r in batch)
        done.update(batch)
        assert size <= max_bs
        assert when - oldest <= delay + 1e-12                    # never waits past the delay
        if when - oldest < delay - 1e-12:                        # sent early: a preferred size, or the next
            waiting = [r for r in enqueued if r not in done and enqueued[r][0] <= when]   # request cannot join
            assert size in preferred or (waiting and size + enqueued[min(waiting)][1] > max(preferred))
    sizes = [sum(enqueued[r][1] for r in b) for _, b in sent]
    assert sum(s in preferred for s in sizes) > len(sizes) // 2   # the load makes preferred sizes common


def test_reject_timeouts_answer_and_delay_timeouts_go_behind():
    q = BatchQueue(settings("preferred_batch_size: [ 1 ] "
                            "default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 1000 }",
                            max_batch_size=1))
    q.enqueue("late", 1, 0.0)
    assert q.poll(0.0005, can_execute=False).rejected == ()
    q.enqueue("b", 1, 0.0015)
    q.enqueue("c", 1, 0.0016)
    assert q.poll(0.0016).batch == ("b",)                        # "late" timed out at 0.001: delayed
    assert q.poll(0.0016).batch == ("c",)
    assert q.poll(0.0016).batch == ("late",)                     # delayed, never dropped
    r = BatchQueue(settings("default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 1000 }"))
    r.enqueue("x", 1, 0.0)
    d = r.poll(0.001)
    assert d.rejected == ("x",) and d.batch == ()


def test_timeout_override_only_shortens_and_only_when_allowed():
    allow = BatchQueue(settings("default_queue_policy { default_timeout_microseconds: 10000 "
                                "allow_timeout_override: true }"))
    allow.enqueue("short", 1, 0.0, timeout_us=1000)
    allow.enqueue("long", 1, 0.0, timeout_us=50000)              # may not increase: 10 ms applies
    assert allow.poll(0.001, can_execute=False).rejected == ("short",)
    assert allow.poll(0.0099, can_execute=False).rejected == ()
    assert allow.poll(0.01, can_execute=False).rejected == ("long",)
    deny = BatchQueue(settings("default_queue_policy { default_timeout_microseconds: 10000 }"))
    deny.enqueue("x", 1, 0.0, timeout_us=1000)
    assert deny.poll(0.005, can_execute=False).rejected == ()
    no_default = BatchQueue(settings("default_queue_policy { allow_timeout_override: true }"))
    no_default.enqueue("x", 1, 0.0, timeout_us=1000)             # Triton: no default timeout, no override
    assert no_default.poll(100.0, can_execute=False).rejected == ()


def test_max_queue_size_rejects_at_once_with_triton_s_message():
    q = BatchQueue(settings("max_queue_delay_microseconds: 1000000 default_queue_policy { max_queue_size: 2 }"))
    fill(q, 2, 0.0)
    with pytest.raises(InferError, match="^Exceeds maximum queue size$") as info:
        q.enqueue(2, 1, 0.0)
    assert info.value.code == "UNAVAILABLE" and info.value.http_status == 503
    assert len(q) == 2
    assert q.poll(1.0).batch == (0, 1)
    q.enqueue(2, 1, 1.0)                                         # room again once the batch left


def test_priority_levels_order_and_per_level_policies():
    q = BatchQueue(settings("max_queue_delay_microseconds: 1000000 priority_levels: 3 default_priority_level: 3 "
                            "priority_queue_policy { key: 1 value { max_queue_size: 1 } }", max_batch_size=2))
    q.enqueue("low-a", 1, 0.0)                                   # priority 0: the default level 3
    q.enqueue("low-b", 1, 0.0, priority=9)                       # out of range: the default level too
    q.enqueue("mid", 1, 0.0, priority=2)
    q.enqueue("high", 1, 0.1, priority=1)
    with pytest.raises(InferError, match="Exceeds maximum queue size"):
        q.enqueue("high-2", 1, 0.1, priority=1)                  # level 1 holds at most 1
    q.enqueue("low-c", 1, 0.1, priority=3)                       # other levels are unbounded
    assert q.poll(0.1).batch == ("high", "mid")                  # 2 = max: higher levels first
    assert q.poll(0.1).batch == ("low-a", "low-b")
    assert q.poll(1.1).batch == ("low-c",)


def test_requests_with_different_batch_keys_never_share_a_batch():
    q = BatchQueue(settings("preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 1000000"))
    q.enqueue("a", 1, 0.0, key=(("x", (3,)),))
    q.enqueue("b", 1, 0.0, key=(("x", (3,)),))
    q.enqueue("c", 1, 0.0, key=(("x", (5,)),))
    q.enqueue("d", 1, 0.0, key=(("x", (3,)),))
    assert q.poll(0.0).batch == ("a", "b")                       # c's shape differs: send what is pending
    assert q.poll(0.0).batch == ("c",)                           # d's differs from c's: the same
    assert q.poll(0.0).batch == () and q.poll(1.0).batch == ("d",)   # d alone waits for the delay


def test_without_dynamic_batching_every_request_runs_alone():
    config = parse_model_config('name: "m" max_batch_size: 8')
    q = BatchQueue(BatcherSettings.from_config(config))
    q.enqueue("a", 3, 0.0, priority=1, timeout_us=1)             # no queue policy applies
    q.enqueue("b", 2, 0.0)
    assert q.poll(5.0).batch == ("a",) and q.poll(5.0).batch == ("b",)
    unbatched = BatchQueue(settings("", max_batch_size=0))
    unbatched.enqueue("x", 1, 0.0)
    unbatched.enqueue("y", 1, 0.0)
    assert unbatched.poll(0.0).batch == ("x",)


def test_cancel_removes_a_queued_request():
    q = BatchQueue(settings("max_queue_delay_microseconds: 1000000 default_queue_policy { max_queue_size: 2 }"))
    fill(q, 2, 0.0)
    assert q.cancel(0) and not q.cancel(0) and 0 not in q
    q.enqueue(5, 1, 0.0)
    assert q.poll(1.0).batch == (1, 5)
    with pytest.raises(ValueError, match="already queued"):
        q.enqueue(7, 1, 2.0) or q.enqueue(7, 1, 2.0)


def test_ordered_release_holds_later_results_until_earlier_ones_finish():
    o = OrderedRelease()
    for rid in "abcd":
        o.admit(rid)
    assert o.complete("c", 3) == []
    assert o.complete("b", 2) == []
    assert o.complete("a", 1) == [("a", 1), ("b", 2), ("c", 3)]
    o.admit("e")
    assert o.discard("d") == []                                   # d cancelled: e no longer waits for it
    assert o.complete("e", 5) == [("e", 5)] and len(o) == 0
