"""Bad input gets a clear error naming the problem, and the engine keeps serving (RELIABILITY.md).

After every negative case a valid request still succeeds and the KV blocks return to their baseline.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from flotilla import LLM, SamplingParams
from flotilla.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from flotilla.models.registry import supported_architectures
from flotilla.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS

MAX_MODEL_LEN = 256  # of the shared tiny_llama_engine
VOCAB = 49152


def assert_engine_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.get_num_unfinished_requests() == 0
    assert not engine.scheduler.requests
    assert not engine.output_processor.child_to_parent
    kv = engine.scheduler.kv_cache_manager
    assert kv.usage == 0 and kv.num_free_blocks == kv.num_blocks and not kv.req_to_blocks


@pytest.fixture
def llm(tiny_llama_engine):
    assert_engine_idle(tiny_llama_engine)
    yield tiny_llama_engine
    # The engine still serves a valid request afterwards, and is back at baseline.
    (out,) = tiny_llama_engine.generate("Hello there", SamplingParams(temperature=0.0, max_tokens=3))
    assert out.finished and len(out.outputs[0].token_ids) == 3
    assert_engine_idle(tiny_llama_engine)


def raises_invalid(llm: LLM, prompt, params: SamplingParams | None = None, param: str | None = None):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(prompt, params or SamplingParams(max_tokens=4))
    if param is not None:
        assert info.value.param == param
    assert_engine_idle(llm)
    return info.value


# ---------------------------------------------------------------------------------------------- context length
def test_prompt_longer_than_context(llm):
    err = raises_invalid(llm, [5] * 300, param="prompt")
    assert "256" in str(err) and "300" in str(err)
    err = raises_invalid(llm, [5] * MAX_MODEL_LEN, SamplingParams(max_tokens=None), param="prompt")
    assert str(MAX_MODEL_LEN) in str(err)


def test_prompt_plus_max_tokens_over_context(llm):
    err = raises_invalid(llm, [5] * 200, SamplingParams(max_tokens=100), param="max_tokens")
    msg = str(err)
    assert "256" in msg and "200" in msg and "100" in msg and "max_tokens" in msg
    # Exactly at the limit is fine; max_tokens=None fills the rest of the context.
    (out,) = llm.generate([5] * 250, SamplingParams(temperature=0.0, max_tokens=6))
    assert len(out.outputs[0].token_ids) == 6
    (out,) = llm.generate([5] * 250, SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"


# ---------------------------------------------------------------------------------------------- prompts
def test_empty_prompts(llm):
    assert "empty" in str(raises_invalid(llm, "", param="prompt"))
    assert "empty" in str(raises_invalid(llm, {"prompt_token_ids": []}, param="prompt"))
    assert "empty" in str(raises_invalid(llm, [[]], param="prompt"))
    assert "empty" in str(raises_invalid(llm, {"prompt": ""}, param="prompt"))
    raises_invalid(llm, {"text": "hi"}, param="prompt")
    with pytest.raises(InvalidRequestError):
        llm.chat([[]], SamplingParams(max_tokens=3))
    assert_engine_idle(llm)


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1000, -1, -(2**40)])
def test_token_ids_outside_vocab(llm, bad):
    err = raises_invalid(llm, [1, 2, bad, 3], param="prompt")
    assert str(bad) in str(err) and str(VOCAB) in str(err)


@pytest.mark.parametrize("bad", [2.5, "7", None, True, [3]])
def test_non_int_token_ids(llm, bad):
    err = raises_invalid(llm, {"prompt_token_ids": [1, 2, bad]}, param="prompt")
    assert "integer" in str(err)


def test_prompt_of_wrong_type(llm):
    raises_invalid(llm, [3.5], param="prompt")
    raises_invalid(llm, [object()], param="prompt")


# ---------------------------------------------------------------------------------------------- sampling params
@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -1.0),
    ("top_k", -2), ("min_p", 1.5),
    ("n", 0), ("n", -1), ("n", 10_000), ("n", 2.0),
    ("max_tokens", -1), ("max_tokens", -5), ("max_tokens", "ten"),
    ("min_tokens", -1),
    ("logprobs", MAX_LOGPROBS + 1), ("logprobs", -1),
    ("stop", [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]), ("stop", [""]), ("stop", [5]),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]),
    ("presence_penalty", 3.0), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0),
    ("seed", 1.5),
])
def test_out_of_range_sampling_params(llm, field, value):
    params = SamplingParams(max_tokens=4)
    setattr(params, field, value)
    if field == "stop":
        params.stop = list(value)
    err = raises_invalid(llm, "Hello", params, param=field)
    assert field in str(err)


def test_min_tokens_above_max_tokens(llm):
    raises_invalid(llm, "Hello", SamplingParams(max_tokens=4, min_tokens=5), param="min_tokens")


def test_stop_token_id_outside_vocab(llm):
    raises_invalid(llm, "Hello", SamplingParams(max_tokens=4, stop_token_ids=[VOCAB]), param="stop_token_ids")


# ---------------------------------------------------------------------------------------------- batches
def test_one_bad_prompt_fails_the_whole_batch(llm):
    good = ["Hello", "The capital of France is"]
    with pytest.raises(InvalidRequestError):
        llm.generate([good[0], [1, VOCAB], good[1]], SamplingParams(max_tokens=4))
    assert_engine_idle(llm)
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(good + [""], SamplingParams(max_tokens=4))
    assert info.value.param == "prompt"
    assert_engine_idle(llm)
    # A bad sampling params object for one of several prompts.
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(good, [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, top_p=0.0)])
    assert info.value.param == "top_p"
    assert_engine_idle(llm)
    # The same batch without the bad prompt runs.
    outs = llm.generate(good, SamplingParams(temperature=0.0, max_tokens=4))
    assert [o.prompt for o in outs] == good


def test_duplicate_request_id_on_the_engine(llm):
    engine = llm.engine
    engine.add_request("dup", "Hello", SamplingParams(temperature=0.0, max_tokens=3))
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("dup", "Hello again", SamplingParams(max_tokens=3))
    assert info.value.param == "request_id"
    while engine.has_unfinished_requests():
        engine.step()


# ---------------------------------------------------------------------------------------------- models
def test_unknown_model_path():
    with pytest.raises(ModelNotFoundError) as info:
        LLM(model="/nonexistent/model-dir")
    assert "/nonexistent/model-dir" in str(info.value)


def test_pickled_checkpoint_is_refused(tmp_path, tiny_llama):
    path, _ = tiny_llama
    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / "pytorch_model.bin").write_bytes(b"this is not a pickle at all \x00\x01\x02" * 10)
    with pytest.raises(ModelLoadError) as info:
        LLM(model=str(only_bin))
    assert "pickle" in str(info.value)
    assert "pytorch_model.bin" in str(info.value)
    # With a config.json next to it, still refused (never opened).
    shutil.copy(os.path.join(path, "config.json"), only_bin / "config.json")
    with pytest.raises(ModelLoadError) as info:
        LLM(model=str(only_bin))
    assert "pickle" in str(info.value)
    with pytest.raises(ModelLoadError) as info:
        LLM(model=str(only_bin / "pytorch_model.bin"))
    assert "pickle" in str(info.value)


def _copy_model(src: str, dst, **config_changes) -> str:
    shutil.copytree(src, dst)
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(config_changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_unsupported_architecture(tmp_path, tiny_llama):
    path, _ = tiny_llama
    gpt2 = _copy_model(path, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelLoadError) as info:
        LLM(model=gpt2, max_model_len=256, num_kv_blocks=32)
    msg = str(info.value)
    assert "GPT2LMHeadModel" in msg
    for arch in supported_architectures():
        assert arch in msg
    unknown = _copy_model(path, tmp_path / "unknown", model_type="not-a-real-family")
    with pytest.raises(ModelLoadError) as info:
        LLM(model=unknown, max_model_len=256, num_kv_blocks=32)
    assert "not-a-real-family" in str(info.value)


def test_kv_budget_too_small(tiny_llama):
    path, _ = tiny_llama
    with pytest.raises(ModelLoadError) as info:
        LLM(model=path, max_model_len=256, num_kv_blocks=4)
    msg = str(info.value)
    assert "256" in msg and "4 blocks" in msg and "max_model_len" in msg
    with pytest.raises(ModelLoadError) as info:
        LLM(model=path, max_model_len=256, kv_cache_memory=1e-7)
    assert "max_model_len" in str(info.value)


def test_max_model_len_over_model_limit(tiny_llama):
    path, _ = tiny_llama
    with pytest.raises(InvalidRequestError) as info:
        LLM(model=path, max_model_len=100_000, num_kv_blocks=32)
    assert info.value.param == "max_model_len" and "512" in str(info.value)
