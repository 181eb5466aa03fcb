"""The engine a batch job resolves (a model or a deployment file's entry) and the per-process engine cache
that Spark workers and Ray Data actors share; the row helpers of both."""

from __future__ import annotations

import pytest

from flotilla.batch.engine_cache import EngineCache, engine_key, resolve_engine
from flotilla.batch.rows import generate_rows, plain, sampling_params_from
from flotilla.deploy.config import DeploymentConfigError
from flotilla.sampling_params import SamplingParams

TWO_MODELS = """\
models:
  - name: a
    model: {path}
    engine: {{max_model_len: 256, num_kv_blocks: 64, max_num_seqs: 4}}
    ray: {{num_cpus: 2}}
  - name: b
    model: {path}
    parallel: {{tensor: 2}}
"""


def test_resolve_engine_from_a_model_or_a_deployment_file(tmp_path, tiny_llama):
    path, _ = tiny_llama
    assert resolve_engine(path).args.model == path and resolve_engine(path).ray == {}
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(TWO_MODELS.format(path=path))
    a = resolve_engine(config=str(deploy), model_name="a", engine_kwargs={"max_num_seqs": 8})
    assert (a.args.model, a.args.max_model_len, a.args.num_kv_blocks, a.args.max_num_seqs) == (path, 256, 64, 8)
    assert a.ray == {"num_cpus": 2}
    assert resolve_engine(config=str(deploy), model_name="b").args.tensor_parallel_size == 2
    # The file's entry and the same settings given directly share an engine (the served name is a label).
    direct = resolve_engine(path, engine_kwargs={"max_model_len": 256, "num_kv_blocks": 64, "max_num_seqs": 8})
    assert engine_key(direct.args) == engine_key(a.args)

    with pytest.raises(ValueError, match="has 2 models"):
        resolve_engine(config=str(deploy))
    with pytest.raises(ValueError, match="no model named 'c'"):
        resolve_engine(config=str(deploy), model_name="c")
    with pytest.raises(ValueError, match="not both"):
        resolve_engine(path, config=str(deploy))
    with pytest.raises(ValueError, match="unknown engine setting.*max_num_seq\\b"):
        resolve_engine(path, engine_kwargs={"max_num_seq": 4})
    deploy.write_text("models:\n  - name: a\n    model: x\n    engine: {max_num_seqs: 0}\n")
    with pytest.raises(DeploymentConfigError, match=r"models\[0\]\.engine\.max_num_seqs"):
        resolve_engine(config=str(deploy))


def test_the_cache_builds_one_engine_per_settings_and_replaces_it(tiny_llama):
    path, _ = tiny_llama
    cache, loads = EngineCache(), []
    small = resolve_engine(path, engine_kwargs={"max_model_len": 128, "num_kv_blocks": 32}).args
    first = cache.get(small, lambda: loads.append(1))
    assert cache.get(small, lambda: loads.append(1)) is first and cache.loads == 1 == len(loads)
    other = resolve_engine(path, engine_kwargs={"max_model_len": 128, "num_kv_blocks": 48}).args
    second = cache.get(other)
    assert second is not first and cache.loads == 2
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    rows = generate_rows(second, ["hello there", [{"role": "user", "content": "hi"}]], greedy)
    expected = second.generate(["hello there"], greedy) + second.chat([{"role": "user", "content": "hi"}], greedy)
    assert [(r.token_ids, r.prompt_tokens, r.finish_reason) for r in rows] == [
        (list(o.outputs[0].token_ids), len(o.prompt_token_ids), o.outputs[0].finish_reason) for o in expected]
    with pytest.raises(ValueError, match="row 1 of the batch has no prompt"):
        generate_rows(second, ["a", None], greedy)
    cache.clear()


def test_sampling_params_from_rows():
    import numpy as np
    default = SamplingParams(temperature=0.0, max_tokens=3)
    assert sampling_params_from(None, default) is default
    p = sampling_params_from({"temperature": np.float64(0.5), "max_tokens": np.int64(7), "stop": None,
                              "stop_token_ids": np.array([5, 6])})
    assert (p.temperature, p.max_tokens, p.stop, p.stop_token_ids) == (0.5, 7, [], [5, 6])
    assert type(p.max_tokens) is int
    with pytest.raises(ValueError, match="unknown sampling parameter.*max_token\\b"):
        sampling_params_from({"max_token": 3})
    with pytest.raises(ValueError, match="top_p"):
        sampling_params_from({"top_p": 2.0})
    with pytest.raises(ValueError, match="n must be 1"):
        sampling_params_from(SamplingParams(n=2))
    assert plain(np.array([{"role": "user", "content": np.str_("x")}], dtype=object)) == [
        {"role": "user", "content": "x"}]
