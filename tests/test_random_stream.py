"""One random stream: the fused ``sample_rows`` kernel and the PyTorch ``race_sample`` give the same tokens,
bit for bit, for the same logits and keys; so a seed gives the same tokens with and without the kernels, from
the sampler up to the engine."""

from __future__ import annotations

import pytest
import torch

from flotilla import LLM, ops
from flotilla.sampler import Sampler, SamplingMetadata, hash_uniform, race_sample
from flotilla.sampling_params import SamplingParams

sampler = Sampler()


# ---------------------------------------------------------------------------------------------- the random stream
def _splitmix_uniform(key: int, i: int) -> float:
    """The stream's uniform, straight from its definition in Python integers (the module docstring)."""
    mask = (1 << 64) - 1
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return ((z >> 41) + 0.5) * 2.0 ** -23


def test_hash_uniform_follows_its_definition():
    keys = torch.tensor([0, 1, 2 ** 62 - 1, 123456789123456789, -1])  # -1: the key's bits as uint64
    u = hash_uniform(keys, 300)  # (5, 300)
    for r, key in enumerate(keys.tolist()):
        for i in (0, 1, 7, 150, 299):
            assert u[r, i].item() == _splitmix_uniform(key % 2 ** 64, i)
    assert bool((u > 0).all() and (u < 1).all())


def _kernels():
    with ops.switch_kernels(True):
        k = ops.cpu_kernels()
        if k is None:
            pytest.skip(f"needs the CPU kernels: {ops.unavailable_reason()}")
    return k


def _random_rows(gen: torch.Generator, b: int, v: int) -> torch.Tensor:
    """(b, v) float32 logits as the sampler hands them to the race: tempered, with -inf masks of every density,
    rows of one candidate, ties, and degenerate rows (all -inf, a NaN, a +inf)."""
    scale = torch.rand(b, 1, generator=gen) * 8 + 0.05  # temperatures from ~0.1 to 20
    x = torch.randn(b, v, generator=gen) * scale
    keep = torch.rand(b, v, generator=gen) < torch.rand(b, 1, generator=gen)  # mask densities 0..1 per row
    keep[:, 0] = True
    x = torch.where(keep, x, float("-inf"))
    x[1] = float("-inf")
    x[1, v // 2] = 0.3  # one candidate
    x[2, :] = 1.0  # all tied
    x[3] = float("-inf")  # degenerate: all masked
    x[4, 5] = float("nan")
    x[5, 9] = float("inf")
    x[6] = x[6].round()  # many near-ties
    return x


@pytest.mark.parametrize("b,v", [(300, 257), (24, 49152), (3, 1)])
def test_race_sample_equals_the_kernel_bit_for_bit(b, v):
    k = _kernels()
    gen = torch.Generator().manual_seed(b * v)
    x = _random_rows(gen, b, v) if v > 10 else torch.randn(b, v, generator=gen)
    keys = torch.randint(-2 ** 63, 2 ** 63 - 1, (b,), generator=gen)
    got = torch.empty(b, dtype=torch.long)
    k.sample_rows(got, x, torch.ones(b), keys)
    want = race_sample(x, keys)
    assert torch.equal(got, want), (got != want).nonzero().flatten().tolist()
    if v > 10:
        assert got[3] == 0 and got[4] == 5 and got[5] == 9 and got[1] == v // 2  # degenerate rows: argmax
        finite = torch.isfinite(x[7:].gather(1, got[7:, None]))
        assert bool(finite.all())  # never a masked token


def test_sampler_gives_the_same_tokens_with_and_without_kernels():
    """Seeded and unseeded rows, temperatures, top-k/top-p/min-p and penalties: one stream on both paths."""
    _kernels()
    gen = torch.Generator().manual_seed(11)
    params = [SamplingParams(temperature=1.0, seed=1234), SamplingParams(temperature=0.7),
              SamplingParams(temperature=1.3, top_k=50, seed=5), SamplingParams(top_p=0.9, min_p=0.05),
              SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, repetition_penalty=1.2, seed=9),
              SamplingParams(temperature=0.5, top_k=3, top_p=0.5)] * 3
    outputs = [[int(t) for t in torch.randint(0, 4096, (i % 5,), generator=gen)] for i in range(len(params))]
    logits = torch.randn(len(params), 4096, generator=gen) * 4

    def run(enabled: bool) -> list[list[int]]:
        tokens = []
        with ops.switch_kernels(enabled):
            gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
            torch.manual_seed(77)  # the unseeded rows' batched key draw
            for _ in range(6):
                md = SamplingMetadata.build(params, gens, [[1, 2, 3]] * len(params), outputs, "cpu")
                tokens.append(sampler(logits, md).sampled_token_ids.tolist())
        return tokens

    with_kernels, without = run(True), run(False)
    assert with_kernels == without
    assert len({tuple(step) for step in with_kernels}) > 1  # it really sampled


def test_seeded_requests_give_the_same_tokens_with_and_without_kernels(tiny_llama):
    """Engine level (float32 tiny model, whose logits the kernels reproduce): seeded requests at temperature 1,
    alone and batched, give the same tokens on both paths."""
    _kernels()
    path, _ = tiny_llama
    prompts = ["Hello, my name is", "The capital of France is", "Once upon a time", "a b c d e f g"]
    params = [SamplingParams(temperature=1.0, seed=1234 + i, max_tokens=16, ignore_eos=True) for i in range(4)]
    params[3] = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=7, max_tokens=16, ignore_eos=True)
    llm = LLM(model=path, dtype="float32", max_model_len=128, num_kv_blocks=64)

    def run(enabled: bool) -> list[list[int]]:
        with ops.switch_kernels(enabled):
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    with_kernels = run(True)
    assert run(False) == with_kernels
    assert len({t for tokens in with_kernels for t in tokens}) > 16  # it really sampled
