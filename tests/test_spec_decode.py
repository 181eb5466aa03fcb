"""Speculative decoding (issue 18 item 2): n-gram prompt lookup and a draft model, verified so that the
target's distribution is kept exactly.

- The verification (``flotilla.spec_decode.rejection.verify``) is checked statistically on a small synthetic
  vocabulary: the first emitted token follows the target's p whether the draft is one-hot (n-gram) or sampled
  from a draft distribution q, and the token after an accepted draft follows the next row's p (chi-square,
  fixed seeds: deterministic).
- The scheduler schedules drafts as tokens, rolls back over rejected ones, caps drafts by max_tokens and stops
  at the first stop token inside an accepted run.
- End to end (tiny random models, fp32): greedy output with n-gram or draft-model speculation is token for
  token the output without it, with logprobs, stop strings, penalties, n > 1, chunked prefill, prefix caching
  and preemption; a model drafting for itself has every greedy draft accepted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from flotilla import LLM, SamplingParams
from flotilla.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from flotilla.errors import InvalidRequestError
from flotilla.request import Request
from flotilla.sampler import SamplingMetadata
from flotilla.scheduler.output import ModelRunnerOutput
from flotilla.scheduler.scheduler import Scheduler
from flotilla.spec_decode.ngram import propose_ngram
from flotilla.spec_decode.rejection import expand_rows, verify

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


# ---- proposer and verification (no model) -------------------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_longest_match():
    assert propose_ngram([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3], 2, 1, 3) == [5, 6]  # latest match of [1,2,3]
    assert propose_ngram([7, 8, 9, 7, 8], 5, 1, 3) == [9, 7, 8]  # runs up to the end of the sequence
    assert propose_ngram([1, 2, 3, 4], 3, 1, 3) == []  # no earlier occurrence
    assert propose_ngram([4, 1, 2, 5, 2], 1, 2, 3) == []  # only a 1-gram matches, min is 2


def _verify_many(target_logits: torch.Tensor, drafts: list[list[int]], q: list[torch.Tensor | None],
                 temperature: float = 1.0) -> list[list[int]]:
    """Verify the same target rows (k + 1, V) for each of len(drafts) requests; returns the emitted tokens."""
    n = len(drafts)
    params = [SamplingParams(temperature=temperature)] * n
    row_params, prompts, outputs = expand_rows(params, [[0]] * n, [[]] * n, drafts)
    md = SamplingMetadata.build(row_params, [None] * len(row_params), prompts, outputs, "cpu")
    logits = torch.cat([target_logits[:len(d) + 1] for d in drafts])
    return verify(logits, md, params, drafts, q, [None] * n).token_ids


def _assert_follows(tokens: list[int], probs: torch.Tensor) -> None:
    counts = np.bincount(tokens, minlength=probs.shape[0])
    expected = probs.double().numpy() / float(probs.double().sum()) * len(tokens)
    assert chisquare(counts, expected).pvalue > 1e-3, (counts, expected)


TARGET = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0], [0.1, 1.2, 0.3, -1.0, 0.5], [0.0, 0.0, 0.9, 0.4, -0.3]])


def test_one_hot_drafts_keep_the_target_distribution():
    torch.manual_seed(1234)
    emitted = _verify_many(TARGET, [[0, 1]] * 6000, [None] * 6000)
    p = torch.softmax(TARGET, dim=-1)
    _assert_follows([e[0] for e in emitted], p[0])
    _assert_follows([e[1] for e in emitted if e[0] == 0], p[1])  # after an accepted draft: the next row's p
    accepted = sum(e[0] == 0 for e in emitted) / len(emitted)
    assert abs(accepted - float(p[0, 0])) < 0.03  # acceptance probability p(d)


def test_sampled_drafts_keep_the_target_distribution():
    gen = torch.Generator().manual_seed(99)
    q = torch.softmax(torch.tensor([[0.5, -0.3, 1.5, 0.0, 0.2], [1.0, 0.0, 0.0, 0.0, 0.0]]), dim=-1)
    drafts = [torch.multinomial(q, 1, generator=gen)[:, 0].tolist() for _ in range(6000)]  # d_j ~ q_j
    torch.manual_seed(4321)
    emitted = _verify_many(TARGET, drafts, [q] * len(drafts))
    p = torch.softmax(TARGET, dim=-1)
    _assert_follows([e[0] for e in emitted], p[0])


def test_greedy_verification_takes_the_argmax():
    assert _verify_many(TARGET, [[0, 1], [0, 4], [3, 1]], [None] * 3, temperature=0.0) == [[0, 1, 2], [0, 1], [0]]


# ---- scheduler ----------------------------------------------------------------------------------------
def _scheduler(k: int = 3) -> Scheduler:
    return Scheduler(SchedulerConfig(max_model_len=64), CacheConfig(block_size=4), 32,
                     SpeculativeConfig("ngram", k))


def test_scheduler_verifies_drafts_rolls_back_and_never_overshoots_max_tokens():
    sched = _scheduler()
    req = Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=6, ignore_eos=True))
    sched.add_request(req)
    so = sched.schedule()
    sched.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"a": 6}, draft_token_ids={"a": [7, 8, 9]}))
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"a": 4} and so.scheduled_spec_decode_tokens == {"a": [7, 8, 9]}
    assert req.num_computed_tokens == 9
    out = sched.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"a": 10}, accepted_draft_token_ids={
        "a": [7]}, draft_token_ids={"a": [11, 12, 13]}))
    assert out[0].new_token_ids == [7, 10] and req.num_computed_tokens == req.num_tokens - 1 == 7
    assert req.spec_token_ids == [11, 12]  # 3 outputs of max 6: at most 2 drafts + the sampled token
    so = sched.schedule()
    assert so.num_scheduled_tokens == {"a": 3}
    out = sched.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"a": 14}, accepted_draft_token_ids={
        "a": [11, 12]}))
    assert out[0].new_token_ids == [11, 12, 14] and out[0].finish_reason == "length"
    assert req.output_token_ids == [6, 7, 10, 11, 12, 14]
    stats = sched.make_stats()
    assert (stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens) == (2, 5, 3)
    assert stats.spec_accepted_per_pos == (2, 1, 0)
    assert sched.kv_cache_manager.num_free_blocks == 32


def test_scheduler_stops_at_a_stop_token_inside_accepted_drafts():
    sched = _scheduler()
    req = Request("b", [1, 2, 3], SamplingParams(max_tokens=20, eos_token_ids=(2,)))
    sched.add_request(req)
    so = sched.schedule()
    sched.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"b": 5}, draft_token_ids={"b": [6, 2, 7]}))
    so = sched.schedule()
    out = sched.update_from_output(so, ModelRunnerOutput(sampled_token_ids={"b": 8}, accepted_draft_token_ids={
        "b": [6, 2, 7]}))
    assert out[0].new_token_ids == [6, 2] and out[0].finish_reason == "stop"
    assert req.output_token_ids == [5, 6, 2] and not sched.has_unfinished_requests()


def test_bad_speculative_configs_are_refused_naming_the_field(tiny_llama):
    from flotilla.engine.arg_utils import EngineArgs
    for config, words in (({"method": "eagle", "num_speculative_tokens": 2}, "method"),
                          ({"method": "ngram"}, "num_speculative_tokens is required"),
                          ({**NGRAM, "draft_tensor_parallel_size": 1}, "unsupported key"),
                          ({**NGRAM, "num_speculative_tokens": 0}, "1 to 16"),
                          ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a 'model'"),
                          ({"method": "draft_model", "model": tiny_llama[0], "num_speculative_tokens": 2,
                            "quantization": "int3"}, "quantization must be one of"),
                          ({"method": "draft_model", "model": tiny_llama[0], "num_speculative_tokens": 2,
                            "quantization": "gguf"}, "not a GGUF file")):
        with pytest.raises(InvalidRequestError, match=words) as e:
            EngineArgs(model=tiny_llama[0], speculative_config=config).create_engine_config()
        assert e.value.param == "speculative_config"
    with pytest.raises(InvalidRequestError, match="one rank"):
        EngineArgs(model=tiny_llama[0], speculative_config=NGRAM, tensor_parallel_size=2).create_engine_config()


# ---- end to end ---------------------------------------------------------------------------------------
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], list(range(100, 140)) + list(range(100, 120)),
           [42, 43, 44, 42, 43], [5, 6, 7, 8, 9, 5, 6]]


def _params() -> list[SamplingParams]:
    """Greedy requests that exercise logprobs, penalties, min_tokens, stop strings and n > 1."""
    return [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
            SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, repetition_penalty=1.3, n=2),
            SamplingParams(temperature=0, max_tokens=30, min_tokens=5, stop=["ing", " the"]),
            # A random model copies nothing; five allowed tokens make its output cycle, so lookup finds drafts.
            SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, allowed_token_ids=[5, 6, 7, 8, 9])]


def _run(llm: LLM, prompts=PROMPTS, params=None) -> list[list[tuple]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params or _params(), use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason,
              [sorted(lp.items()) for lp in c.logprobs] if c.logprobs else None) for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_llama_engine):
    return _run(tiny_llama_engine)


def _close_logprobs(a, b) -> None:
    """Same tokens and texts; logprobs equal up to float32 rounding (a 1 + k token forward vs 1 token)."""
    for ra, rb in zip(a, b):
        for (ta, xa, fa, la), (tb, xb, fb, lb) in zip(ra, rb):
            assert (ta, xa, fa) == (tb, xb, fb)
            assert (la is None) == (lb is None)
            for pa, pb in zip(la or [], lb or []):
                assert [t for t, _ in pa] == [t for t, _ in pb]
                assert np.allclose([v.logprob for _, v in pa], [v.logprob for _, v in pb], atol=1e-4)


def _spec_stats(llm: LLM):
    return llm.engine.scheduler.make_stats()


def test_ngram_greedy_output_is_the_output_without_speculation(tiny_llama, reference):
    llm = LLM(model=tiny_llama[0], max_model_len=256, num_kv_blocks=256, speculative_config=NGRAM)
    try:
        _close_logprobs(_run(llm), reference)
        stats = _spec_stats(llm)
        assert stats.spec_num_accepted_tokens > 0 and stats.spec_num_drafts > 0
    finally:
        llm.engine.shutdown()


def test_draft_model_greedy_output_is_the_output_without_speculation(tiny_llama, tiny_qwen2, reference):
    llm = LLM(model=tiny_llama[0], max_model_len=256, num_kv_blocks=256, speculative_config={
        "method": "draft_model", "model": tiny_qwen2[0], "num_speculative_tokens": 3})
    try:
        _close_logprobs(_run(llm), reference)
        assert _spec_stats(llm).spec_num_draft_tokens > 0
    finally:
        llm.engine.shutdown()


def test_self_drafting_accepts_every_greedy_draft_under_preemption_and_chunked_prefill(tiny_llama,
                                                                                      tiny_llama_engine):
    """The target drafting for itself: every greedy draft must be accepted (the draft's KV bookkeeping over the
    shared block tables is exact), also when a small cache preempts and small steps chunk the prompts; the
    repeated prompts hit the prefix cache. (No penalties here: the draft proposes the raw argmax.)"""
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, n=2),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["ing", " the"])]
    expected = _run(tiny_llama_engine, PROMPTS[:3], params)
    llm = LLM(model=tiny_llama[0], max_model_len=128, num_kv_blocks=14, block_size=16, max_num_batched_tokens=32,
              speculative_config={"method": "draft_model", "model": tiny_llama[0], "num_speculative_tokens": 4})
    try:
        got = _run(llm, PROMPTS[:3] * 2, params * 2)
        _close_logprobs(got[:3], expected)
        _close_logprobs(got[3:], expected)
        stats = _spec_stats(llm)
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 0
    finally:
        llm.engine.shutdown()


def test_draft_catch_up_skips_the_accepted_guesses(tiny_llama, tiny_llama_engine):
    """Self-drafting accepts every guess, and the draft's KV of its k - 1 fed guesses is kept: after the prompt,
    each catch-up forward computes 2 tokens (the last guess and the sampled token), not k + 1."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    llm = LLM(model=tiny_llama[0], max_model_len=128, num_kv_blocks=32,
              speculative_config={"method": "draft_model", "model": tiny_llama[0], "num_speculative_tokens": 4})
    try:
        proposer = llm.engine.executor.worker.runner.proposer
        lengths, forward = [], proposer._forward
        proposer._forward = lambda chunks: (lengths.append([len(t) for _, _, t in chunks]), forward(chunks))[1]
        got = llm.generate([PROMPTS[0]], params)[0].outputs[0].token_ids
        assert got == tiny_llama_engine.generate([PROMPTS[0]], params)[0].outputs[0].token_ids
        catch_ups = [n[0] for n in lengths if n[0] != 1]  # the guesses' single-token forwards left out
        assert catch_ups[0] > 2 and catch_ups[1:] and all(n == 2 for n in catch_ups[1:]), lengths
    finally:
        llm.engine.shutdown()


def test_sampled_tokens_verified_against_a_draft_model_follow_the_target(tiny_llama, tiny_qwen2):
    """End to end, temperature 1: the tiny Qwen2 drafts for the tiny Llama (different distributions, so drafts
    are both accepted and rejected); the token that verification emits after the first one must follow the
    target's p(. | prompt, t1), computed by transformers. Test of the probability integral transform: each
    token falls in the octile of p's cumulative mass (tokens by decreasing p) where it starts, and the counts
    per octile are compared with their exact probabilities (chi-square; seeded requests: deterministic)."""
    path, hf = tiny_llama
    llm = LLM(model=path, max_model_len=128, num_kv_blocks=512, speculative_config={
        "method": "draft_model", "model": tiny_qwen2[0], "num_speculative_tokens": 2})
    try:
        n, prompt = 400, PROMPTS[2]
        outs = llm.generate([{"prompt_token_ids": prompt}] * n, [SamplingParams(
            temperature=1.0, seed=s, max_tokens=3, ignore_eos=True) for s in range(n)], use_tqdm=False)
        stats = _spec_stats(llm)
    finally:
        llm.engine.shutdown()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    pairs = [o.outputs[0].token_ids[:2] for o in outs]
    firsts = sorted({t1 for t1, _ in pairs})
    with torch.no_grad():
        probs = torch.softmax(hf(torch.tensor([prompt + [t1] for t1 in firsts])).logits[:, -1].double(), -1)
    order = probs.argsort(dim=-1, descending=True)  # (F, V)
    sorted_p = probs.gather(1, order)
    start = torch.cumsum(sorted_p, -1) - sorted_p  # (F, V): mass before each token, by decreasing p
    octile = torch.empty_like(order)
    octile.scatter_(1, order, (start * 8).long().clamp_(max=7))  # (F, V): each token's octile
    row = {t1: i for i, t1 in enumerate(firsts)}
    observed = np.zeros(8)
    expected = np.zeros(8)
    for t1, t2 in pairs:
        r = row[t1]
        observed[int(octile[r, t2])] += 1
        expected += torch.zeros(8, dtype=torch.float64).index_add_(0, octile[r], probs[r]).numpy()
    expected *= observed.sum() / expected.sum()
    assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_seeded_sampling_with_speculation_is_reproducible(tiny_llama):
    llm = LLM(model=tiny_llama[0], max_model_len=256, num_kv_blocks=64, speculative_config=NGRAM)
    try:
        params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True)
        first = llm.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False)[0].outputs[0].token_ids
        again = llm.generate([{"prompt_token_ids": PROMPTS[1]}, {"prompt_token_ids": PROMPTS[0]}],
                             [params.clone(seed=3), params], use_tqdm=False)[1].outputs[0].token_ids
        assert first == again and len(first) == 20
    finally:
        llm.engine.shutdown()


def test_smollm2_code_edit_greedy_output_is_the_output_without_speculation():
    """The embedded model on a code-editing prompt (its answer repeats much of the prompt): prompt lookup, and
    the model drafting for itself with its weights requantized to int4 (the draft's "quantization"), accept
    drafts, and the tokens are those of decoding without speculation."""
    conversation = [{"role": "user", "content": "Rename `total` to `acc` and return the whole function.\n\n"
                     "def sum_positive(values):\n    total = 0\n    for value in values:\n        if value > 0:\n"
                     "            total += value\n    return total\n"}]
    params = SamplingParams(temperature=0, max_tokens=48)
    outputs, accepted = [], []
    int4_draft = {"method": "draft_model", "model": "smollm2-135m-instruct", "num_speculative_tokens": 3,
                  "quantization": "int4"}
    for spec in (None, {**NGRAM, "num_speculative_tokens": 4}, int4_draft):
        llm = LLM(dtype="float32", max_model_len=512, num_kv_blocks=64, speculative_config=spec)
        try:
            if spec is int4_draft:
                draft = llm.engine.executor.worker.runner.proposer.model
                head = draft.lm_head.quant_weight
                assert head.describe() == "Q4_1" and head.dense is not None  # int4, float copy for long steps
            outputs.append(llm.chat(conversation, params)[0].outputs[0].token_ids)
            accepted.append(_spec_stats(llm).spec_num_accepted_tokens)
        finally:
            llm.engine.shutdown()
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) > 10
    assert accepted[1] > 0 and accepted[2] > 0
