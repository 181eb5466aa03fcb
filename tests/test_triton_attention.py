"""The GPU attention backend (layers/attention/triton_paged.py) and decode CUDA graphs' buffers
(worker/cuda_graphs.py), run on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``).

Oracle: the PyTorch backend (tested against transformers) on the same step and cache, for decodes, speculative
verification chunks, chunked prefill on cached context and fresh prefills, with grouped-query attention whose
group and head size are not powers of two; and the engine's greedy tokens with the PyTorch backend. The
interpreter multiplies half precision in float32 (its own half-precision ``tl.dot`` is wrong), so the bfloat16
check is of the data path, with bfloat16's tolerance. Graph capture itself needs CUDA: the device check
(benchmarks/gpu_check.py) replays them against eager decode.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from flotilla.layers.attention.backend import AttentionContext, CommonAttentionMetadata
from flotilla.layers.attention.torch_paged import TorchPagedAttentionBackend

pytest.importorskip("triton", reason="triton is installed by scripts/setup.sh")

BS, NUM_BLOCKS = 16, 64


@pytest.fixture(scope="module")
def tp():
    """flotilla.layers.attention.triton_paged, its kernels in the interpreter without a GPU (conftest.py)."""
    module = importlib.import_module("flotilla.layers.attention.triton_paged")
    if not torch.cuda.is_available() and not module.interpreted():
        pytest.fail("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py sets it)")
    return module


def make_step(qlens: list[int], ctx: list[int], seed: int = 0, bs: int = BS, num_blocks: int = NUM_BLOCKS):
    """CommonAttentionMetadata of one step: request i computes qlens[i] tokens on ctx[i] cached ones, its blocks
    a random distinct set (block 0 never used: the padding of block tables)."""
    g = torch.Generator().manual_seed(seed)
    r = len(qlens)
    width = max(-(-(q + c) // bs) for q, c in zip(qlens, ctx))
    tables = (torch.randperm(num_blocks - 1, generator=g)[:r * width] + 1).view(r, width)  # (R, width)
    q_t, c_t = torch.tensor(qlens), torch.tensor(ctx)
    pos = torch.cat([torch.arange(c, c + q) for q, c in zip(qlens, ctx)])  # (T,)
    req = torch.repeat_interleave(torch.arange(r), q_t)
    slots = tables[req, pos // bs] * bs + pos % bs
    decodes = sum(1 for q in qlens if q == 1)
    assert qlens[:decodes] == [1] * decodes, "decodes first"
    return CommonAttentionMetadata(q_t, c_t, tables, slots, decodes, bs, max(qlens), int((q_t + c_t).max()))


def run_both(tp, common, heads, kv_heads, head_dim, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = int(common.query_lens.sum())
    q = torch.randn(t, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(t, kv_heads, head_dim, generator=g).to(dtype)
    cache = torch.randn(2, kv_heads, NUM_BLOCKS, common.block_size, head_dim, generator=g).to(dtype)
    results = []
    for backend in (TorchPagedAttentionBackend(), tp.TritonPagedAttentionBackend()):
        c = cache.clone()
        out = backend.forward(q, k, v, c, backend.build_metadata(common), head_dim ** -0.5)
        results.append((out, c))
    return results


STEPS = {
    "decodes": ([1, 1, 1], [5, 16, 47]),
    "verification": ([5, 5], [30, 17]),
    "mixed": ([1, 1, 3, 21], [5, 17, 4, 0]),
    "chunked": ([1, 40, 7], [33, 12, 0]),
}


@pytest.mark.parametrize("step", STEPS, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 40), (4, 4, 32)], ids=["gqa3_d40", "mha_d32"])
def test_triton_attention_equals_the_torch_backend(tp, step, heads, kv_heads, head_dim):
    (out_ref, cache_ref), (out, cache) = run_both(tp, make_step(*STEPS[step]), heads, kv_heads, head_dim,
                                                  torch.float32)
    assert torch.equal(cache, cache_ref)  # the step's K/V written to the same slots, nothing else touched
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bs", [5, 32])
def test_triton_attention_any_block_size(tp, bs):
    (out_ref, cache_ref), (out, cache) = run_both(tp, make_step(*STEPS["chunked"], bs=bs), 6, 2, 40, torch.float32)
    assert torch.equal(cache, cache_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 16])
def test_split_keys_combine_to_the_same_attention(tp, splits):
    """Decodes with their keys in 1, 2 or 16 shares (16: most shares empty at these lengths) equal the PyTorch
    backend."""
    common = make_step([1, 1, 1, 1], [0, 31, 100, 200])
    (out_ref, _), _ = run_both(tp, common, 6, 2, 40, torch.float32)
    g = torch.Generator().manual_seed(1)  # run_both's inputs again
    q = torch.randn(4, 6, 40, generator=g)
    k, v = torch.randn(4, 2, 40, generator=g), torch.randn(4, 2, 40, generator=g)
    cache = torch.randn(2, 2, NUM_BLOCKS, BS, 40, generator=g)
    backend = tp.TritonPagedAttentionBackend()
    md = backend.build_metadata(common)
    tp.write_kv(k, v, cache[0], cache[1], md.slot_mapping)
    out = torch.empty(4, 6, 40)
    tp.paged_attention(out, q, cache[0], cache[1], md, 40 ** -0.5, splits=splits)
    torch.testing.assert_close(out.view(4, -1), out_ref, rtol=1e-5, atol=1e-5)


def test_split_count_fills_the_gpu(tp):
    cpu = torch.device("cpu")  # as a GPU of 8 multiprocessors
    assert [tp.num_splits(n, cpu) for n in (1, 2, 3, 16, 17, 1000)] == [16, 8, 8, 1, 1, 1]


def test_triton_attention_bfloat16(tp):
    (out_ref, cache_ref), (out, cache) = run_both(tp, make_step(*STEPS["mixed"]), 6, 2, 40, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(cache, cache_ref)
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=2e-2, atol=2e-2)


def test_tiles_cut_each_request(tp):
    tiles = tp.tiles_of(torch.tensor([1, 20, 3]), torch.tensor([7, 0, 5]), 16)
    # request, first token row, tokens, first position
    assert tiles.tolist() == [[0, 1, 1, 2], [0, 1, 17, 21], [1, 16, 4, 3], [7, 0, 16, 5]]


def test_padding_tiles_and_negative_slots_do_nothing(tp):
    common = make_step([1, 1], [9, 20])
    backend = tp.TritonPagedAttentionBackend()
    md = backend.build_metadata(common)
    q, k, v = torch.randn(3, 4, 32), torch.randn(3, 2, 32), torch.randn(3, 2, 32)  # row 2: padding
    md = tp.TritonPagedMetadata(torch.cat([common.slot_mapping, torch.tensor([-1])]), md.block_tables,
                                torch.cat([md.tiles, torch.tensor([[0], [2], [0], [0]], dtype=torch.int32)], 1), 1)
    cache = torch.randn(2, 2, NUM_BLOCKS, BS, 32)
    before = cache.clone()
    out = backend.forward(q, k, v, cache, md, 0.2)
    written = cache != before
    assert int(written.sum()) == 2 * 2 * 2 * 32  # K and V of two tokens, two heads
    ref = TorchPagedAttentionBackend()
    torch.testing.assert_close(out[:2], ref.forward(q[:2], k[:2], v[:2], before, ref.build_metadata(common), 0.2),
                               rtol=1e-5, atol=1e-5)


def test_selector(tp, monkeypatch):
    from flotilla.layers.attention import selector
    monkeypatch.delenv(selector.ENV, raising=False)
    assert selector.backend_name("cpu", False) == "torch"
    assert selector.backend_name("cuda", False) == "triton"
    assert selector.backend_name("cuda", True) == "torch"  # batch-invariant: token by token in torch
    monkeypatch.setenv(selector.ENV, "triton")
    assert isinstance(selector.attention_backend("cpu", False), tp.TritonPagedAttentionBackend)
    with pytest.raises(ValueError, match="batch-invariant"):
        selector.backend_name("cpu", True)
    monkeypatch.setenv(selector.ENV, "flash")
    with pytest.raises(ValueError, match="must be one of auto, torch, triton"):
        selector.backend_name("cuda", False)
    monkeypatch.setenv(selector.ENV, "torch")
    assert isinstance(selector.attention_backend("cuda", False), TorchPagedAttentionBackend)
    monkeypatch.setenv(selector.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA"):
        selector.backend_name("cpu", False)


def test_capture_sizes():
    from flotilla.worker.cuda_graphs import capture_sizes
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(4096)[-1] == 512


@pytest.fixture(scope="module")
def triton_engine(tp, tiny_llama):
    """The tiny Llama (4 heads, 2 KV heads) on the Triton backend, in the interpreter."""
    from flotilla import LLM
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOTILLA_ATTENTION_BACKEND", "triton")
        llm = LLM(model=tiny_llama[0], max_model_len=128, num_kv_blocks=48)
    assert isinstance(llm.engine.executor.worker.backend, tp.TritonPagedAttentionBackend)
    return llm


PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14"]


def test_engine_greedy_tokens_equal_the_torch_backend(triton_engine, tiny_llama_engine):
    from flotilla import SamplingParams
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in triton_engine.generate(PROMPTS, params)]
    ref = [o.outputs[0].token_ids for o in tiny_llama_engine.generate(PROMPTS, params)]
    assert ours == ref
    # again: the prompts' full blocks now come from the prefix cache (prefill on cached context)
    assert [o.outputs[0].token_ids for o in triton_engine.generate(PROMPTS, params)] == ref


def test_decode_graph_buffers_equal_the_eager_step(triton_engine):
    """DecodeGraphs' static buffers (a 3-request decode padded to 4 rows: no cache write, no attention for the
    padding row) give the hidden states of the eager step, and write the same cache slots."""
    from flotilla.worker.cuda_graphs import DecodeGraphs
    from flotilla.worker.model_runner import StepInputs
    worker = triton_engine.engine.executor.worker
    model, backend, caches = worker.model, worker.backend, worker.runner.kv_caches
    common = make_step([1, 1, 1], [3, 17, 40], seed=3, num_blocks=caches[0].shape[2])  # the engine's blocks
    ids = torch.tensor([5, 900, 41])
    positions = common.context_lens.clone()
    inputs = StepInputs(["a", "b", "c"], ids, positions, common, [], torch.tensor([]), [], None)
    graphs = DecodeGraphs(model, backend, caches, torch.device("cpu"), [1, 2, 4], max_blocks=8, capture=False)
    assert graphs.can_run(inputs)
    saved = [c.clone() for c in caches]
    with torch.inference_mode():
        eager = model(ids, positions, AttentionContext(backend, backend.build_metadata(common), caches), None)
        eager_caches = [c.clone() for c in caches]
        for c, s in zip(caches, saved):
            c.copy_(s)
        replayed = graphs.run(inputs)
    assert replayed.shape == eager.shape
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches, eager_caches):  # the same slots written (the values within float error: 4 rows, not 3)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for c, s in zip(caches, saved):
        c.copy_(s)
    prefill = make_step([1, 2], [3, 4], num_blocks=caches[0].shape[2])
    assert not graphs.can_run(StepInputs(["a", "b"], torch.tensor([1, 2, 3]), torch.tensor([3, 4, 5]), prefill, [],
                                         torch.tensor([]), [], None))


def test_no_graphs_off_cuda_and_enforce_eager_reaches_the_worker(tiny_llama):
    """Graphs are captured only on CUDA; ``enforce_eager`` is carried by ModelConfig to the worker."""
    from flotilla.engine.arg_utils import EngineArgs
    config = EngineArgs(model=tiny_llama[0], enforce_eager=True, max_model_len=64).create_engine_config()
    assert config.model.enforce_eager is True
    assert EngineArgs(model=tiny_llama[0], max_model_len=64).create_engine_config().model.enforce_eager is False


def test_cpu_engine_has_no_graphs(tiny_llama_engine):
    assert tiny_llama_engine.engine.executor.worker.runner.graphs is None
