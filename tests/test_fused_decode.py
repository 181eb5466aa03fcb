"""The one-op decode layer (flotilla/csrc/decode_layer.cpp, layers/fused_decode.py) against the layer's own
modules: the same kernels in the same order, so greedy tokens and logprobs are identical bit for bit, for a
decode batch of several requests (Llama, and Qwen2 with q/k/v biases; int4 weights, so every linear is packed)."""

from __future__ import annotations

import pytest

from flotilla import LLM, SamplingParams

PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy dog and then runs into the", "A",
           "def fibonacci(n):\n    if n < 2:"]


def layers_of(llm):
    model = llm.engine.executor.worker.model
    return [model.model.layers[i] for i in model.local_layer_indices]


def generate(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3))
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_decode_equals_the_modules(family, tiny_llama, tiny_qwen2):
    path, _ = tiny_llama if family == "llama" else tiny_qwen2
    llm = LLM(model=path, dtype="bfloat16", quantization="int4", max_model_len=128, num_kv_blocks=32)
    layers = layers_of(llm)
    fused = [layer.fused_decode for layer in layers]
    assert all(f is not None for f in fused)
    calls = []
    for f in fused:  # count the steps the fused path really ran
        f._op = (lambda op: lambda *a: calls.append(1) or op(*a))(f._op)
    with_fused = generate(llm)
    assert len(calls) >= 11 * len(layers)  # every decode step after the prefill
    for layer in layers:
        layer.fused_decode = None
    assert generate(llm) == with_fused
