"""The per-step choice between the kept-quantized kernels and float copies of the weights (issue 18:
``--quantization gguf``, the CPU default for GGUF files, keeps bfloat16 copies for steps of at least
``--gguf-dense-min-tokens`` tokens, because the int8 kernels win only at a few rows per step).

- ``QuantizedWeight``: below the threshold a matmul is the quantized kernel's result bit for bit, from it on
  ``F.linear`` over the dequantized weight bit for bit (oneDNN's prepacked bfloat16 weight included);
  embedding lookups always read the quantized rows.
- The engine: the default keeps copies on linear layers and the LM head only, the fused decode layer stands
  aside for steps at or above the threshold, ``0`` keeps no copy, and a mixed run (prefill on the copies,
  decode on the kernels) follows the float model (transformers, float32) under DESIGN.md's rule.
- The settings: default, explicit, 0, refused values, and the combinations that fall back to float weights.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from flotilla import LLM, SamplingParams, ops
from flotilla.engine.arg_utils import EngineArgs
from flotilla.errors import InvalidRequestError
from flotilla.layers.quant_weight import (DENSE_MIN_ROWS_BF16, DENSE_MIN_ROWS_OTHER, QuantizedWeight, Segment,
                                          auto_dense_min_rows, pack)

from conftest import smollm2_hf_float32
from oracle_helpers import check_outputs_against_oracle
from test_quant_kernels import activations, kernels, quant_tensor  # noqa: F401  (kernels: a fixture)


def weight(dtype: torch.dtype, min_rows: int) -> tuple[QuantizedWeight, torch.Tensor]:
    qt = quant_tensor(T.Q4_1, 48, 64, seed=21)
    qw = QuantizedWeight(48, 64, [Segment(0, 48, qtype=int(T.Q4_1), packed=pack(qt))], dtype)
    qw.set_dense(min_rows)
    return qw, qt.dequantize(torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_below_the_threshold_run_the_kernel_and_above_it_the_float_copy(kernels, dtype):
    qw, w = weight(dtype, min_rows=4)
    assert qw.dense is not None and qw.dense_nbytes == 48 * 64 * w.element_size()
    for m in (1, 3, 4, 9):
        x = activations(m, 64, seed=m).to(dtype)
        bias = torch.randn(48).to(dtype)
        got = qw.matmul(x, bias)
        if m < 4:
            y = torch.empty(m, 48, dtype=dtype)
            kernels.quant_matmul(y, x, qw.segments[0].packed, int(T.Q4_1), 48)
            assert torch.equal(got, y + bias), m
        else:
            assert torch.equal(got, F.linear(x, w, bias)), m
    x = activations(8, 64, seed=5).to(dtype).view(2, 4, 64)  # leading dims count as rows: 8 >= 4
    assert torch.equal(qw.matmul(x), F.linear(x, w))
    ids = torch.tensor([0, 47, 5])
    assert torch.equal(qw.embedding(ids), w[ids])  # lookups read the quantized rows


def test_threshold_must_be_positive(kernels):
    qt = quant_tensor(T.Q8_0, 16, 64, seed=3)
    qw = QuantizedWeight(16, 64, [Segment(0, 16, qtype=int(T.Q8_0), packed=pack(qt))], torch.float32)
    with pytest.raises(ValueError, match="min_rows"):
        qw.set_dense(0)


@pytest.fixture(scope="module")
def hybrid():
    """SmolLM2 in float32, kept quantized, float copies from 2 tokens per step: a one-prompt run prefills on
    the copies and decodes on the kernels."""
    llm = LLM(dtype="float32", max_model_len=256, num_kv_blocks=16, gguf_dense_min_tokens=2)
    yield llm
    llm.engine.shutdown()


def test_default_keeps_float_copies_for_the_linear_layers_only(hybrid):
    mc = hybrid.engine.config.model
    assert (mc.quantization, mc.dense_min_rows) == ("gguf", 2)
    model = hybrid.engine.executor.worker.model
    layer = model.model.layers[0]
    for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert lin.quant_weight.dense is not None and lin.quant_weight.dense_min_rows == 2
    assert model.lm_head.quant_weight.dense is not None  # tied: the table's copy serves the LM head
    assert layer.fused_decode is not None and layer.fused_decode.dense_from == 2


def test_mixed_run_follows_the_float_model(hybrid):
    hf_model = smollm2_hf_float32()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    outs = [hybrid.generate([p], params, use_tqdm=False)[0]
            for p in ["The capital of France is", "def add(a, b):\n    return"]]
    checks = check_outputs_against_oracle(hf_model, outs, 0.3)
    assert all(c.num_positions == 12 for c in checks)
    msgs = [[{"role": "user", "content": "What is the capital of France?"}]]
    assert "Paris" in hybrid.chat(msgs, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text


def test_settings(tiny_llama):
    expected = DENSE_MIN_ROWS_BF16 if ops.isa_detected() >= 3 else DENSE_MIN_ROWS_OTHER
    if ops.cpu_kernels() is not None:
        assert auto_dense_min_rows() == expected
    mc = EngineArgs().create_engine_config().model
    assert (mc.quantization, mc.dense_min_rows) == ("gguf", auto_dense_min_rows())  # the CPU default for GGUF
    assert EngineArgs(gguf_dense_min_tokens=0).create_engine_config().model.dense_min_rows == 0
    assert EngineArgs(gguf_dense_min_tokens=16).create_engine_config().model.dense_min_rows == 16
    for kwargs in ({"quantization": "none"}, {"batch_invariant": True}, {"max_resident_weights": 0.2}):
        mc = EngineArgs(**kwargs).create_engine_config().model
        assert (mc.quantization, mc.dense_min_rows) == (None, 0), kwargs  # float weights
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(InvalidRequestError, match="gguf_dense_min_tokens"):
            EngineArgs(gguf_dense_min_tokens=bad).create_engine_config()
    with pytest.raises(InvalidRequestError, match="gguf_dense_min_tokens applies"):
        EngineArgs(quantization="none", gguf_dense_min_tokens=8).create_engine_config()
    with pytest.raises(InvalidRequestError, match="gguf_dense_min_tokens applies"):
        EngineArgs(model=tiny_llama[0], gguf_dense_min_tokens=8).create_engine_config()
