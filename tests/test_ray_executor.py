"""The Ray executor on a local two-node Ray cluster (``ray.cluster_utils.Cluster``, one CPU per node).

Each rank is a Ray actor in a placement group of one-CPU bundles, so with two one-CPU nodes a world of
two ranks necessarily spans both nodes. Parallel runs must give exactly the greedy tokens of the
single-process run; a killed rank actor must fail generation with ``EngineDeadError`` in bounded time
and leave no actor, process or placement group behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
from ray_cluster_helpers import LOOPBACK, loopback_cluster  # noqa: E402

from flotilla import LLM  # noqa: E402
from flotilla.errors import EngineDeadError  # noqa: E402
from flotilla.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = [[1, 520, 3100, 42], [1, 77, 9, 1234, 5678, 91, 4, 300, 2001], [1, 17]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
MODEL_ARGS = dict(max_model_len=128, num_kv_blocks=64)
FAIL_BOUND_S = 60.0  # a killed rank must surface well within this (no speed claim: 2 shared cores)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of two nodes with one CPU each, dashboard off, on loopback only."""
    with loopback_cluster(num_cpus=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def reference_tokens(tiny_llama):
    """Greedy tokens of the single-process (uni executor) run."""
    path, _ = tiny_llama
    llm = LLM(model=path, **MODEL_ARGS)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _ray_llm(path: str, cluster, **kwargs) -> LLM:
    return LLM(model=path, distributed_executor_backend="ray", ray_address=cluster.address, **MODEL_ARGS,
               **kwargs)


def _flotilla_actors() -> list[str]:
    """Names of live named actors this executor creates (they are named ``flotilla-<id>-rank<r>``)."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("flotilla-")]


def _flotilla_groups() -> dict[str, str]:
    """State of every flotilla placement group, by name."""
    return {pg["name"]: pg["state"] for pg in ray.util.placement_group_table().values()
            if pg["name"].startswith("flotilla-")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_until(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _assert_nothing_left(executor) -> None:
    assert _wait_until(lambda: not _flotilla_actors()), f"actors left: {_flotilla_actors()}"
    assert all(state == "REMOVED" for state in _flotilla_groups().values()), _flotilla_groups()
    pids = list(executor.rank_pids)
    assert _wait_until(lambda: not any(_pid_alive(p) for p in pids)), "a rank actor process survived"


def test_tp2_across_two_nodes_matches_single_process(ray_cluster, tiny_llama, reference_tokens):
    path, _ = tiny_llama
    llm = _ray_llm(path, ray_cluster, tensor_parallel_size=2)
    executor = llm.engine.executor
    try:
        assert type(executor).__name__ == "RayExecutor"
        assert len(executor.rank_nodes) == 2
        assert executor.rank_nodes[0] != executor.rank_nodes[1], "the two ranks share a node"
        assert executor.rank_ips == [LOOPBACK, LOOPBACK]
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert got == reference_tokens
    finally:
        llm.engine.shutdown()
    llm.engine.shutdown()  # repeated shutdown is a no-op
    _assert_nothing_left(executor)


def test_pp2_matches_single_process(ray_cluster, tiny_llama, reference_tokens):
    path, _ = tiny_llama
    llm = _ray_llm(path, ray_cluster, pipeline_parallel_size=2)
    executor = llm.engine.executor
    try:
        assert executor.max_concurrent_batches == 2
        assert executor.rank_nodes[0] != executor.rank_nodes[1]
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert got == reference_tokens
    finally:
        llm.engine.shutdown()
    _assert_nothing_left(executor)


def test_killed_rank_fails_generation_and_leaves_nothing(ray_cluster, tiny_llama):
    path, _ = tiny_llama
    llm = _ray_llm(path, ray_cluster, tensor_parallel_size=2)
    engine = llm.engine
    executor = engine.executor
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", {"prompt_token_ids": prompt},
                               SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
        for _ in range(3):  # prefill and a couple of decode steps: requests are in flight
            engine.step()
        assert engine.has_unfinished_requests()
        ray.kill(executor.actors[1], no_restart=True)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < FAIL_BOUND_S
        # The surviving rank was blocked in a collective: the executor killed it too.
        assert executor.actors == []
        with pytest.raises(EngineDeadError):
            engine.step()
    finally:
        engine.shutdown()
    _assert_nothing_left(executor)


def test_unplaceable_world_fails_clearly_and_leaves_nothing(ray_cluster, tiny_llama):
    """Four one-CPU ranks do not fit two one-CPU nodes: a clear error after the placement timeout, and
    the pending placement group is removed."""
    from flotilla.engine.arg_utils import EngineArgs
    from flotilla.executor.ray_executor import RayExecutor
    path, _ = tiny_llama
    config = EngineArgs(model=path, tensor_parallel_size=4, distributed_executor_backend="ray",
                        ray_address=ray_cluster.address, **MODEL_ARGS).create_engine_config()
    before = set(_flotilla_groups())
    with pytest.raises(EngineDeadError, match="could not place 4 bundles"):
        RayExecutor(config, placement_timeout_s=5.0)
    new = {name: state for name, state in _flotilla_groups().items() if name not in before}
    assert new and all(state == "REMOVED" for state in new.values()), new
    assert not _flotilla_actors()


LOCAL_SCRIPT = """
import json, sys
import ray
from flotilla import LLM
from flotilla.sampling_params import SamplingParams
path, prompts, expected = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
llm = LLM(model=path, max_model_len=128, num_kv_blocks=64, tensor_parallel_size=2,
          distributed_executor_backend="ray")
ex = llm.engine.executor
assert ray.util.get_node_ip_address() == "127.0.0.1", ray.util.get_node_ip_address()
assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:"), ray.get_runtime_context().gcs_address
assert ex.rank_ips == ["127.0.0.1", "127.0.0.1"], ex.rank_ips
params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
assert got == expected, (got, expected)
import psutil
listeners = set()
for p in psutil.Process().children(recursive=True):  # Ray's daemons, workers and the rank actors
    try:
        listeners |= {(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
assert {"gcs_server", "raylet"} <= {name for name, _ in listeners}, listeners
exposed = sorted(x for x in listeners if x[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1"))
assert not exposed, exposed
llm.engine.shutdown()
llm.engine.shutdown()
assert not ray.is_initialized(), "the executor must stop the local Ray instance it started"
print("LOCAL-RAY-OK")
"""


def test_local_ray_instance_on_loopback(tiny_llama, reference_tokens):
    """Without ``ray_address`` the executor starts its own Ray instance on 127.0.0.1 (dashboard off) whose
    processes, rank actors included, listen on loopback only, gives the same tokens, and stops that instance
    on shutdown. Runs in a fresh process: this one is already connected to the module's cluster."""
    path, _ = tiny_llama
    proc = subprocess.run([sys.executable, "-c", LOCAL_SCRIPT, path, json.dumps(PROMPTS),
                           json.dumps(reference_tokens)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "LOCAL-RAY-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
