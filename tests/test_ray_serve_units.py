"""The Ray Serve pieces that need no cluster: the request-router adapter over fake replicas, the replica's
stall bookkeeping, engine-args rewriting, stats summing, metric-clock rebasing, the deployment options
built from a deployment file, and RemoteEngine's retries over a fake handle (failure frames, exclusion of the
replicas a request failed on)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")
# A RequestRouter is constructed by Serve with these two; Ray exports no public name for them.
from ray.serve._private.common import DeploymentHandleSource, DeploymentID  # noqa: E402
from ray.serve.request_router import ReplicaID  # noqa: E402

from flotilla.deploy.config import AutoscalingSpec, DeploymentConfig, ModelSpec  # noqa: E402
from flotilla.deploy.ray_router import FlotillaRequestRouter, request_prefix  # noqa: E402
from flotilla.deploy.ray_serve import (autoscaling_config, cpus_needed, model_deployment,  # noqa: E402
                                       model_deployment_options, replica_engine_args, replica_resources,
                                       stalled_for)
from flotilla.deploy.remote_engine import _Rebase, sum_stats  # noqa: E402
from flotilla.deploy.replica_failures import FailedReplicas  # noqa: E402
from flotilla.deploy.serve_wire import (ENGINE_DEAD, GENERATE_REQUEST, Accepted, GenerateFailure,  # noqa: E402
                                        GenerateRequest, decode_frame, encode_frame, encode_output,
                                        prompt_token_ids_of)
from flotilla.engine.arg_utils import EngineArgs  # noqa: E402
from flotilla.engine.output_processor import OutputKind  # noqa: E402
from flotilla.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from flotilla.sampling_params import SamplingParams  # noqa: E402

DEPLOYMENT = DeploymentID(name="m", app_name="a")
PREFIX = list(range(1, 33))  # two blocks of 16


class FakeReplica:
    """What the router reads of a ``RunningReplica``."""

    def __init__(self, uid: str, queue_len: int, max_ongoing: int = 16, healthy: bool = True):
        self.replica_id = ReplicaID(unique_id=uid, deployment_id=DEPLOYMENT)
        self.queue_len, self.max_ongoing_requests = queue_len, max_ongoing
        self.routing_stats = {"healthy": healthy}
        self.node_id, self.availability_zone, self.multiplexed_model_ids = "node", None, set()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        if isinstance(self.queue_len, BaseException):
            raise self.queue_len
        if self.queue_len is None:  # never answers
            await asyncio.Event().wait()
        return self.queue_len


def pending(prefix, exclude=()) -> SimpleNamespace:
    """A pending ``ModelServer.generate`` call: its one argument is the bytes of a GenerateRequest."""
    request = GENERATE_REQUEST.encode(GenerateRequest("r", None, list(prefix), SamplingParams(),
                                                      exclude_replicas=list(exclude)))
    return SimpleNamespace(args=[request], kwargs={}, routing_context=SimpleNamespace(should_backoff=False))


def make_router(replicas, **state) -> FlotillaRequestRouter:
    router = FlotillaRequestRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
    router.initialize_state(**{"policy": "prefix_aware", "seed": 0, "max_num_seqs": 4, **state})
    router.failed = FailedReplicas()  # not the process's registry
    router.update_replicas(replicas)
    return router


def uids(ranks) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def send(router, replica) -> None:
    """What Serve does once it sends a request to ``replica``."""
    router.on_send_request(replica.replica_id)


def complete(router, replica) -> None:
    """What Serve does when that request finishes."""
    router.decrement_queue_len_cache(replica.replica_id)
    router.on_request_completed(replica.replica_id, "internal-id")


def test_request_prefix_reads_the_generate_request():
    assert request_prefix(pending([1, 2, 3])) == [1, 2, 3]
    assert request_prefix(SimpleNamespace(args=[])) is None
    assert request_prefix(SimpleNamespace(args=["not a request"])) is None
    assert request_prefix(SimpleNamespace(args=[b"\x93not a request"])) is None
    assert request_prefix(SimpleNamespace(args=[{"prompt_token_ids": [1, 2]}])) is None  # only the wire type
    assert request_prefix(None) is None


def test_router_prefers_the_replica_that_has_the_prefix_until_it_is_saturated():
    async def scenario():
        a, b = FakeReplica("a", 0), FakeReplica("b", 0)
        router = make_router([a, b])
        router.on_request_routed(pending(PREFIX), a.replica_id, None)
        req = pending(PREFIX + [99])
        assert uids(await router.choose_replicas([a, b], req)) == [["a"], ["b"]]
        assert req.routing_context.should_backoff  # every rank tried: Serve backs off before the next round
        router.on_new_queue_len_info(a.replica_id, 4)  # a has max_num_seqs in flight: saturated
        assert uids(await router.choose_replicas([a, b], pending(PREFIX)))[0] == ["b"]
        router.on_new_queue_len_info(a.replica_id, 1)
        assert uids(await router.choose_replicas([a, b], pending(PREFIX)))[0] == ["a"]
    asyncio.run(scenario())


def test_router_skips_unhealthy_replicas_and_forgets_departed_ones():
    async def scenario():
        a, b = FakeReplica("a", 0), FakeReplica("b", 5, healthy=False)
        router = make_router([a, b])
        for _ in range(5):
            assert uids(await router.choose_replicas([a, b], pending([7]))) == [["a"]]
        router.on_request_routed(pending(PREFIX), a.replica_id, None)
        assert router.policy.match_blocks("a", PREFIX) == 2
        router.update_replicas([b])  # a left
        assert router.policy.match_blocks("a", PREFIX) == 0
        assert uids(await router.choose_replicas([b], pending(PREFIX))) == [["b"]]  # all unhealthy: still route
        assert await router.choose_replicas([], pending(PREFIX)) == []
    asyncio.run(scenario())


def test_router_probes_replicas_missing_from_the_cache_and_leaves_out_the_silent_ones():
    """With nothing in Serve's cache the router asks each replica (``get_queue_len``): answers fill the
    cache, a replica that does not answer within the deadline is left out while others remain, one whose
    actor died is dropped from the router's replicas; if no replica answers, all are offered."""
    from ray.exceptions import ActorDiedError

    async def scenario():
        ok, silent, dead = FakeReplica("ok", 2), FakeReplica("silent", None), FakeReplica("dead", ActorDiedError())
        router = make_router([ok, silent, dead], policy="power_of_two")
        router.queue_len_response_deadline_s = 0.2
        for r in (ok, silent, dead):
            router.replica_queue_len_cache.invalidate_key(r.replica_id)
        assert uids(await router.choose_replicas([ok, silent, dead], pending([5]))) == [["ok"]]
        assert router.replica_queue_len_cache.get(ok.replica_id) == 2
        assert router.replica_queue_len_cache.get(silent.replica_id) is None
        assert set(router.curr_replicas) == {ok.replica_id, silent.replica_id}  # dead: dropped
        assert uids(await router.choose_replicas([silent], pending([5]))) == [["silent"]]  # none known: all
    asyncio.run(scenario())


def test_router_never_offers_a_request_the_replicas_it_failed_on():
    """A request's ``exclude_replicas`` are never in its ranks, however loaded the others are; with no other
    replica the ranks are empty (Serve backs off and asks again) until a new replica appears."""
    async def scenario():
        a, b = FakeReplica("a", 0), FakeReplica("b", 3)
        router = make_router([a, b], policy="power_of_two")
        for _ in range(10):
            assert uids(await router.choose_replicas([a, b], pending([5], exclude=["a"]))) == [["b"]]
        req = pending([5], exclude=["a", "b"])
        assert await router.choose_replicas([a, b], req) == [] and req.routing_context.should_backoff
        c = FakeReplica("c", 9)
        router.update_replicas([a, b, c])  # the failed replica's replacement
        assert uids(await router.choose_replicas([a, b, c], req)) == [["c"]]
    asyncio.run(scenario())


def test_router_keeps_other_requests_off_replicas_marked_failed():
    """A replica this process saw fail (``FailedReplicas``) is left out while others remain, used again
    when it is the only one, and forgotten when it leaves the deployment or its mark expires."""
    async def scenario():
        a, b = FakeReplica("a", 0), FakeReplica("b", 3)
        router = make_router([a, b], policy="power_of_two")
        now = [0.0]
        router.failed = FailedReplicas(ttl_s=10.0, clock=lambda: now[0])
        router.failed.mark("a")
        for _ in range(5):
            assert uids(await router.choose_replicas([a, b], pending([5]))) == [["b"]]
        assert uids(await router.choose_replicas([a], pending([5]))) == [["a"]]  # nothing else: still route
        now[0] = 11.0
        assert uids(await router.choose_replicas([a, b], pending([5])))[0] == ["a"]  # expired: least loaded
        router.failed.mark("a")
        router.update_replicas([b])  # a left the deployment
        assert router.failed.failed() == set()
    asyncio.run(scenario())


def test_router_power_of_two_prefers_the_less_loaded():
    async def scenario():
        a, b = FakeReplica("a", 3), FakeReplica("b", 0)
        router = make_router([a, b], policy="power_of_two")
        for _ in range(5):
            assert uids(await router.choose_replicas([a, b], pending(PREFIX))) == [["b"], ["a"]]
            send(router, b)
            complete(router, b)
    asyncio.run(scenario())


def test_router_counts_its_own_choices_through_a_burst():
    """Serve's cache says 0 for both replicas until a report arrives; the router still fills the prefix's
    replica only up to max_num_seqs, keeps counting the requests it sent when a lagging report says fewer,
    and forgets choices Serve never sent."""
    async def scenario():
        a, b = FakeReplica("a", 0), FakeReplica("b", 0)
        router = make_router([a, b])
        now = [100.0]
        router.clock = lambda: now[0]
        router.on_request_routed(pending(PREFIX), a.replica_id, None)
        router.on_new_queue_len_info(a.replica_id, 0)
        router.on_new_queue_len_info(b.replica_id, 0)
        firsts = [uids(await router.choose_replicas([a, b], pending(PREFIX)))[0][0] for _ in range(6)]
        assert firsts == ["a"] * 4 + ["b"] * 2  # four unsent choices saturate a
        for r in (a, a, a, a, b, b):
            send(router, r)
        router.on_new_queue_len_info(a.replica_id, 1)  # a report from before the other three arrived
        assert uids(await router.choose_replicas([a, b], pending(PREFIX)))[0] == ["b"]
        send(router, b)
        for _ in range(3):
            complete(router, a)
        router.on_new_queue_len_info(a.replica_id, 1)
        assert uids(await router.choose_replicas([a, b], pending(PREFIX)))[0] == ["a"]  # one left on a
        for _ in range(3):  # chosen but never sent (cancelled, or sent to another rank)
            await router.choose_replicas([a, b], pending(PREFIX))
        assert uids(await router.choose_replicas([a, b], pending(PREFIX)))[0] == ["b"]
        now[0] += 3.0  # the unsent choices expire
        assert uids(await router.choose_replicas([a, b], pending(PREFIX)))[0] == ["a"]
    asyncio.run(scenario())


def test_stalled_for_counts_only_busy_time_without_progress():
    assert stalled_for(10.0, busy=False, progressed=False, last_progress=1.0) == (0.0, 10.0)
    assert stalled_for(10.0, busy=True, progressed=True, last_progress=1.0) == (0.0, 10.0)
    assert stalled_for(10.0, busy=True, progressed=False, last_progress=None) == (0.0, 10.0)
    assert stalled_for(25.0, busy=True, progressed=False, last_progress=10.0) == (15.0, 10.0)


def test_replica_engine_args_use_the_ray_executor_on_this_cluster():
    one = replica_engine_args(EngineArgs(model="m"), "127.0.0.1:6379")
    assert one.distributed_executor_backend is None and one.ray_address is None
    tp = replica_engine_args(EngineArgs(model="m", tensor_parallel_size=2), "127.0.0.1:6379")
    assert tp.distributed_executor_backend == "ray" and tp.ray_address == "127.0.0.1:6379"
    joined = replica_engine_args(EngineArgs(model="m", pipeline_parallel_size=2, ray_address="10.0.0.1:6379"),
                                 "127.0.0.1:6379")
    assert joined.ray_address == "10.0.0.1:6379"
    mp = replica_engine_args(EngineArgs(model="m", tensor_parallel_size=2, distributed_executor_backend="mp"), "x")
    assert mp.distributed_executor_backend == "mp" and mp.ray_address is None


def test_sum_stats_and_metric_rebasing():
    s = sum_stats([{"num_running": 1, "num_waiting": 2, "kv_cache_usage": 0.5, "prefix_cache_hits": 3},
                   {"num_running": 2, "kv_cache_usage": 0.1, "prefix_cache_queries": 7}])
    assert (s.num_running, s.num_waiting, s.prefix_cache_hits, s.prefix_cache_queries) == (3, 2, 3, 7)
    assert s.kv_cache_usage == pytest.approx(0.3)
    assert sum_stats([]).num_running == 0
    spec = sum_stats([{"spec_num_drafts": 2, "spec_num_draft_tokens": 8, "spec_num_accepted_tokens": 5,
                       "spec_accepted_per_pos": [2, 2, 1, 0]},
                      {"spec_num_drafts": 1, "spec_num_draft_tokens": 2, "spec_num_accepted_tokens": 1,
                       "spec_accepted_per_pos": [1, 0]}, {"num_running": 1}])  # another k; no speculation
    assert (spec.spec_num_drafts, spec.spec_num_draft_tokens, spec.spec_num_accepted_tokens) == (3, 10, 6)
    assert spec.spec_accepted_per_pos == (3, 2, 1, 0)
    out = RequestOutput("r", None, [1], [], False, metrics={"arrival_time": 1000.0, "first_scheduled_time": 1000.5,
                                                            "first_token_time": 1001.0})
    _Rebase(5.0).apply(out)
    assert out.metrics["arrival_time"] == 5.0 and out.metrics["first_scheduled_time"] == 5.5
    assert out.metrics["first_token_time"] > 5.5  # when it arrived here


def test_deployment_options_from_the_deployment_file():
    fixed = ModelSpec(name="chat", model="m", replicas=3, engine={"max_num_seqs": 8, "block_size": 32},
                      ray={"health_check_period_s": 2.0, "num_cpus": 2})
    options = model_deployment_options(fixed, "prefix_aware", seed=5)
    assert options["health_check_period_s"] == 2.0 and options["max_ongoing_requests"] == 16
    router = options["request_router_config"]
    assert router.request_router_class == "flotilla.deploy.ray_router.FlotillaRequestRouter"
    assert router.request_router_kwargs == {"policy": "prefix_aware", "seed": 5, "max_num_seqs": 8,
                                            "policy_kwargs": {"block_size": 32}}
    dep = model_deployment(fixed, "prefix_aware", seed=5)  # Serve accepts the options
    assert dep.name == "chat" and dep.num_replicas == 3 and dep.ray_actor_options["num_cpus"] == 2
    assert dep.max_ongoing_requests == 16
    auto = ModelSpec(name="auto", model="m", tensor_parallel_size=2,
                     autoscaling=AutoscalingSpec(1, 4, 3.0, upscale_delay_s=1.0),
                     ray={"autoscaling_config": {"look_back_period_s": 2.0}})
    assert autoscaling_config(auto) == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3.0,
                                        "upscale_delay_s": 1.0, "look_back_period_s": 2.0}
    assert model_deployment_options(auto)["autoscaling_config"]["max_replicas"] == 4
    assert model_deployment(auto).name == "auto"  # Serve accepts an autoscaling config
    assert replica_resources(auto.engine_args(), auto) == {"num_cpus": 0, "num_gpus": 0}  # ranks hold the CPUs
    # A local instance must fit: 3 replicas x 2 CPUs, plus up to 4 replicas x 2 rank bundles.
    assert cpus_needed(DeploymentConfig(models=(fixed, auto))) == 6 + 8


# ---- RemoteEngine over a fake deployment handle -------------------------------------------------------------
HANG = object()  # a FakeStream item that never arrives


class FakeStream:
    """A DeploymentResponseGenerator stand-in: yields (or raises) its script's items (``HANG``: waits
    forever); ``cancel()`` ends it."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if self.cancelled:
            from ray.serve.exceptions import RequestCancelledError
            raise RequestCancelledError("r")
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        while item is HANG and not self.cancelled:
            await asyncio.sleep(0.01)
        if item is HANG:
            from ray.serve.exceptions import RequestCancelledError
            raise RequestCancelledError("r")
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """``handle.options(stream=True).generate.remote(request)`` returns the next scripted stream."""

    def __init__(self, *scripts):
        self.scripts, self.streams, self.requests = list(scripts), [], []
        self.generate = SimpleNamespace(remote=self._remote)

    def options(self, **_):
        return self

    def _remote(self, request):
        self.requests.append(request)
        self.streams.append(FakeStream(self.scripts.pop(0)))
        return self.streams[-1]


def output(finished: bool) -> bytes:
    """What a replica yields: the bytes of a GenerateOutput."""
    return encode_output(RequestOutput("r", None, [1], [CompletionOutput(0, "a", [7])], finished,
                                       metrics={"arrival_time": 1.0, "first_token_time": None}))


def accepted(replica: str) -> bytes:
    return encode_frame(Accepted(replica))


def failure(replica: str, started: bool = False) -> bytes:
    return encode_frame(GenerateFailure(ENGINE_DEAD, f"model 'tiny': the engine of replica {replica} stopped",
                                        replica, started))


def remote_engine(path: str, *scripts, **kw):
    from flotilla.deploy.remote_engine import RemoteEngine
    handle = FakeHandle(*scripts)
    return RemoteEngine("tiny", handle, EngineArgs(model=path, max_model_len=64), failed_replicas=FailedReplicas(),
                        **kw), handle


async def collect(engine, request_id="r", prompt=(1, 2, 3), output_kind=OutputKind.CUMULATIVE):
    return [o async for o in engine.generate({"prompt_token_ids": list(prompt)}, SamplingParams(max_tokens=4),
                                             request_id, output_kind)]


def ray_actor_died():
    """An ActorDiedError as Ray words it (with its advice about the OOM killer and ``ray stop``)."""
    from ray.exceptions import ActorDiedError
    e = ActorDiedError()
    e.error_msg = ("The actor died unexpectedly before finishing this task.\n\tclass_name: ServeReplica:a:m\n"
                   "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR\n"
                   "It may have been killed by the OOM killer; see `ray logs raylet.out`, or run `ray stop`")
    return e


def test_remote_engine_retries_a_failure_before_the_first_output(tiny_llama):
    from ray.exceptions import ActorDiedError

    from flotilla.engine.protocol import EngineClient
    engine, handle = remote_engine(tiny_llama[0], [ActorDiedError()], [output(False), output(True)])
    assert isinstance(engine, EngineClient)
    outs = asyncio.run(collect(engine))
    assert [o.finished for o in outs] == [False, True] and engine.num_retries == 1
    assert len(handle.requests) == 2 and prompt_token_ids_of(handle.requests[0]) == [1, 2, 3]
    assert engine.num_queued_requests == 0 and engine.num_unfinished_requests == 0


def test_remote_engine_retries_elsewhere_excluding_every_replica_it_failed_on(tiny_llama):
    """An engine-dead failure frame on a, an actor death on b, success on c: each retry carries the replicas
    already failed in ``exclude_replicas``, the attempt log names each replica, and a and b are marked failed
    for the router."""
    engine, handle = remote_engine(tiny_llama[0], [accepted("a"), failure("a")],
                                   [accepted("b"), ray_actor_died()], [accepted("c"), output(False), output(True)])
    outs = asyncio.run(collect(engine))
    assert [o.finished for o in outs] == [False, True] and engine.num_retries == 2
    sent = [GENERATE_REQUEST.decode(r).exclude_replicas for r in handle.requests]
    assert sent == [[], ["a"], ["a", "b"]]
    assert list(engine.attempts) == [("r", "a", "failed"), ("r", "b", "failed"), ("r", "c", "ok")]
    assert engine.failed_replicas.failed() == {"a", "b"}
    assert engine.num_queued_requests == 0 and engine.num_unfinished_requests == 0


def test_remote_engine_failures_after_output_or_on_every_attempt_reach_the_caller(tiny_llama):
    """Plain messages, no Ray internals: a failure after output started is not retried; a request that
    failed on ``MAX_ATTEMPTS`` replicas fails; a retry that finds no other replica in time fails."""
    from flotilla.deploy.remote_engine import MAX_ATTEMPTS
    from flotilla.errors import EngineDeadError, InvalidRequestError
    engine, handle = remote_engine(tiny_llama[0], [accepted("a"), output(False), ray_actor_died()])
    with pytest.raises(EngineDeadError, match="after it had started streaming") as info:
        asyncio.run(collect(engine))
    assert len(handle.requests) == 1 and list(engine.attempts) == [("r", "a", "failed")]
    engine, handle = remote_engine(tiny_llama[0], [accepted("a"), output(False), failure("a", started=True)])
    with pytest.raises(EngineDeadError, match="its engine died"):
        asyncio.run(collect(engine))
    engine, handle = remote_engine(tiny_llama[0], *[[accepted(x), ray_actor_died()] for x in "abc"])
    with pytest.raises(EngineDeadError, match=f"failed on {MAX_ATTEMPTS} replicas") as info:
        asyncio.run(collect(engine))
    for text in ("ray", "oom", "actor", "worker"):
        assert text not in str(info.value).lower(), info.value
    assert len(handle.requests) == MAX_ATTEMPTS
    engine, _ = remote_engine(tiny_llama[0], [accepted("a"), failure("a")], [HANG], retry_routing_timeout_s=0.2)
    with pytest.raises(EngineDeadError, match="no other replica took request r"):
        asyncio.run(collect(engine))
    assert engine.num_unfinished_requests == 0
    engine, handle = remote_engine(tiny_llama[0])
    with pytest.raises(InvalidRequestError):  # validated here: nothing is sent
        asyncio.run(collect(engine, prompt=range(1, 70)))
    assert handle.requests == []


def test_remote_engine_final_only_leaves_the_queue_when_a_replica_accepts(tiny_llama):
    """A final-only request counts as queued until a replica accepts it; a replica dying before the end
    costs a retry and no output; the final output keeps the replica's first-token time (rebased)."""
    engine, handle = remote_engine(tiny_llama[0], [accepted("a"), HANG])

    async def queued_until_accepted():
        task = asyncio.ensure_future(collect(engine, "f", output_kind=OutputKind.FINAL_ONLY))
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert engine.num_queued_requests == 0 and engine.num_unfinished_requests == 1  # a accepted it
        engine.abort("f")
        assert await task == [] and engine.num_unfinished_requests == 0
    asyncio.run(queued_until_accepted())
    engine, handle = remote_engine(tiny_llama[0], [ray_actor_died()], [accepted("b"), output(True)])
    (out,) = asyncio.run(collect(engine, "f", output_kind=OutputKind.FINAL_ONLY))
    assert out.finished and engine.num_retries == 1
    assert GENERATE_REQUEST.decode(handle.requests[1]).output_kind is OutputKind.FINAL_ONLY


def test_failure_frames_round_trip_and_bad_frames_are_refused():
    from flotilla.wire import WireError
    request = GenerateRequest("r", "hi", [1, 2], SamplingParams(), exclude_replicas=["x"])
    assert GENERATE_REQUEST.decode(GENERATE_REQUEST.encode(request)).exclude_replicas == ["x"]
    assert decode_frame(accepted("a"), request) == Accepted("a")
    frame = decode_frame(failure("a", started=True), request)
    assert frame == GenerateFailure(ENGINE_DEAD, "model 'tiny': the engine of replica a stopped", "a", True)
    out = decode_frame(output(True), request)
    assert isinstance(out, RequestOutput) and out.request_id == "r" and out.prompt == "hi" and out.finished
    for bad in (GENERATE_REQUEST.encode(request), b"\x92\xa7unknown\xa1a", b"", b"\xc1"):
        with pytest.raises(WireError, match="malformed Ray Serve generate frame"):
            decode_frame(bad, request)


def test_remote_engine_abort_cancels_the_stream(tiny_llama):
    engine, handle = remote_engine(tiny_llama[0], [output(False)] * 50)

    async def scenario():
        outs = []
        async for out in engine.generate({"prompt_token_ids": [1, 2]}, None, "r1"):
            outs.append(out)
            if len(outs) == 2:
                engine.abort(["r1", "unknown"])
        return outs
    assert len(asyncio.run(scenario())) == 2  # ends without an error
    assert handle.streams[0].cancelled and engine.num_unfinished_requests == 0


def test_serve_calls_carry_wire_bytes_not_pickled_objects(tiny_llama):
    """RemoteEngine sends ``generate`` the bytes of a GenerateRequest (plain msgpack: no pickle, no flotilla
    object) and turns the GenerateOutput bytes it gets back into RequestOutputs with the request's prompt."""
    import msgspec
    params = SamplingParams(max_tokens=4, logprobs=1, stop=["x"])
    replica_out = RequestOutput("r", None, [1, 2, 3], [CompletionOutput(
        0, " hi", [5, 6], -0.75, [{5: Logprob(-0.5, 1, " h")}, {6: Logprob(-0.25, 1, "i"), 9: Logprob(-3.0, 2, "!")}],
        "stop", "x")], True, num_cached_tokens=16, metrics={"arrival_time": 1.0, "first_token_time": 2.0})
    engine, handle = remote_engine(tiny_llama[0], [encode_output(replica_out)])

    async def run():
        return [o async for o in engine.generate({"prompt": "abc", "prompt_token_ids": [1, 2, 3],
                                                  "cache_salt": "tenant-a"}, params, "r",
                                                 OutputKind.DELTA)]
    (out,) = asyncio.run(run())
    (sent,) = handle.requests
    assert type(sent) is bytes and not sent.startswith(b"\x80")  # not a pickle stream
    plain = msgspec.msgpack.decode(sent)  # readable without flotilla's types
    assert plain[:3] == ["r", "abc", [1, 2, 3]] and plain[3]["stop"] == ["x"] and plain[4] == OutputKind.DELTA.value
    request = GENERATE_REQUEST.decode(sent)
    assert request.sampling_params.max_tokens == 4 and request.output_kind is OutputKind.DELTA
    assert request.cache_salt == "tenant-a"
    assert (out.request_id, out.prompt, out.prompt_token_ids) == ("r", "abc", [1, 2, 3])
    assert out.outputs == replica_out.outputs and out.finished and out.num_cached_tokens == 16
