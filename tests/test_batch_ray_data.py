"""Ray Data (``flotilla.batch.ray_data``) on a local Ray instance (loopback only, dashboard off).

50 rows through 2 engine actors equal ``LLM.generate`` greedy in this process (the oracle); a replica of 2
tensor-parallel ranks runs them on flotilla's Ray executor (a placement group) with the same tokens; and Ray's
own ``ray.data.llm.HttpRequestProcessorConfig`` works against a real ``flotilla serve``.
"""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from flotilla.batch.ray_data import FlotillaEngineProcessorConfig, build_processor  # noqa: E402
from flotilla.sampling_params import SamplingParams  # noqa: E402
from test_server_helpers import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

ENGINE = dict(max_model_len=256, num_kv_blocks=256)  # as the tiny_llama_engine oracle
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
WORDS = "the quick brown fox jumps over a lazy dog while engineers deploy models".split()


def _prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 9)) + f" {i}" for i in range(n)]


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray instance with 4 logical CPUs on loopback (dashboard off)."""
    from flotilla.distributed.ray_compat import loopback_only_ray
    if ray.is_initialized():  # a connection left by another module would hide this instance
        ray.shutdown()
    with loopback_only_ray():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _by_id(rows: list[dict]) -> list[tuple]:
    return [(r["generated_text"], list(r["generated_tokens"]), r["finish_reason"], r["num_input_tokens"],
             r["num_generated_tokens"]) for r in sorted(rows, key=lambda r: r["id"])]


def _expected(outs) -> list[tuple]:
    return [(o.outputs[0].text, list(o.outputs[0].token_ids), o.outputs[0].finish_reason,
             len(o.prompt_token_ids), len(o.outputs[0].token_ids)) for o in outs]


def test_two_engine_actors_equal_llm_generate(local_ray, tiny_llama, tiny_llama_engine):
    path, _ = tiny_llama
    prompts = _prompts(50)

    def preprocess(row: dict) -> dict:  # local: Ray pickles it by value (this test module is not importable there)
        """The prompt; odd rows carry their own (equal, greedy) sampling params, even rows none (null: the
        config's)."""
        own = {"temperature": 0.0, "max_tokens": 8} if row["id"] % 2 else None
        return dict(prompt=row["text"], sampling_params=own)

    config = FlotillaEngineProcessorConfig(model_source=path, engine_kwargs=ENGINE, sampling_params=GREEDY,
                                           batch_size=8, concurrency=2)
    stage = config.map_batches_kwargs()
    assert (stage["compute"].min_size, stage["compute"].max_size, stage["num_cpus"]) == (2, 2, 1.0)
    processor = build_processor(config, preprocess=preprocess,
                                postprocess=lambda row: {k: v for k, v in row.items() if k != "sampling_params"})
    ds = ray.data.from_items([{"id": i, "text": p} for i, p in enumerate(prompts)], override_num_blocks=8)
    rows = processor(ds).take_all()
    assert _by_id(rows) == _expected(tiny_llama_engine.generate(prompts, GREEDY))
    assert all(r["text"] == r["prompt"] and "sampling_params" not in r for r in rows)


def test_chat_messages_through_a_tensor_parallel_replica(local_ray, tiny_llama, tiny_llama_engine):
    path, _ = tiny_llama
    conversations = [[{"role": "user", "content": p}] for p in _prompts(6)]
    config = FlotillaEngineProcessorConfig(model_source=path, engine_kwargs=dict(ENGINE, tensor_parallel_size=2),
                                           sampling_params=GREEDY, batch_size=6)
    args, num_cpus = config.resolve()
    assert (args.distributed_executor_backend, num_cpus) == ("ray", 0.0)  # ranks hold the CPUs, in a group
    ds = ray.data.from_items([{"id": i, "messages": c} for i, c in enumerate(conversations)])
    rows = build_processor(config)(ds).take_all()
    assert _by_id(rows) == _expected(tiny_llama_engine.chat(conversations, GREEDY))
    # The replica's exit shuts its engine down: the ranks' placement group is removed.
    assert _wait_until(lambda: not _live_flotilla_groups()), _live_flotilla_groups()


def _live_flotilla_groups() -> list[str]:
    """Placement groups of flotilla's Ray executor (named ``flotilla-<id>``) not removed yet."""
    return [g["name"] for g in ray.util.placement_group_table().values()
            if g["name"].startswith("flotilla-") and g["state"] != "REMOVED"]


def _wait_until(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_http_request_processor_against_flotilla_serve(local_ray, tiny_llama, tiny_llama_engine):
    from ray.data.llm import HttpRequestProcessorConfig
    from ray.data.llm import build_processor as ray_build_processor
    path, _ = tiny_llama
    prompts = _prompts(12)
    server = ServerProcess(path, "--served-model-name", "tiny", "--max-model-len", "256", "--num-kv-blocks", "256")
    try:
        config = HttpRequestProcessorConfig(url=server.base_url + "/completions", batch_size=4, concurrency=1)
        processor = ray_build_processor(
            config,
            preprocess=lambda row: dict(payload=dict(model="tiny", prompt=row["text"], temperature=0.0,
                                                     max_tokens=8)),
            postprocess=lambda row: dict(id=row["id"], text=row["http_response"]["choices"][0]["text"],
                                         finish_reason=row["http_response"]["choices"][0]["finish_reason"]))
        ds = ray.data.from_items([{"id": i, "text": p} for i, p in enumerate(prompts)])
        rows = sorted(processor(ds).take_all(), key=lambda r: r["id"])
    finally:
        assert server.stop() == 0, server.output()
    expected = tiny_llama_engine.generate(prompts, GREEDY)
    assert [(r["text"], r["finish_reason"]) for r in rows] == [(o.outputs[0].text, o.outputs[0].finish_reason)
                                                               for o in expected]


def test_bad_configs_fail_before_any_job(tiny_llama):
    path, _ = tiny_llama
    with pytest.raises(ValueError, match="concurrency must be a positive integer"):
        FlotillaEngineProcessorConfig(model_source=path, concurrency=0)
    with pytest.raises(ValueError, match="top_p"):
        FlotillaEngineProcessorConfig(model_source=path, sampling_params={"top_p": 2.0})
    with pytest.raises(ValueError, match="unknown engine setting"):
        build_processor(FlotillaEngineProcessorConfig(model_source=path, engine_kwargs={"max_num_seq": 4}))
    with pytest.raises(ValueError, match="runs them on the Ray executor"):
        FlotillaEngineProcessorConfig(model_source=path, engine_kwargs={"tensor_parallel_size": 2,
                                                                        "distributed_executor_backend": "mp"}).resolve()
    with pytest.raises(TypeError, match="ray.data.llm.build_processor"):
        build_processor({"model_source": path})
