"""Batch-invariant execution (``LLM(batch_invariant=True)`` / ``--batch-invariant``): a seeded request gives the
same tokens and the same logprobs (bit for bit) alone and inside batches of 2-16 other requests, with its prompt
chunked differently, its prefix served from the cache and requests preempted and recomputed; on the kernel
path and on the eager path; in float32 and bfloat16; under tensor parallelism; and greedy output still equals
transformers'. (By default a request's logprobs move with the batch: issue 11.)
"""

from __future__ import annotations

import pytest
import torch

from flotilla import LLM, SamplingParams, ops
from flotilla.layers.batch_invariant import invariant_linear
from flotilla.layers.linear import ReplicatedLinear

from test_model_oracle import assert_matches_oracle

TARGET = "The quick brown fox jumps over the lazy dog while the old cat watches it from the wooden fence"
OTHERS = [
    "Hello",
    TARGET[:40] + " and then everything changed for the small village",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    TARGET,
    "Once upon a time there was",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    TARGET[:25] + " runs away",
    "In 1492, Columbus sailed the ocean blue. He was looking for a new route",
    "def fibonacci(n):\n    return",
    "Paris is the capital of",
    TARGET[:60],
    "The weather today is sunny with a chance of rain later in the afternoon",
    "x",
    "Roses are red, violets are blue",
    "import torch\nimport numpy as np\n",
    "Q: What is two plus two?\nA:",
]
SEEDED = SamplingParams(temperature=1.0, seed=1234, max_tokens=8, logprobs=3, ignore_eos=True)
MAX_BATCHED = 16


def other_params(i: int) -> SamplingParams:
    """Greedy and random, seeded and not, with and without top-p, top-k and a penalty: every sampler path."""
    return SamplingParams(temperature=[1.0, 0.7, 0.0][i % 3], max_tokens=3 + (5 * i) % 11, ignore_eos=True,
                          seed=i if i % 2 else None, top_p=0.9 if i % 4 == 1 else 1.0, top_k=20 if i % 4 == 2 else 0,
                          repetition_penalty=1.2 if i % 5 == 3 else 1.0)


def signature(out) -> tuple:
    """Tokens and every logprob entry (id, value, rank) of a request's only completion."""
    c = out.outputs[0]
    return tuple(c.token_ids), tuple(tuple((t, lp.logprob, lp.rank) for t, lp in step.items()) for step in c.logprobs)


def target_in_batch(llm: LLM, n: int):
    """Run TARGET (SEEDED) in the middle of ``n`` other requests; its RequestOutput."""
    prompts, params = list(OTHERS[:n]), [other_params(i) for i in range(n)]
    prompts.insert(n // 2, TARGET)
    params.insert(n // 2, SEEDED)
    return llm.generate(prompts, params)[n // 2]


def make(path: str, dtype: str, **kw) -> LLM:
    kw = dict(max_model_len=64, block_size=4, num_kv_blocks=40, max_num_batched_tokens=MAX_BATCHED,
              max_num_seqs=16, **kw)
    return LLM(model=path, dtype=dtype, batch_invariant=True, **kw)


def assert_invariant(llm: LLM) -> None:
    alone = llm.generate([TARGET], [SEEDED])[0]
    assert alone.num_cached_tokens == 0 and len(alone.prompt_token_ids) > MAX_BATCHED  # fresh, chunked
    want = signature(alone)
    cached = []
    for n in (2, 4, 8, 16):
        got = target_in_batch(llm, n)
        assert signature(got) == want, f"differs inside a batch of {n} other requests"
        cached.append(got.num_cached_tokens)
    assert max(cached) > 0  # some runs read the prompt from the prefix cache
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.scheduler.kv_cache_manager.usage == 0


def kernel_library():
    k = ops.cpu_kernels()
    if k is None:
        pytest.skip("the CPU kernel library is unavailable here (no C++ compiler, or FLOTILLA_CPU_KERNELS=0)")
    return k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_seeded_request_is_batch_invariant_with_kernels(tiny_llama, dtype):
    kernel_library()
    llm = make(tiny_llama[0], dtype)
    model = llm.engine.core.executor.worker.model
    assert sum(hasattr(m, "bi_packed") for m in model.modules()) == 2 * 4 + 1  # 4 linears a layer + LM head
    assert_invariant(llm)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_seeded_request_is_batch_invariant_without_kernels(tiny_llama, dtype, monkeypatch):
    monkeypatch.setenv("FLOTILLA_CPU_KERNELS", "0")
    llm = make(tiny_llama[0], dtype)
    model = llm.engine.core.executor.worker.model
    assert not any(hasattr(m, "bi_packed") for m in model.modules())
    assert_invariant(llm)


def test_greedy_equals_transformers(tiny_llama):
    path, hf_model = tiny_llama
    llm = LLM(model=path, max_model_len=128, num_kv_blocks=64, block_size=4, max_num_batched_tokens=8,
              batch_invariant=True)
    assert_matches_oracle(llm, hf_model)


def test_smollm2_seeded_request_is_batch_invariant():
    """The embedded model (bfloat16 where the CPU has it): the case of issue 11."""
    kernel_library()
    llm = LLM(max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=32, batch_invariant=True)
    try:
        params = SamplingParams(temperature=1.0, seed=1234, max_tokens=6, logprobs=2)
        prompt = "Write a short poem about the sea and the people who live by it."
        alone = signature(llm.generate([prompt], [params])[0])
        others = ["Hi", "What is the capital of France?", prompt[:30], "Tell me a joke about cats, please."]
        batch = llm.generate(others[:2] + [prompt] + others[2:],
                             [SamplingParams(temperature=0.8, max_tokens=4 + i) for i in range(2)] + [params]
                             + [SamplingParams(temperature=0.8, max_tokens=4 + i) for i in range(2)])
        assert signature(batch[2]) == alone
    finally:
        llm.engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_seeded_request_is_batch_invariant(tiny_llama, tp, pp):
    """TP=2 (the tiny model's 4 heads and 2 KV heads split over two worker processes; the row-parallel partial
    sums are added in rank order) and PP=2 (micro-batches in flight)."""
    llm = make(tiny_llama[0], "float32", tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        alone = signature(llm.generate([TARGET], [SEEDED])[0])
        for n in (3, 16):
            assert signature(target_in_batch(llm, n)) == alone, n
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_linear_rows_are_independent(dtype, monkeypatch):
    """The fallback without the kernel library: each row is its own (1, K) matmul."""
    monkeypatch.setenv("FLOTILLA_CPU_KERNELS", "0")
    torch.manual_seed(0)
    layer = ReplicatedLinear(96, 200, bias=True, dtype=dtype)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    x = torch.randn(37, 96).to(dtype)
    alone = torch.cat([invariant_linear(x[i:i + 1], layer, layer.bias) for i in range(37)])
    assert torch.equal(invariant_linear(x, layer, layer.bias), alone)
    assert torch.equal(invariant_linear(x[5:29], layer, layer.bias), alone[5:29])


def test_the_setting_reaches_the_config_from_every_entry_point(tiny_llama):
    import argparse

    from flotilla.deploy.config import parse_deployment_config
    from flotilla.deploy.engine_args import add_engine_args, engine_args_from
    from flotilla.worker.config_wire import decode_engine_config, encode_engine_config
    path = tiny_llama[0]
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert not engine_args_from(parser.parse_args(["--model", path])).batch_invariant
    config = engine_args_from(parser.parse_args(["--model", path, "--batch-invariant"])).create_engine_config()
    assert config.model.batch_invariant
    wire = encode_engine_config(config)  # what a worker process receives
    assert decode_engine_config(wire).model.batch_invariant
    deployment = parse_deployment_config({"models": [{"name": "a", "model": path,
                                                      "engine": {"batch_invariant": True}}]})
    assert deployment.models[0].engine_args().batch_invariant


def test_unsupported_combinations_are_refused(tiny_llama):
    from flotilla.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="--batch-invariant cannot be combined with --quantization int8"):
        LLM(model=tiny_llama[0], dtype="bfloat16", quantization="int8", batch_invariant=True)
    with pytest.raises(InvalidRequestError, match="--batch-invariant runs on the CPU only"):
        LLM(model=tiny_llama[0], device="cuda", batch_invariant=True)
    with pytest.raises(ValueError, match="batch_invariant cannot be combined with quantization"):
        from flotilla.config import ModelConfig
        ModelConfig(model="m", source="m", source_kind="hf_dir", hf_config=None, quantization="int8",
                    batch_invariant=True)


def _step(query_lens, context_lens, tables, bs):
    from flotilla.layers.attention.backend import CommonAttentionMetadata
    query_lens, context_lens = torch.tensor(query_lens), torch.tensor(context_lens)
    seq = context_lens + query_lens
    positions = torch.cat([torch.arange(int(c), int(s)) for c, s in zip(context_lens, seq)])
    req = torch.repeat_interleave(torch.arange(len(query_lens)), query_lens)
    slots = tables[req, positions // bs] * bs + positions % bs
    num_decodes = int((query_lens == 1).sum())
    return CommonAttentionMetadata(query_lens, context_lens, tables, slots, num_decodes, bs,
                                   int(query_lens.max()), int(seq.max()))


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokenwise_attention(dtype, kernels, monkeypatch):
    """Every token as a decode of its own length: the default backend's values (2 decodes, a fresh prefill, a
    chunk on cached context), and the same bits for a request's tokens alone or in that step."""
    from flotilla.layers.attention.torch_paged import TorchPagedAttentionBackend
    if kernels:
        kernel_library()
    else:
        monkeypatch.setenv("FLOTILLA_CPU_KERNELS", "0")
    torch.manual_seed(5)
    kvh, heads, d, bs, num_blocks = 2, 4, 32, 4, 48
    tables = torch.randperm(num_blocks)[:40].reshape(4, 10)
    common = _step([1, 1, 7, 6], [9, 20, 0, 5], tables, bs)
    cache0 = torch.randn(2, kvh, num_blocks, bs, d).to(dtype)
    q, k, v = (torch.randn(15, h, d).to(dtype) for h in (heads, kvh, kvh))

    def run(backend, common, q, k, v):
        cache = cache0.clone()
        return backend.forward(q, k, v, cache, backend.build_metadata(common), d ** -0.5), cache

    invariant = TorchPagedAttentionBackend(batch_invariant=True)
    got, got_cache = run(invariant, common, q, k, v)
    want, want_cache = run(TorchPagedAttentionBackend(), common, q, k, v)
    assert torch.equal(got_cache, want_cache)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    # The chunk of request 3 (tokens 9..14) alone, and split into two chunks: the same bits.
    alone, _ = run(invariant, _step([6], [5], tables[3:], bs), q[9:], k[9:], v[9:])
    assert torch.equal(alone, got[9:])
    first, _ = run(invariant, _step([2], [5], tables[3:], bs), q[9:11], k[9:11], v[9:11])
    assert torch.equal(first, got[9:11])
