"""The embedded SmolLM2-135M-Instruct (GGUF) against transformers loading the same file.

Greedy tokens must be identical; per DESIGN.md, where a near-tie makes the two diverge, both tokens must
be in the other side's top-5 and comparison stops there. The equality tests run the GGUF dequantized
(``quantization="none"``: the float weights transformers has); the default, the file's blocks kept quantized,
has its own oracle in tests/test_quant_gguf.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from flotilla import LLM, SamplingParams

from conftest import smollm2_gguf_path, smollm2_hf_float32

MAX_NEW = 24
PLAIN = ["The capital of France is", "Once upon a time, there was a little", "def add(a, b):\n    return",
         "The three primary colors are"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]]


@pytest.fixture(scope="module")
def llm():
    # no model given: the embedded default; float32 and dequantized weights like the oracle
    return LLM(dtype="float32", quantization="none")


@pytest.fixture(scope="module")
def hf_model():
    return smollm2_hf_float32()


def hf_greedy(hf_model, prompt_ids: list[int]):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                                output_logits=True, return_dict_in_generate=True, pad_token_id=2)
    return out.sequences[0, ids.shape[1]:].tolist(), [s[0].float() for s in out.logits]


def assert_same_greedy(ours, hf_tokens, hf_logits) -> None:
    got = ours.outputs[0]
    for i, (a, b) in enumerate(zip(got.token_ids, hf_tokens)):
        if a == b:
            continue
        hf_top5 = torch.topk(hf_logits[i], 5).indices.tolist()
        assert a in hf_top5 and b in got.logprobs[i], f"diverged at {i}: ours {a}, transformers {b}"
        return
    assert len(got.token_ids) == len(hf_tokens)


def test_default_model_is_the_embedded_smollm2(llm):
    assert llm.engine.config.model.model == "smollm2-135m-instruct"
    assert llm.engine.config.model.source.endswith(".gguf")
    assert llm.engine.config.model.hf_config.num_hidden_layers == 30


def test_plain_prompts_match_transformers(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    outs = llm.generate(PLAIN, params)
    for prompt, out in zip(PLAIN, outs):
        assert_same_greedy(out, *hf_greedy(hf_model, out.prompt_token_ids))


def test_chat_prompts_match_transformers(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    outs = llm.chat(CHATS, params)
    for out in outs:
        assert out.prompt_token_ids[0] == llm.tokenizer.bos_token_id or out.prompt_token_ids[0] == 1
        assert_same_greedy(out, *hf_greedy(hf_model, out.prompt_token_ids))


def test_capital_of_france_is_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_auto_dtype_on_cpu():
    """float32 checkpoints stay exact; GGUF and half-precision ones run in bfloat16 where the CPU has it."""
    from flotilla.engine.arg_utils import EngineArgs, cpu_auto_dtype, cpu_has_native_bf16
    expected = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert cpu_auto_dtype("float32") == "float32"
    assert cpu_auto_dtype("bfloat16") == cpu_auto_dtype("float16") == cpu_auto_dtype(None) == expected
    assert EngineArgs(max_model_len=128, num_kv_blocks=8).create_engine_config().model.dtype == expected


@pytest.mark.slow
def test_bfloat16_matches_transformers_in_bfloat16():
    """In bfloat16 both sides round differently; the DESIGN.md near-tie rule applies to any divergence."""
    from transformers import AutoModelForCausalLM
    path = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.bfloat16).eval()
    llm = LLM(dtype="bfloat16", quantization="none", max_model_len=256, num_kv_blocks=64)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
        for out in llm.generate(PLAIN, params):
            assert_same_greedy(out, *hf_greedy(hf, out.prompt_token_ids))
    finally:
        llm.engine.shutdown()
