"""GGUF weights kept quantized (``--quantization gguf``, the default for a GGUF file on the CPU) and
``--quantization int4``, at the engine level.

The oracle is transformers on the same weights (the GGUF file dequantized; for int4 the dequantized int4
values) in float32, under DESIGN.md's rule (same greedy token, or each side's token in the other's top-5),
teacher-forced over flotilla's whole sequence. The only difference left is the int8 rounding of the
activations (per block of 32, as llama.cpp), so logprobs agree within a small tolerance (measured below).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from flotilla import LLM, SamplingParams
from flotilla.engine.arg_utils import EngineArgs
from flotilla.errors import InvalidRequestError
from flotilla.layers.quantization import quantize_int4
from flotilla.models.loader.gguf_dequant import dequantize

from conftest import smollm2_gguf_path
from oracle_helpers import check_outputs_against_oracle

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, there was a little"]
MAX_NEW = 12
# |flotilla logprob - oracle logprob| of each generated token: activation rounding only; measured on SmolLM2
# float32 (Q4_1 + Q8_0 weights) up to 0.16, on the tiny random models with int4 up to 0.15 (at near-ties).
GGUF_LOGPROB_TOL = 0.3
INT4_LOGPROB_TOL = 0.3


@pytest.fixture(scope="module")
def smollm2():
    return LLM(dtype="float32", max_model_len=256, num_kv_blocks=16)


def test_gguf_is_kept_quantized_by_default(smollm2):
    assert smollm2.engine.config.model.quantization == "gguf"
    model = smollm2.engine.executor.worker.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.quant_weight.describe() == "Q4_1" and qkv.weight.numel() == 0  # the float copy is freed
    table = model.model.embed_tokens.quant_weight
    assert table is model.lm_head.quant_weight and table.describe() == "Q8_0"  # tied: one packed table


def test_smollm2_quantized_follows_transformers(smollm2):
    from transformers import AutoModelForCausalLM
    path = smollm2_gguf_path()
    hf_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32).eval()
    outs = smollm2.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5))
    checks = check_outputs_against_oracle(hf_model, outs, GGUF_LOGPROB_TOL)
    print("divergences:", [c.divergences for c in checks], "max gap:", max(c.max_logprob_gap for c in checks))


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
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5))
    checks = check_outputs_against_oracle(int4_oracle(hf_model), outs, INT4_LOGPROB_TOL)
    print(family, "divergences:", [c.divergences for c in checks], "max gap:",
          max(c.max_logprob_gap for c in checks))


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
    smollm2 = EngineArgs(model=None)
    assert smollm2.create_engine_config().model.quantization == "gguf"
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
