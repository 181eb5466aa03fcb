"""Prompt logprobs (vLLM's ``SamplingParams.prompt_logprobs``) and ``max_tokens=0`` in the offline engine.

The oracle is transformers on the same fp32 tiny random Llama: every prompt token's logprob is
``log_softmax`` of the HF logits at the position before it (within 1e-4) and the top-K sets are HF's top-K.
Checked with the whole prompt in one step, with chunked prefill splitting the prompt over several steps, and
with the prefix cache holding the prompt's prefix (such a request skips the cache, as in vLLM).
"""

from __future__ import annotations

import pytest
import torch

from flotilla import LLM, SamplingParams
from flotilla.worker.prompt_logprobs import PromptLogprobsJob, compute_prompt_logprobs

PROMPTS = ["The capital of France is", "a b c d e f g h i j k l m n o p q r s t u v w x y z",
           "Once upon a time, in a land far away, there lived a very small dragon who loved books."]
K = 5


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return tiny_llama[1]


@pytest.fixture(scope="module")
def chunked_llm(tiny_llama):
    """Prompts longer than 8 tokens are split over several steps; block size 4 so prefixes are cached."""
    return LLM(model=tiny_llama[0], max_model_len=256, num_kv_blocks=128, block_size=4,
               max_num_batched_tokens=8, max_num_seqs=4)


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()  # (P, V)
    return torch.log_softmax(logits, dim=-1)


def check_prompt_logprobs(out, hf_model, k: int = K) -> None:
    """``out.prompt_logprobs`` equals transformers' for every prompt token, top-K sets and ranks included."""
    ids = out.prompt_token_ids
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(ids) and plp[0] is None
    ref = hf_logprobs(hf_model, ids)
    for i in range(1, len(ids)):
        entry, row, tok = plp[i], ref[i - 1], ids[i]
        assert tok in entry
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        v = row[tok].item()  # the rank up to ties within the tolerance (a 49k-token vocabulary has near-ties)
        assert int((row > v + 1e-4).sum()) + 1 <= entry[tok].rank <= int((row > v - 1e-4).sum()) + 1
        top = {t for t, lp in entry.items() if lp.rank <= k}
        assert top == set(row.topk(k).indices.tolist())
        assert len(entry) == (k if entry[tok].rank <= k else k + 1)
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(row[t].item(), abs=1e-4)
            assert lp.decoded_token is not None


def test_prompt_logprobs_match_transformers(tiny_llama_engine, hf):
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=K)
    outs = tiny_llama_engine.generate(PROMPTS + [[7]], params)
    for out in outs[:-1]:
        check_prompt_logprobs(out, hf)
        assert len(out.outputs[0].token_ids) == 3
    assert outs[-1].prompt_logprobs == [None]  # a one-token prompt has nothing to score
    plain = tiny_llama_engine.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=3))[0]
    assert plain.prompt_logprobs is None
    assert plain.outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_prompt_logprobs_zero_is_only_the_prompt_token(tiny_llama_engine, hf):
    out = tiny_llama_engine.generate(PROMPTS[1], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    ref = hf_logprobs(hf, out.prompt_token_ids)
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        tok = out.prompt_token_ids[i]
        assert list(entry) == [tok]
        assert entry[tok].logprob == pytest.approx(ref[i - 1, tok].item(), abs=1e-4)


def test_max_tokens_zero_scores_the_prompt_only(tiny_llama_engine, hf):
    outs = tiny_llama_engine.generate(PROMPTS[:2], SamplingParams(max_tokens=0, prompt_logprobs=2, logprobs=2, n=2))
    for out in outs:
        assert out.finished
        check_prompt_logprobs(out, hf, k=2)
        assert [(c.text, c.token_ids, c.finish_reason, c.logprobs) for c in out.outputs] == [("", [], "length", [])] * 2
    bare = tiny_llama_engine.generate(PROMPTS[0], SamplingParams(max_tokens=0))[0]
    assert bare.outputs[0].token_ids == [] and bare.outputs[0].finish_reason == "length"
    assert bare.prompt_logprobs is None
    kv = tiny_llama_engine.engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks and not tiny_llama_engine.engine.has_unfinished_requests()


def test_chunked_prefill_splits_the_prompt(chunked_llm, hf):
    """With an 8-token budget the 20+-token prompts take several steps, batched with each other."""
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=K)
    assert len(chunked_llm.tokenizer.encode(PROMPTS[2])) > 16
    for out in chunked_llm.generate(PROMPTS, params):
        check_prompt_logprobs(out, hf)


def test_prefix_cache_hit_still_gives_every_prompt_logprob(chunked_llm, hf):
    shared = PROMPTS[2]
    warm = chunked_llm.generate(shared + " The end.", SamplingParams(temperature=0.0, max_tokens=1))[0]
    again = chunked_llm.generate(shared + " The dragon", SamplingParams(temperature=0.0, max_tokens=1))[0]
    assert again.num_cached_tokens >= 16  # the prefix is in the cache ...
    scored = chunked_llm.generate(shared + " The dragon",
                                  SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=K))[0]
    assert scored.num_cached_tokens == 0  # ... but a prompt-logprobs request computes its whole prompt
    check_prompt_logprobs(scored, hf)
    assert scored.outputs[0].token_ids == again.outputs[0].token_ids
    assert warm.prompt_logprobs is None


def test_chunks_bound_the_logits_and_agree():
    """At most ``chunk_rows`` rows of full-vocabulary logits exist at once; chunking changes no number."""
    torch.manual_seed(0)
    hidden = torch.randn(23, 16)  # (T, hidden)
    head = torch.randn(100, 16)  # (vocab, hidden)
    seen: list[int] = []

    def logits(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.shape[0])
        return h @ head.T  # (rows, vocab)

    tokens = torch.randint(0, 100, (40,)).tolist()
    job = PromptLogprobsJob()
    job.add("a", tokens[:15], 15, first_row=0, first_pos=0, num_tokens=10, num_logprobs=3)  # positions 0..9
    job.add("b", tokens, 40, first_row=10, first_pos=20, num_tokens=13, num_logprobs=1)  # positions 20..32
    job.add("c", tokens[:5], 5, first_row=23, first_pos=4, num_tokens=1, num_logprobs=2)  # last prompt token
    assert job.req_ids == ["a", "b"] and [len(r) for r in job.rows] == [10, 13]
    small = compute_prompt_logprobs(hidden, job, logits, keep=True, chunk_rows=4)
    assert max(seen) == 4 and sum(seen) == 23
    whole = compute_prompt_logprobs(hidden, job, logits, keep=True, chunk_rows=256)
    assert small.keys() == whole.keys()
    for req_id in small:  # the same tokens and ranks; values up to the matmul's summation order
        assert [(p[0], p[2]) for p in small[req_id]] == [(p[0], p[2]) for p in whole[req_id]]
        for a, b in zip(small[req_id], whole[req_id]):
            assert a[1] == pytest.approx(b[1], abs=1e-5)
    ref = torch.log_softmax(hidden @ head.T, dim=-1)  # (T, vocab)
    for i, (ids, lps, ranks) in enumerate(small["a"]):
        assert ids[0] == tokens[i + 1] and len(ids) == 4
        assert lps[0] == pytest.approx(ref[i, tokens[i + 1]].item(), abs=1e-5)
    assert [p[0][0] for p in small["b"]] == tokens[21:34]
    seen.clear()
    assert compute_prompt_logprobs(hidden, job, logits, keep=False, chunk_rows=4) == {}
    assert sum(seen) == 23  # a rank that drops the result still joins every logits call
