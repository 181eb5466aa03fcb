"""Sampler tests: greedy, seeded reproducibility, filters, temperature, penalties, min_tokens, logprobs.

Marked ``both_kernel_paths``: every test runs with the fused CPU kernels on and off (tests/conftest.py), so the
PyTorch race (``race_sample``) meets the same distribution checks as the kernel.
"""

from __future__ import annotations

import pytest
import torch

from flotilla.sampler import Sampler, SamplingMetadata, apply_penalties, apply_top_k_top_p
from flotilla.sampling_params import SamplingParams

pytestmark = pytest.mark.both_kernel_paths

sampler = Sampler()


def _md(params, generators=None, prompts=None, outputs=None, vocab_size=None):
    n = len(params)
    return SamplingMetadata.build(params, generators or [None] * n, prompts or [[] for _ in range(n)],
                                  outputs or [[] for _ in range(n)], "cpu", vocab_size=vocab_size)


def _sample_many(row_logits: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    """``draws`` independent samples of one logits row, as one batch. Returns (draws,)."""
    logits = row_logits.unsqueeze(0).expand(draws, -1).contiguous()  # (draws, V)
    return sampler(logits, _md([params] * draws)).sampled_token_ids


def _logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()  # (V,)


def test_greedy_equals_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)  # (B, V)
    out = sampler(logits, _md([SamplingParams(temperature=0.0)] * 8))
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None
    bf16 = logits.to(torch.bfloat16)
    assert torch.equal(sampler(bf16, _md([SamplingParams(temperature=0.0)] * 8)).sampled_token_ids,
                       bf16.argmax(dim=-1))


def test_greedy_rows_in_mixed_batch_and_inputs_untouched():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    before = logits.clone()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=3)] * 3
    md = _md(params)
    assert not md.all_greedy and not md.all_random
    out = sampler(logits, md).sampled_token_ids
    assert torch.equal(out[0::2], logits[0::2].argmax(dim=-1))
    assert torch.equal(logits, before)


def _run_seeded(row: torch.Tensor, position: int, neighbours: list[SamplingParams], steps: int,
                seed: int = 1234) -> list[int]:
    """Sample ``steps`` tokens for a seeded request at ``position`` among ``neighbours``."""
    gen = torch.Generator().manual_seed(seed)
    params = list(neighbours)
    params.insert(position, SamplingParams(temperature=0.9, top_p=0.95, seed=seed))
    gens: list[torch.Generator | None] = [
        torch.Generator().manual_seed(99) if p.seed is not None else None for p in neighbours]
    gens.insert(position, gen)
    tokens = []
    noise = torch.Generator().manual_seed(position + len(neighbours))
    for _ in range(steps):
        logits = torch.randn(len(params), row.shape[0], generator=noise)  # (B, V) different neighbours
        logits[position] = row
        tokens.append(int(sampler(logits, _md(params, gens)).sampled_token_ids[position]))
    return tokens


def test_seeded_rows_reproducible_across_batches():
    torch.manual_seed(2)
    row = torch.randn(64)
    alone = _run_seeded(row, 0, [], steps=40)
    crowds = [
        (2, [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_k=5, min_p=0.1)]),
        (1, [SamplingParams(seed=7, temperature=2.0), SamplingParams(repetition_penalty=1.3)]),
        (4, [SamplingParams(temperature=0.5)] * 6),
    ]
    for position, neighbours in crowds:
        assert _run_seeded(row, position, neighbours, steps=40) == alone
    assert len(set(alone)) > 3  # it really sampled
    assert _run_seeded(row, 0, [], steps=40, seed=4321) != alone


def test_top_k_never_outside_set_and_matches_distribution():
    torch.manual_seed(3)
    row = torch.randn(64) * 2
    k = 5
    allowed = set(row.topk(k).indices.tolist())
    draws = _sample_many(row, SamplingParams(top_k=k), 4000)
    assert set(draws.tolist()) == allowed
    expected = torch.softmax(row, -1)[list(allowed)]
    expected = expected / expected.sum()
    freq = torch.stack([(draws == t).float().mean() for t in allowed])
    assert torch.allclose(freq, expected, atol=0.03)


def test_top_p_never_outside_set():
    row = _logits_from_probs([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    # cumulative mass of the sorted probs: 0.4, 0.65, 0.8 -> top_p=0.7 keeps tokens 1, 3, 4
    draws = _sample_many(row, SamplingParams(top_p=0.7), 3000)
    assert set(draws.tolist()) == {1, 3, 4}
    draws = _sample_many(row, SamplingParams(top_p=0.3), 500)
    assert set(draws.tolist()) == {1}
    draws = _sample_many(row, SamplingParams(top_p=0.7, top_k=2), 2000)
    assert set(draws.tolist()) == {1, 3}


def test_min_p_never_outside_set():
    row = _logits_from_probs([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    # threshold = 0.3 * 0.4 = 0.12 keeps 0.4, 0.25, 0.15
    draws = _sample_many(row, SamplingParams(min_p=0.3), 3000)
    assert set(draws.tolist()) == {1, 3, 4}


def test_top_k_top_p_masks_with_random_rows():
    torch.manual_seed(4)
    logits = torch.randn(5, 40)  # (B, V)
    top_k = torch.tensor([1, 3, 0, 40, 100])
    top_p = torch.tensor([1.0, 0.5, 0.9, 1.0, 0.2])
    masked = apply_top_k_top_p(logits.clone(), top_k, top_p)  # (B, V)
    for i in range(5):
        kept = torch.isfinite(masked[i])
        k = int(top_k[i]) if 0 < top_k[i] <= 40 else 40
        order = logits[i].argsort(descending=True)
        assert kept[order[:k]].sum() == kept.sum()  # only top-k survive
        probs = torch.softmax(logits[i][order[:k]], -1)
        need = int((probs.cumsum(0) < top_p[i] - 1e-6).sum()) + 1  # smallest prefix reaching p
        assert int(kept.sum()) == min(need, k)
        assert torch.equal(masked[i][kept], logits[i][kept])


def test_temperature_extremes():
    torch.manual_seed(5)
    row = torch.arange(10, dtype=torch.float32)  # gaps of 1 between logits
    cold = _sample_many(row, SamplingParams(temperature=1e-3), 500)
    assert set(cold.tolist()) == {9}
    hot = _sample_many(row, SamplingParams(temperature=1e4), 5000)
    freq = torch.bincount(hot, minlength=10).float() / 5000
    assert torch.allclose(freq, torch.full((10,), 0.1), atol=0.03)


def _reference_penalties(logits, prompts, outputs, params):
    out = logits.clone()
    for i, p in enumerate(params):
        seen = set(prompts[i]) | set(outputs[i])
        for t in range(out.shape[1]):
            x = out[i, t].item()
            if t in seen:
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            count = outputs[i].count(t)
            x -= p.frequency_penalty * count
            x -= p.presence_penalty * (1.0 if count > 0 else 0.0)
            out[i, t] = x
    return out


def test_penalties_match_reference():
    torch.manual_seed(6)
    logits = torch.randn(4, 12) * 3  # (B, V)
    prompts = [[1, 2, 2, 3], [0, 11], [5], [4, 4, 7]]
    outputs = [[3, 3, 9], [], [5, 5, 5, 6], [7, 8]]
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.3),
              SamplingParams(repetition_penalty=0.7, presence_penalty=-1.0),
              SamplingParams(frequency_penalty=-0.4, temperature=0.0),
              SamplingParams()]
    md = _md(params, prompts=prompts, outputs=outputs)
    processed = logits.clone()
    apply_penalties(processed, md)
    expected = _reference_penalties(logits, prompts, outputs, params)
    assert torch.allclose(processed, expected, atol=1e-6)
    greedy = [p.clone(temperature=0.0) for p in params]
    out = sampler(logits, _md(greedy, prompts=prompts, outputs=outputs, vocab_size=12)).sampled_token_ids
    assert torch.equal(out, expected.argmax(-1))


def test_penalty_only_frequency_without_prompt_tensor():
    md = _md([SamplingParams(frequency_penalty=1.0)], prompts=[[0, 1]], outputs=[[2, 2, 99]])
    assert md.prompt_token_ids is None and md.repetition_penalties is None
    logits = torch.zeros(1, 4)
    apply_penalties(logits, md)  # id 99 is outside the vocabulary: ignored
    assert logits.tolist() == [[0.0, 0.0, -2.0, 0.0]]


def test_min_tokens_suppresses_eos_and_stop_ids():
    logits = torch.zeros(4, 10)
    logits[:, 3] = 10.0  # EOS
    logits[:, 5] = 9.0  # stop token id
    logits[:, 7] = 8.0
    base = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5], eos_token_ids=(3,))
    params = [base, base, base.clone(ignore_eos=True), base.clone(temperature=1.0, top_k=1)]
    outputs = [[1], [1, 2], [1], []]
    out = sampler(logits, _md(params, outputs=outputs)).sampled_token_ids.tolist()
    assert out == [7, 3, 3, 7]


def test_a_complete_grammar_ends_the_row_despite_min_tokens():
    """min_tokens forbids EOS, but the grammar of row 0 allows only EOS (its document is complete): the grammar
    wins and the row ends; row 1's grammar allows more, so min_tokens still applies there."""
    logits = torch.zeros(2, 40)
    logits[:, 3] = 10.0  # EOS
    params = [SamplingParams(temperature=0.0, min_tokens=5, eos_token_ids=(3,))] * 2
    md = _md(params, outputs=[[1], [1]])
    md.grammar_rows = torch.tensor([0, 1])
    md.grammar_bitmask = torch.zeros(2, 2, dtype=torch.int32)  # (C, ceil(40 / 32))
    md.grammar_bitmask[0, 0] = 1 << 3  # row 0: only EOS
    md.grammar_bitmask[1, 0] = (1 << 3) | (1 << 7)  # row 1: EOS or token 7
    assert sampler(logits, md).sampled_token_ids.tolist() == [3, 7]


def test_logprobs_raw_distribution_sorted_with_ranks():
    torch.manual_seed(7)
    logits = torch.randn(4, 30) * 2  # (B, V)
    params = [SamplingParams(logprobs=0, temperature=0.0), SamplingParams(logprobs=3, top_k=4),
              SamplingParams(), SamplingParams(logprobs=5, repetition_penalty=2.0, temperature=0.3)]
    out = sampler(logits, _md(params, prompts=[[0, 1]] * 4, outputs=[[2]] * 4))
    lp = out.logprobs
    assert lp.token_ids.shape == lp.logprobs.shape == lp.ranks.shape == (4, 6)
    raw = torch.log_softmax(logits, -1)
    sampled = out.sampled_token_ids
    assert torch.equal(lp.token_ids[:, 0], sampled)
    assert torch.allclose(lp.logprobs[:, 0], raw.gather(1, sampled[:, None])[:, 0])
    expected_rank = (raw > raw.gather(1, sampled[:, None])).sum(-1) + 1
    assert torch.equal(lp.ranks[:, 0], expected_rank)
    assert lp.ranks[0, 0] == 1  # greedy row samples the most likely token
    top_lp, top_ids = raw.topk(5, dim=-1)
    assert torch.equal(lp.token_ids[:, 1:], top_ids)
    assert torch.allclose(lp.logprobs[:, 1:], top_lp)
    assert torch.all(lp.logprobs[:, 1:-1] >= lp.logprobs[:, 2:])
    assert lp.ranks[:, 1:].tolist() == [[1, 2, 3, 4, 5]] * 4


def test_many_random_draws_differ():
    row = torch.zeros(1000)
    torch.manual_seed(8)
    params = [SamplingParams()] * 8
    sequences = torch.stack([sampler(row.expand(8, -1).contiguous(), _md(params)).sampled_token_ids
                             for _ in range(5)], dim=1)  # (8, steps)
    assert len({tuple(s) for s in sequences.tolist()}) == 8


def test_empty_batch_and_metadata_flags():
    md = _md([])
    assert md.all_greedy and md.max_num_logprobs is None and md.no_penalties
    assert sampler(torch.zeros(0, 5), md).sampled_token_ids.shape == (0,)
    md = _md([SamplingParams(), SamplingParams(temperature=0.0, top_k=3)])
    assert md.top_k is None  # greedy rows never turn filters on
    md = _md([SamplingParams(seed=1), SamplingParams()], generators=[torch.Generator(), None])
    assert set(md.generators) == {0} and md.num_unseeded_random == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(dtype):
    torch.manual_seed(9)
    logits = torch.randn(3, 20).to(dtype)
    params = [SamplingParams(logprobs=2), SamplingParams(top_p=0.5), SamplingParams(min_p=0.2)]
    out = sampler(logits, _md(params))
    assert out.sampled_token_ids.dtype == torch.long
    assert out.logprobs.logprobs.dtype == torch.float32


# ---- logit_bias, allowed_token_ids, bad_words (issue 13 item 6) ------------------------------------------------
def test_logit_bias_forces_and_removes_tokens_and_leaves_other_rows_alone():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)  # (B, V)
    top = logits.argmax(dim=-1)  # (B,)
    params = [SamplingParams(temperature=0.0, logit_bias={7: 100.0}),  # +100 forces token 7
              SamplingParams(temperature=0.0, logit_bias={int(top[1]): -100.0}),  # the greedy token is gone
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.8, seed=3, logit_bias={11: 100, 12: 100.0, 13: -5.5})]
    before = logits.clone()
    out = sampler(logits, _md(params)).sampled_token_ids
    assert torch.equal(logits, before), "the input logits are not modified"
    assert out[0] == 7
    second = before[1].clone()
    second[top[1]] -= 100.0
    assert out[1] == second.argmax() != top[1]
    assert out[2] == top[2]
    assert int(out[3]) in (11, 12)  # +100 on two tokens: one of them, with overwhelming probability
    for _ in range(30):  # a random row also only ever draws the boosted tokens
        assert int(sampler(before, _md(params)).sampled_token_ids[3]) in (11, 12)


def test_logit_bias_is_added_before_temperature_and_logprobs_stay_raw():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # (1, V)
    params = SamplingParams(temperature=0.0, logprobs=1, logit_bias={0: 4.0})
    md = _md([params])
    out = sampler(logits, md)
    assert out.sampled_token_ids.tolist() == [0]  # 0 + 4 > 3
    raw = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs.logprobs[0, 0], raw[0, 0])  # the raw model distribution
    assert out.logprobs.token_ids[0, 1] == 3


def test_allowed_token_ids_restrict_sampling():
    torch.manual_seed(2)
    logits = torch.randn(3, 40)  # (B, V)
    allowed = [5, 9, 33]
    params = [SamplingParams(temperature=0.0, allowed_token_ids=allowed),
              SamplingParams(temperature=1.0, allowed_token_ids=[2]),
              SamplingParams(temperature=1.0, seed=5)]  # unrestricted: shares the batch
    for _ in range(20):
        out = sampler(logits, _md(params)).sampled_token_ids
        assert int(out[0]) == allowed[int(logits[0, allowed].argmax())]
        assert int(out[1]) == 2
    greedy_free = sampler(logits[:2], _md([params[0], SamplingParams(temperature=0.0)])).sampled_token_ids
    assert int(greedy_free[1]) == int(logits[1].argmax())


def test_bad_words_ban_the_last_token_after_their_prefix():
    logits = torch.zeros(3, 10)  # (B, V)
    logits[:, 4] = 5.0  # token 4 is the greedy pick everywhere
    logits[:, 6] = 4.0  # then 6
    one_token = SamplingParams(temperature=0.0, bad_words_token_ids=[[4]])
    two_tokens = SamplingParams(temperature=0.0, bad_words_token_ids=[[8, 4], [1, 2, 6]])
    md = _md([one_token, two_tokens, two_tokens], outputs=[[], [3, 8], [3, 9]])
    assert sampler(logits, md).sampled_token_ids.tolist() == [6, 6, 4]  # banned / banned / prefix not matched
    md = _md([two_tokens], outputs=[[1, 2]])  # [1, 2, 6]: 6 is banned after 1, 2; 4 is not
    assert sampler(logits[:1], md).sampled_token_ids.tolist() == [4]
    logits[0, 4] = 0.0
    assert sampler(logits[:1], md).sampled_token_ids.tolist() != [6]


def test_no_extras_keeps_the_read_only_fast_path():
    md = _md([SamplingParams(temperature=0.0)] * 2)
    assert md.no_token_extras and md.logit_bias_rows is None and md.allowed_rows is None
    md = _md([SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logit_bias={1: 1.0})])
    assert not md.no_token_extras
    assert md.logit_bias_rows.tolist() == [1] and md.logit_bias_ids.tolist() == [1]
