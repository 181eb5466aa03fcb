"""Mistral's sliding window: flotilla runs full attention and caps ``max_model_len`` at the window.

Within the window, windowed and full attention are the same computation, so every sequence flotilla accepts
is computed exactly as transformers computes it with the window applied; anything longer is refused with an
error naming the window (vLLM does the same with ``--disable-sliding-window``). The test model is a tiny
random ``MistralForCausalLM`` with a 32-token window, checked against transformers' own windowed model over
whole greedy sequences that fill the window.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flotilla import LLM, SamplingParams
from flotilla.errors import InvalidRequestError

WINDOW = 32
LOGPROB_TOL = 1e-4
PROMPTS = [[1, 520, 3100, 42], list(range(1000, 1012)), [1] + [(37 * i) % 4000 + 100 for i in range(20)]]


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory, smollm2_tokenizer_dir):
    """(path, hf_model) of a tiny random Mistral with a 32-token sliding window."""
    import shutil
    from pathlib import Path

    from transformers import MistralConfig, MistralForCausalLM
    out = tmp_path_factory.mktemp("tiny_mistral")
    config = MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=WINDOW, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    torch.manual_seed(4)
    model = MistralForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    for item in Path(smollm2_tokenizer_dir).iterdir():
        shutil.copy(item, out / item.name)
    return str(out), model


def test_the_window_changes_the_oracle_beyond_it(tiny_mistral):
    """Sanity of the test model: past 32 tokens transformers' windowed Mistral differs from full attention, so
    a sequence longer than the window would need real windowed attention."""
    _, hf_model = tiny_mistral
    full = copy.deepcopy(hf_model)
    full.config.sliding_window = None
    ids = torch.tensor([[1] + list(range(2000, 2000 + 2 * WINDOW))])
    with torch.no_grad():
        windowed_logits, full_logits = hf_model(ids).logits[0], full(ids).logits[0]
    torch.testing.assert_close(windowed_logits[:WINDOW], full_logits[:WINDOW], atol=1e-5, rtol=1e-5)
    assert (windowed_logits[WINDOW:] - full_logits[WINDOW:]).abs().max() > 1e-2


def test_max_model_len_defaults_to_the_window_and_longer_is_refused(tiny_mistral):
    path, _ = tiny_mistral
    llm = LLM(model=path, num_kv_blocks=16)
    assert llm.engine.config.model.max_model_len == WINDOW
    with pytest.raises(InvalidRequestError, match="maximum context length is 32") as e:
        llm.generate({"prompt_token_ids": list(range(100, 100 + WINDOW + 8))}, SamplingParams(max_tokens=1))
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="sliding window") as e:
        LLM(model=path, max_model_len=2 * WINDOW, num_kv_blocks=16)
    assert e.value.param == "max_model_len" and "32" in str(e.value)


def test_greedy_sequences_filling_the_window_equal_transformers(tiny_mistral):
    """Each prompt generates until prompt + output fill the window; tokens identical to transformers'
    windowed model (fp32), logprobs within LOGPROB_TOL, also with chunked prefill."""
    path, hf_model = tiny_mistral
    for kw in ({}, {"max_num_batched_tokens": 8, "max_num_seqs": 2}):
        llm = LLM(model=path, num_kv_blocks=16, block_size=4, **kw)
        params = [SamplingParams(temperature=0, max_tokens=WINDOW - len(p), ignore_eos=True, logprobs=1)
                  for p in PROMPTS]
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        for prompt, out in zip(PROMPTS, outs):
            got = out.outputs[0]
            assert len(prompt) + len(got.token_ids) == WINDOW
            with torch.no_grad():
                ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=len(got.token_ids),
                                        min_new_tokens=len(got.token_ids), do_sample=False, output_logits=True,
                                        return_dict_in_generate=True, pad_token_id=0)
            ref_tokens = ref.sequences[0, len(prompt):].tolist()
            assert got.token_ids == ref_tokens, f"prompt of {len(prompt)} tokens diverged ({kw})"
            ref_lp = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(ref.logits, ref_tokens)]
            got_lp = [step[t].logprob for step, t in zip(got.logprobs, got.token_ids)]
            assert max(abs(a - b) for a, b in zip(got_lp, ref_lp)) < LOGPROB_TOL
