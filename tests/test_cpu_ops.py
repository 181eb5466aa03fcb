"""The fused CPU kernels (flotilla/csrc/cpu_ops.cpp) against the eager PyTorch code they replace.

Elementwise kernels reproduce eager's rounding exactly in bfloat16/float16; RMSNorm sums in another order (a
float32 ulp); decode attention keeps scores and probabilities in float32, so it is compared against a float64
reference instead. Every kernel comparison runs at each instruction-set level this CPU has (the ``isa``
fixture caps the library's run-time dispatch), so the portable paths are checked on wide machines too.
"""

from __future__ import annotations

import functools

import pytest
import torch

from flotilla import ops
from flotilla.layers.activation import SiluAndMul
from flotilla.layers.attention.backend import CommonAttentionMetadata
from flotilla.layers.attention.torch_paged import TorchPagedAttentionBackend
from flotilla.layers.layernorm import RMSNorm
from flotilla.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def kernels_or_skip():
    """The kernel library; skips (with the reason) where no C++ compiler can build it, fails on any other
    build failure (a compile error is a bug here, not a missing tool)."""
    with ops.switch_kernels(True):
        k = ops.cpu_kernels()
        reason = ops.unavailable_reason()
    if k is None:
        if reason.startswith("CompilerNotFound"):
            pytest.skip(f"the CPU kernels cannot be built here: {reason}")
        pytest.fail(f"the CPU kernels did not build: {reason}")
    return k


@pytest.fixture(scope="module")
def kernels():
    return kernels_or_skip()


@pytest.fixture(params=ops.ISA_LEVELS)
def isa(request, kernels):
    """Caps the kernels' run-time dispatch at each level in turn (levels this CPU lacks are skipped)."""
    level = ops.ISA_LEVELS.index(request.param)
    if level > ops.isa_detected():
        pytest.skip(f"this CPU has no {request.param}")
    with ops.isa_cap(level):
        assert ops.isa_level() == level
        yield level


def eager(fn):
    with ops.switch_kernels(False):
        assert ops.cpu_kernels() is None
        return fn()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_eager(isa, dtype):
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5, dtype)
    norm.weight.data = torch.randn(576).to(dtype)
    x = torch.randn(37, 576).to(dtype)
    r = torch.randn(37, 576).to(dtype)
    want = eager(lambda: norm(x.clone()))
    got = norm(x.clone())
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    want_h, want_r = eager(lambda: norm(x.clone(), r.clone()))
    xin, rin = x.clone(), r.clone()
    got_h, got_r = norm(xin, rin)
    assert torch.equal(got_r, want_r)  # the residual add rounds exactly like eager
    assert got_h.data_ptr() == xin.data_ptr() and got_r.data_ptr() == rin.data_ptr()  # in place
    torch.testing.assert_close(got_h, want_h, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_eager_exactly(isa, dtype):
    torch.manual_seed(1)
    x = (torch.randn(19, 2 * 1536) * 3).to(dtype)
    act = SiluAndMul()
    want = eager(lambda: act(x))
    got = act(x)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # exp differs by an ulp
    else:
        assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2 ** -7


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_eager_exactly(isa, dtype):
    torch.manual_seed(2)
    rope = RotaryEmbedding(64, 512, {"rope_theta": 10000.0, "rope_type": "default"})
    qkv = torch.randn(23, (9 + 2 * 3) * 64).to(dtype)  # q and k are strided views, as in the model
    positions = torch.randint(0, 512, (23,))

    def run():
        t = qkv.clone()
        q, k, _ = t.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
        return rope(positions, q.reshape(23, 9, 64), k.reshape(23, 3, 64))

    want_q, want_k = eager(run)
    got_q, got_k = run()
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def _reference_decode(q, k_cache, v_cache, tables, lens, scale):
    """float64 attention of each sequence's single query over its cached keys."""
    n, h, d = q.shape
    kvh, _, bs, _ = k_cache.shape
    g = h // kvh
    out = torch.empty(n, h, d, dtype=torch.float64)
    for i in range(n):
        slots = torch.arange(int(lens[i]))
        blocks = tables[i][slots // bs]
        for head in range(h):
            keys = k_cache[head // g, blocks, slots % bs].double()  # (L, d)
            vals = v_cache[head // g, blocks, slots % bs].double()
            p = torch.softmax(keys @ q[i, head].double() * scale, dim=0)
            out[i, head] = p @ vals
    return out.reshape(n, h * d)


@functools.lru_cache(maxsize=None)
def _decode_case(dtype, heads, kvh, d):
    """Inputs of one decode-attention case and their float64 reference (shared by every ISA level)."""
    torch.manual_seed(3)
    bs, num_blocks = 16, 40
    cache = torch.randn(2, kvh, num_blocks, bs, d).to(dtype)
    lens = torch.tensor([1, 17, 130, 64, 5])
    tables = torch.stack([torch.randperm(num_blocks)[:10] for _ in lens])  # (5, 10) scattered blocks
    qkv = torch.randn(5, (heads + 2 * kvh) * d).to(dtype)
    q = qkv[:, :heads * d].reshape(5, heads, d)  # strided over tokens, as in the model
    return q, cache, tables, lens, _reference_decode(q, cache[0], cache[1], tables, lens, d ** -0.5)


@pytest.mark.parametrize("heads,kvh,d", [(9, 3, 64), (8, 4, 128), (16, 2, 64), (4, 4, 32), (12, 2, 128), (14, 2, 64),
                                         (20, 2, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention_matches_reference(kernels, isa, dtype, heads, kvh, d):
    """Every head_dim / group size the AVX-512 kernel specializes, groups it attends in parts (6 = 3 + 3 at 128,
    10 = 5 + 5 at 64: Qwen2.5-1.5B's and -0.5B's are 6 and 7), and a head_dim it leaves to the portable kernel."""
    q, cache, tables, lens, want = _decode_case(dtype, heads, kvh, d)
    out = torch.empty(5, heads * d, dtype=dtype)
    kernels.paged_decode_attention(out, q, cache[0], cache[1], tables, lens, d ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_with_kernels_matches_eager_backend(isa, dtype):
    """A mixed step (3 decodes, a prefill chunk on cached context): same cache contents, same outputs."""
    torch.manual_seed(4)
    kvh, heads, d, bs, num_blocks = 2, 4, 32, 4, 32
    backend = TorchPagedAttentionBackend()
    query_lens = torch.tensor([1, 1, 1, 6])
    context_lens = torch.tensor([9, 2, 20, 5])
    tables = torch.stack([torch.randperm(num_blocks)[:8] for _ in range(4)])
    seq = context_lens + query_lens
    positions = torch.cat([torch.arange(int(c), int(s)) for c, s in zip(context_lens, seq)])
    req = torch.repeat_interleave(torch.arange(4), query_lens)
    slots = tables[req, positions // bs] * bs + positions % bs
    common = CommonAttentionMetadata(query_lens, context_lens, tables, slots, 3, bs, 6, int(seq.max()))
    cache0 = torch.randn(2, kvh, num_blocks, bs, d).to(dtype)
    q = torch.randn(9, heads, d).to(dtype)
    k = torch.randn(9, kvh, d).to(dtype)
    v = torch.randn(9, kvh, d).to(dtype)

    def run():
        cache = cache0.clone()
        md = backend.build_metadata(common)
        return backend.forward(q, k, v, cache, md, d ** -0.5), cache

    want, want_cache = eager(run)
    got, got_cache = run()
    assert torch.equal(got_cache, want_cache)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_kernels_off_by_environment(kernels, monkeypatch):
    monkeypatch.setenv("FLOTILLA_CPU_KERNELS", "0")
    assert ops.cpu_kernels() is None
    with ops.switch_kernels(True):  # the in-process switch wins over the environment
        assert ops.cpu_kernels() is not None


def test_isa_cap_bounds_and_restores(kernels):
    detected = ops.isa_detected()
    assert ops.isa_level() == detected
    with ops.isa_cap("scalar"):
        assert ops.isa_level() == 0
        with ops.isa_cap(ops.ISA_LEVELS[-1]):  # a cap above the CPU's level never raises the level
            assert ops.isa_level() == detected
        assert ops.isa_level() == 0
    assert ops.isa_level() == detected
    with pytest.raises(RuntimeError, match="outside"):
        kernels.set_isa_cap(7)


def test_isa_detection_agrees_with_the_cpu_flags(kernels):
    from flotilla.kernel_build import cpu_flags
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    v3 = {"avx2", "fma"} <= flags
    avx512 = v3 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    want = 3 if avx512 and "avx512_bf16" in flags else 2 if avx512 else 1 if v3 else 0
    assert ops.isa_detected() == want


def test_prepacked_linear_is_bit_identical():
    from flotilla.layers.linear import ReplicatedLinear
    from flotilla.layers.quantization import linear, prepack_model_, prepack_supported
    if not prepack_supported(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(5)
    layer = ReplicatedLinear(96, 200, bias=True, dtype=torch.bfloat16)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    xs = [torch.randn(n, 96).to(torch.bfloat16) for n in (1, 7, 64, 130)]
    want = [torch.nn.functional.linear(x, layer.weight, layer.bias) for x in xs]
    assert prepack_model_(torch.nn.ModuleList([layer])) == 1
    for x, w in zip(xs, want):
        assert torch.equal(linear(x, layer, layer.bias), w)
    assert torch.equal(linear(xs[0][None], layer, layer.bias), want[0][None])  # leading dims kept


def test_greedy_argmax_matches_torch(isa):
    from flotilla.sampler import greedy
    torch.manual_seed(6)
    logits = torch.randn(33, 49152)
    logits[3, 100] = logits[3, 7] = 50.0  # a tie: the first index wins
    logits[5, 9] = float("nan")  # NaN counts as the maximum
    logits[6] = float("-inf")
    want = eager(lambda: greedy(logits))
    assert torch.equal(greedy(logits), want)
    assert torch.equal(want, logits.argmax(dim=-1))


def test_sample_rows_draws_from_the_tempered_distribution(kernels, isa):
    torch.manual_seed(7)
    v, draws = 200, 20000
    logits = torch.randn(v) * 2
    logits[::7] = float("-inf")  # never drawn
    temperature = 0.7
    x = logits.expand(draws, v).contiguous()  # one row per draw
    keys = torch.randint(0, 2 ** 62, (draws,))
    out = torch.empty(draws, dtype=torch.long)
    kernels.sample_rows(out, x, torch.full((draws,), 1 / temperature), keys)
    assert not torch.isinf(logits[out]).any()
    freq = torch.bincount(out, minlength=v).double() / draws
    want = torch.softmax(logits.double() / temperature, dim=0)
    assert (freq - want).abs().max() < 0.01  # several standard errors at 20000 draws
    again = torch.empty(draws, dtype=torch.long)
    kernels.sample_rows(again, x, torch.full((draws,), 1 / temperature), keys)
    assert torch.equal(again, out)  # a draw depends only on the key and the logits
    nudged = x.clone()
    nudged[:, 3] += 1e-6  # a rounding-level change in one logit flips almost no draw (the race, not a CDF)
    kernels.sample_rows(again, nudged, torch.full((draws,), 1 / temperature), keys)
    assert (again != out).sum() <= 2


# ---------------------------------------------------------------------------------------------- bounds checks
def _decode_inputs(lens, table_rows):
    kvh, heads, d, bs, num_blocks = 2, 4, 32, 4, 6
    cache = torch.randn(2, kvh, num_blocks, bs, d)
    q = torch.randn(len(lens), heads, d)
    out = torch.empty(len(lens), heads * d)
    return out, q, cache[0], cache[1], torch.tensor(table_rows), torch.tensor(lens), 32 ** -0.5


@pytest.mark.parametrize("lens,tables,message", [
    ([5, 3], [[0, 6], [1, 2]], r"block_tables\[0\]\[1\] = 6 is outside \[0, 6\)"),  # past the cache's blocks
    ([5, 3], [[0, 1], [-1, 2]], r"block_tables\[1\]\[0\] = -1 is outside \[0, 6\)"),
    ([0, 3], [[0, 1], [1, 2]], r"seq_lens\[0\] = 0 is outside \[1, 8\]"),
    ([5, 9], [[0, 1], [1, 2]], r"seq_lens\[1\] = 9 is outside \[1, 8\]"),  # more than its table holds
    ([5], [[0, 1], [1, 2]], r"one row per query"),
])
def test_decode_attention_checks_tables_and_lengths(kernels, lens, tables, message):
    with pytest.raises(RuntimeError, match=message):
        kernels.paged_decode_attention(*_decode_inputs(lens, tables))


def test_decode_attention_ignores_table_padding_past_the_sequence(kernels):
    out, q, k, v, tables, lens, scale = _decode_inputs([3, 4], [[2, -1], [5, 99]])  # 1 block each: tails unread
    kernels.paged_decode_attention(out, q, k, v, tables, lens, scale)
    want = _reference_decode(q, k, v, tables.clamp(0, 5), lens, scale)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 24])
def test_write_kv_cache_checks_slots_before_writing(kernels, bad):
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cache = torch.zeros(2, 2, 6, 4, 8)  # 24 slots per head
    with pytest.raises(RuntimeError, match=rf"slot_mapping\[2\] = {bad} is outside \[0, 24\)"):
        kernels.write_kv_cache(k, v, cache[0], cache[1], torch.tensor([0, 5, bad]))
    assert not cache.any()  # nothing written
    with pytest.raises(RuntimeError, match="one int64 per token"):
        kernels.write_kv_cache(k, v, cache[0], cache[1], torch.tensor([0, 5]))


@pytest.mark.parametrize("bad", [-1, 16])
def test_rotary_checks_positions(kernels, bad):
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    q0, k0 = q.clone(), k.clone()
    cos, sin = torch.randn(16, 8), torch.randn(16, 8)
    with pytest.raises(RuntimeError, match=rf"positions\[1\] = {bad} is outside \[0, 16\)"):
        kernels.rotary_embedding(torch.tensor([0, bad, 3]), q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    with pytest.raises(RuntimeError, match="cos/sin caches"):
        kernels.rotary_embedding(torch.tensor([0, 1, 3]), q, k, cos[:, :4].contiguous(), sin[:, :4].contiguous())


def test_norm_and_activation_check_shapes(kernels):
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="rms_norm: out"):
        kernels.rms_norm(torch.empty(4, 16), x, torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="fused_add_rms_norm: residual"):
        kernels.fused_add_rms_norm(x, torch.randn(4, 8), torch.randn(16), 1e-6)
    with pytest.raises(RuntimeError, match="silu_and_mul"):
        kernels.silu_and_mul(torch.empty(4, 16), x)
