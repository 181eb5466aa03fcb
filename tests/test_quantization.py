"""Weight-only int8 quantization (``--quantization int8``)."""

from __future__ import annotations

import pytest
import torch

from flotilla import LLM, SamplingParams
from flotilla.errors import InvalidRequestError
from flotilla.layers.linear import ReplicatedLinear
from flotilla.layers.quantization import linear, quantize_int8, quantize_model_

from oracle_helpers import check_outputs_against_oracle, oracle_logprobs


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
        quantize_model_(ReplicatedLinear(8, 8), "int3")
    with pytest.raises(InvalidRequestError, match="bfloat16"):
        LLM(model=tiny_llama[0], dtype="float32", quantization="int8", num_kv_blocks=8)


# Oracle for int8: transformers in bfloat16 with every linear weight replaced by flotilla's int8 values times
# their scales (dequantized), the same weights the int8 kernel multiplies with. Measured gaps on the tiny
# models: up to 0.125 (the kernel accumulates in float32 where transformers rounds to bfloat16).
INT8_LOGPROB_TOL = 0.3
INT8_MAX_DIVERGED = 0.25  # the tiny models' flat distributions have near-ties (measured: 12 of 200 positions)
# Against the unquantized bfloat16 model (what int8 costs in accuracy), per position, same prefix; measured on
# the tiny models: mean 0.06, max 0.63.
UNQUANTIZED_MEAN_TOL = 0.12
UNQUANTIZED_MAX_TOL = 1.0
MAX_NEW = 40
PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy dog and then runs into the forest where",
           "A", "In 1492, Columbus sailed the ocean blue. He was looking for",
           "def fibonacci(n):\n    if n < 2:\n        return"]


def dequantize_linears_(oracle):
    """Replace every linear weight (the LM head too) of a bfloat16 transformers model, in place, by int8 * scale
    as ``quantize_int8`` makes them; a tied LM head is untied like flotilla's (the embedding stays float)."""
    for module in oracle.modules():
        if isinstance(module, torch.nn.Linear):
            q, scales = quantize_int8(module.weight.data)
            weight = (q.float() * scales.float()[:, None]).to(torch.bfloat16)  # (out, in)
            module.weight = torch.nn.Parameter(weight, requires_grad=False)
    return oracle


def dequantized_oracle(hf_model):
    """A bfloat16 copy of ``hf_model`` with dequantized int8 linear weights (``dequantize_linears_``)."""
    import copy
    return dequantize_linears_(copy.deepcopy(hf_model).to(torch.bfloat16))


def unquantized_gaps(hf_model, outs) -> torch.Tensor:
    """|flotilla int8 logprob - unquantized bfloat16 logprob| of each generated token, same prefix."""
    import copy
    reference = copy.deepcopy(hf_model).to(torch.bfloat16)
    gaps = []
    for out in outs:
        got = out.outputs[0]
        ref = oracle_logprobs(reference, list(out.prompt_token_ids), list(got.token_ids))  # (G, vocab)
        mine = torch.tensor([step[t].logprob for step, t in zip(got.logprobs, got.token_ids)])
        gaps.append((mine - ref[torch.arange(len(got.token_ids)), torch.tensor(got.token_ids)]).abs())
    return torch.cat(gaps)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_int8_follows_the_dequantized_oracle(family, tiny_llama, tiny_qwen2):
    """Whole greedy sequences of the int8 engine against transformers running the dequantized weights in
    bfloat16 (oracle rule at every position), and logprobs close to the unquantized model's. The Qwen2 model
    has q/k/v biases and a tied LM head."""
    path, hf_model = tiny_llama if family == "llama" else tiny_qwen2
    llm = LLM(model=path, dtype="bfloat16", quantization="int8", max_model_len=256, num_kv_blocks=64)
    assert llm.engine.executor.worker.model.lm_head.qweight.dtype == torch.int8
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5))
    checks = check_outputs_against_oracle(dequantized_oracle(hf_model), outs, INT8_LOGPROB_TOL)
    diverged = [c.divergences for c in checks]
    print(family, "divergences:", diverged, "max gap:", max(c.max_logprob_gap for c in checks))
    assert sum(map(len, diverged)) <= INT8_MAX_DIVERGED * len(PROMPTS) * MAX_NEW, diverged
    gaps = unquantized_gaps(hf_model, outs)
    print(family, f"vs unquantized: mean {gaps.mean():.4f} max {gaps.max():.4f}")
    assert gaps.mean() <= UNQUANTIZED_MEAN_TOL and gaps.max() <= UNQUANTIZED_MAX_TOL


@pytest.mark.slow
def test_int8_smollm2_follows_the_dequantized_oracle():
    """The embedded SmolLM2 (a real, peaked distribution; tied embeddings) in int8 against transformers
    loading the same GGUF file with the dequantized int8 weights."""
    import os

    from transformers import AutoModelForCausalLM

    from conftest import smollm2_gguf_path
    llm = LLM(quantization="int8", dtype="bfloat16", max_model_len=256, num_kv_blocks=32)
    assert llm.engine.config.model.quantization == "int8"
    prompts = ["The capital of France is", "Once upon a time, there was a little"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5))
    gguf = smollm2_gguf_path()
    hf_model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                    dtype=torch.bfloat16).eval()
    checks = check_outputs_against_oracle(dequantize_linears_(hf_model), outs, INT8_LOGPROB_TOL)
    assert sum(len(c.divergences) for c in checks) <= 4, [c.divergences for c in checks]
