"""GGUF weights kept quantized (``--quantization gguf``, the CPU default for GGUF files; here without the float
copies for large steps, ``gguf_dense_min_tokens=0``, so every step runs the kernels: tests/test_quant_dispatch.py
covers the copies) and
``--quantization int4``, at the engine level.

Two oracles, both transformers in float32 on the same weights (the GGUF file dequantized; for int4 the
dequantized int4 values), teacher-forced over flotilla's whole sequence (tests/oracle_helpers.py):

- the exact one: the inputs of every linear layer whose weight flotilla keeps quantized rounded as the
  kernels round them (int8 per block of 32, ``rounded_activations``). What is left is float32 summation
  order, and the activations it moves across a rounding boundary (see ``ROUNDED_LOGPROB_TOL``): on the tiny
  int4 models it is nearly exact (mean gap about half the float model's, both ~1e-4); on SmolLM2, whose outlier
  channels make the rounding chaotic, it is only a little closer on average than the float model (measured:
  0.032 against 0.034), so there both are checked under the same rule. The portable (scalar) kernels are
  checked too, by capping the kernels' instruction set in the engine's process; the default run takes the
  CPU's widest path.
- llama.cpp's view: the float model itself, under DESIGN.md's rule (same greedy token, or each side's token in
  the other's top-5), logprobs within the activation-rounding error measured below.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flotilla import LLM, SamplingParams, ops
from flotilla.engine.arg_utils import EngineArgs
from flotilla.errors import InvalidRequestError
from flotilla.layers.quantization import quantize_int4
from flotilla.models.loader.gguf_dequant import dequantize
from flotilla.models.loader.gguf_file import open_gguf

from conftest import smollm2_gguf_path, smollm2_hf_float32
from oracle_helpers import (ROUNDED_LOGPROB_TOL, check_outputs_against_oracle, packed_linear_names,
                            rounded_activations)

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, there was a little"]
MAX_NEW = 12
# |flotilla logprob - oracle logprob| of each generated token: activation rounding only; measured on SmolLM2
# float32 (Q4_1 + Q8_0 weights) up to 0.16, on the tiny random models with int4 up to 0.15 (at near-ties).
GGUF_LOGPROB_TOL = 0.3
INT4_LOGPROB_TOL = 0.3
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def smollm2():
    llm = LLM(dtype="float32", quantization="gguf", gguf_dense_min_tokens=0, max_model_len=256, num_kv_blocks=16)
    yield llm
    llm.engine.shutdown()


@pytest.fixture(scope="module")
def smollm2_hf():
    """(transformers model of the file in float32, names of its linear modules flotilla keeps quantized)."""
    path = smollm2_gguf_path()
    hf_model = smollm2_hf_float32()
    return hf_model, packed_linear_names(open_gguf(path), hf_model)


def test_gguf_is_kept_quantized_on_request(smollm2, smollm2_hf):
    assert smollm2.engine.config.model.quantization == "gguf"
    model = smollm2.engine.executor.worker.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.quant_weight.describe() == "Q4_1" and qkv.weight.numel() == 0  # the float copy is freed
    table = model.model.embed_tokens.quant_weight
    assert table is model.lm_head.quant_weight and table.describe() == "Q8_0"  # tied: one packed table
    assert len(smollm2_hf[1]) == 30 * 7 + 1  # q, k, v, o, gate, up, down of every layer and the LM head


def test_smollm2_chat_answer_follows_the_float_model(smollm2, smollm2_hf):
    """Issue 18: the float model's first chat token leads by only 0.08 logits ("The" over "L"); one int8
    rounding of the activations per block moved it by ~0.05 and the answer became "L'Étoile, la
    Marseillaise...". With the residual rounded too (two-level activations) the kept-quantized greedy answer is
    the float model's (transformers, float32, the dequantized file) token for token: measured all 8 tokens,
    "The capital of France is Paris." and <|im_end|>."""
    hf_model, _ = smollm2_hf
    msgs = [[{"role": "user", "content": "What is the capital of France?"}]]
    out = smollm2.chat(msgs, SamplingParams(temperature=0, max_tokens=16))[0]
    got = list(out.outputs[0].token_ids)
    assert "Paris" in out.outputs[0].text, out.outputs[0].text
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([out.prompt_token_ids]), max_new_tokens=len(got), do_sample=False)
    assert got == ref[0, len(out.prompt_token_ids):].tolist()


def mean_gap(checks) -> float:
    return sum(c.sum_logprob_gap for c in checks) / sum(c.num_positions for c in checks)


def check_both_oracles(hf_model, names, outs, plain_tol: float, label: str, closer: float | None = None) -> None:
    """The rounded-activation oracle within ``ROUNDED_LOGPROB_TOL``, the float model within ``plain_tol``
    (both under DESIGN.md's top-5 rule), and with ``closer`` the rounded oracle's mean gap below ``closer``
    times the float model's: it models what the kernels compute."""
    with rounded_activations(hf_model, names):
        rounded = check_outputs_against_oracle(hf_model, outs, ROUNDED_LOGPROB_TOL)
    plain = check_outputs_against_oracle(hf_model, outs, plain_tol)
    print(label, "rounded-activation oracle: divergences", [c.divergences for c in rounded], "max gap",
          max(c.max_logprob_gap for c in rounded), "mean gap", mean_gap(rounded), "| float oracle: divergences",
          [c.divergences for c in plain], "max gap", max(c.max_logprob_gap for c in plain), "mean gap",
          mean_gap(plain))
    if closer is not None:
        assert mean_gap(rounded) < closer * mean_gap(plain)


@pytest.mark.parametrize("isa", ["default", "scalar"])
def test_smollm2_quantized_follows_the_oracles(smollm2, smollm2_hf, isa):
    hf_model, names = smollm2_hf
    if isa == "scalar":
        with ops.isa_cap("scalar"):  # the portable kernels (the engine's worker runs in this process)
            outs = smollm2.generate(PROMPTS, GREEDY)
    else:
        if not ops.isa_detected():
            pytest.skip("this CPU has no vectorised kernel path")
        outs = smollm2.generate(PROMPTS, GREEDY)
    check_both_oracles(hf_model, names, outs, GGUF_LOGPROB_TOL, isa)


def int4_oracle(hf_model):
    """A copy of ``hf_model`` whose linear weights (the LM head too) are flotilla's int4 values, dequantized."""
    oracle = copy.deepcopy(hf_model).float()
    for module in oracle.modules():
        if isinstance(module, torch.nn.Linear):
            qt = quantize_int4(module.weight.data)
            w = dequantize(qt.data.reshape(-1), qt.qtype).view(qt.shape)
            module.weight = torch.nn.Parameter(w, requires_grad=False)
    return oracle


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_int4_follows_the_dequantized_oracle(family, tiny_llama, tiny_qwen2):
    path, hf_model = tiny_llama if family == "llama" else tiny_qwen2
    llm = LLM(model=path, dtype="float32", quantization="int4", max_model_len=128, num_kv_blocks=32)
    model = llm.engine.executor.worker.model
    assert model.lm_head.quant_weight.describe() == "Q4_1"
    assert model.model.layers[0].mlp.down_proj.quant_weight.describe() == "Q4_1"
    outs = llm.generate(PROMPTS, GREEDY)
    oracle = int4_oracle(hf_model)
    names = [name for name, m in oracle.named_modules() if isinstance(m, torch.nn.Linear)]  # all int4
    # with two-level activations both gaps are tiny (measured 8.5e-5 vs 1.8e-4 llama, 8.1e-5 vs 1.6e-4 qwen2)
    check_both_oracles(oracle, names, outs, INT4_LOGPROB_TOL, family, closer=0.75)


def test_int4_rounds_to_the_nearest_of_sixteen_levels():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[0, :32] = 0.5  # a constant group: scale 0, every value exactly the minimum
    qt = quantize_int4(w)
    back = dequantize(qt.data.reshape(-1), qt.qtype).view(8, 64)
    groups = w.view(8, 2, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)  # (8, 64)
    assert ((back - w).abs() <= step / 2 + 1e-3 * step + 1e-4).all()
    assert torch.equal(back[0, :32], torch.full((32,), 0.5))


def test_quantization_choices(tiny_llama):
    assert EngineArgs(model=None).create_engine_config().model.quantization == "gguf"  # the CPU default for GGUF
    assert EngineArgs(quantization="gguf").create_engine_config().model.quantization == "gguf"
    assert EngineArgs(quantization="none").create_engine_config().model.quantization is None
    assert EngineArgs(batch_invariant=True).create_engine_config().model.quantization is None
    assert EngineArgs(model=tiny_llama[0]).create_engine_config().model.quantization is None
    assert EngineArgs(model=tiny_llama[0], quantization="int4").create_engine_config().model.quantization == "int4"
    with pytest.raises(InvalidRequestError, match="not a GGUF file"):
        EngineArgs(model=tiny_llama[0], quantization="gguf").create_engine_config()
    with pytest.raises(InvalidRequestError, match="batch-invariant"):
        EngineArgs(quantization="gguf", batch_invariant=True).create_engine_config()
    with pytest.raises(InvalidRequestError, match="gguf, int8, int4, none"):
        EngineArgs(quantization="int3").create_engine_config()
