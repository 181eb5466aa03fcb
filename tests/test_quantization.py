"""Weight-only int8 quantization (``--quantization int8``)."""

from __future__ import annotations

import pytest
import torch

from flotilla import LLM, SamplingParams
from flotilla.errors import InvalidRequestError
from flotilla.layers.linear import ReplicatedLinear
from flotilla.layers.quantization import linear, quantize_int8, quantize_model_


def test_int8_rows_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    assert (q.float() * scales[:, None] - w).abs().max() <= scales.max() / 2 + 1e-6


def test_quantized_linear_equals_matmul_with_dequantized_weight():
    torch.manual_seed(0)
    layer = ReplicatedLinear(96, 64, bias=True, dtype=torch.bfloat16)
    layer.weight.data.copy_(torch.randn(64, 96))
    layer.bias.data.copy_(torch.randn(64))
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    q, scales = quantize_int8(layer.weight.data)
    expected = x.float() @ (q.float() * scales.float()[:, None]).T + layer.bias.float()
    assert quantize_model_(layer, "int8") == 1
    assert layer.weight.numel() == 0  # the float copy is freed
    got = layer(x).float()
    assert got.shape == (5, 64)
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.02)
    assert linear(x.view(1, 5, 96), layer, layer.bias).shape == (1, 5, 64)


def test_unknown_method_and_float32_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="int8"):
        quantize_model_(ReplicatedLinear(8, 8), "int4")
    with pytest.raises(InvalidRequestError, match="bfloat16"):
        LLM(model=tiny_llama[0], dtype="float32", quantization="int8", num_kv_blocks=8)


def test_quantized_tiny_llama_follows_the_bfloat16_model(tiny_llama):
    """Greedy int8 tokens follow bf16 ones until a near-tie: the first token agrees on every prompt."""
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300], [42] * 12]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ref = LLM(model=tiny_llama[0], dtype="bfloat16", max_model_len=128, num_kv_blocks=32)
    want = [o.outputs[0].token_ids for o in ref.generate([{"prompt_token_ids": p} for p in prompts], params)]
    llm = LLM(model=tiny_llama[0], dtype="bfloat16", quantization="int8", max_model_len=128, num_kv_blocks=32)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert [g[0] for g in got] == [w[0] for w in want]


def test_quantized_smollm2_answers():
    llm = LLM(quantization="int8", dtype="bfloat16", max_model_len=256, num_kv_blocks=32)
    assert llm.engine.config.model.quantization == "int8"
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16))[0]
    assert "Paris" in out.outputs[0].text
