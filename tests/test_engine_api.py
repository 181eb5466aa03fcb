"""End-to-end tests of the offline ``LLM`` API over a real tiny model on CPU (no mocks).

Every test leaves the shared engine idle: no unfinished request and every KV block back in the free pool.
Runs on both kernel paths (tests/conftest.py), each with its own engine.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from flotilla import LLM, SamplingParams

pytestmark = pytest.mark.both_kernel_paths
PROMPTS = ["Hello, my name is", "The capital of France is", "a b c d e f g h i j k l m n o p q r s t",
           "Once upon a time"]


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def assert_engine_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.get_num_unfinished_requests() == 0
    assert engine.scheduler.get_num_unfinished_requests() == 0
    assert not engine.scheduler.requests
    assert not engine.output_processor.child_to_parent
    kv = engine.scheduler.kv_cache_manager
    assert kv.usage == 0
    assert kv.num_free_blocks == kv.num_blocks
    assert not kv.req_to_blocks


@pytest.fixture(scope="module")
def tiny_llama_engine(cpu_kernels, tiny_llama):
    """This module's engine over the tiny Llama, one per kernel path (shadows conftest's shared engine)."""
    path, _ = tiny_llama
    llm = LLM(model=path, max_model_len=256, num_kv_blocks=256)
    yield llm
    llm.engine.shutdown()


@pytest.fixture
def llm(tiny_llama_engine):
    assert_engine_idle(tiny_llama_engine)
    yield tiny_llama_engine
    assert_engine_idle(tiny_llama_engine)


def solo(llm: LLM, prompt, params: SamplingParams):
    (out,) = llm.generate(prompt, params)
    return out


def first_occurrence_index(tokens: list[int], start: int) -> int:
    """An index >= start whose token does not occur earlier in ``tokens``."""
    for i in range(start, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return i
    pytest.skip("the greedy run repeats every token")


# ---------------------------------------------------------------------------------------------- prompt forms
def test_prompt_forms_and_output_shape(llm):
    tok = llm.tokenizer
    prompt = PROMPTS[0]
    ids = tok.encode(prompt)
    by_str = solo(llm, prompt, greedy())
    by_ids = solo(llm, ids, greedy())
    by_dict = solo(llm, {"prompt_token_ids": ids}, greedy())
    by_prompt_dict = solo(llm, {"prompt": prompt}, greedy())

    assert by_str.prompt == prompt and by_prompt_dict.prompt == prompt
    assert by_ids.prompt is None and by_dict.prompt is None
    for out in (by_str, by_ids, by_dict, by_prompt_dict):
        assert isinstance(out.request_id, str)
        assert out.prompt_token_ids == ids
        assert out.finished
        assert len(out.outputs) == 1
        c = out.outputs[0]
        assert c.index == 0
        assert c.token_ids == by_str.outputs[0].token_ids
        assert len(c.token_ids) == 12
        assert c.text == by_str.outputs[0].text
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason == "length" and c.stop_reason is None
        assert c.finished()
        assert c.logprobs is None and c.cumulative_logprob is None
    ids_seen = [o.request_id for o in (by_str, by_ids, by_dict, by_prompt_dict)]
    assert len(set(ids_seen)) == 4


def test_batches_come_back_in_input_order(llm):
    tok = llm.tokenizer
    refs = [solo(llm, p, greedy(max_tokens=4 + i)) for i, p in enumerate(PROMPTS)]
    params = [greedy(max_tokens=4 + i) for i in range(len(PROMPTS))]

    outs = llm.generate(PROMPTS, params)
    assert [o.prompt for o in outs] == PROMPTS
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in refs]
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 5, 6, 7]

    id_lists = [tok.encode(p) for p in PROMPTS]
    outs = llm.generate(id_lists, params)
    assert [o.prompt_token_ids for o in outs] == id_lists
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in refs]

    # Reversed order and mixed prompt forms: still in input order, still the solo tokens.
    mixed = [{"prompt_token_ids": id_lists[3]}, PROMPTS[2], id_lists[1], {"prompt": PROMPTS[0]}]
    outs = llm.generate(mixed, list(reversed(params)))
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in reversed(refs)]
    assert llm.generate([], greedy()) == []


def test_one_sampling_params_per_prompt_must_match_count(llm):
    with pytest.raises(ValueError):
        llm.generate(PROMPTS[:2], [greedy()])


# ---------------------------------------------------------------------------------------------- finish reasons
def test_stop_token_ids(llm):
    ref = solo(llm, PROMPTS[1], greedy(16)).outputs[0]
    k = first_occurrence_index(ref.token_ids, 3)
    stop_id = ref.token_ids[k]
    tok = llm.tokenizer

    out = solo(llm, PROMPTS[1], greedy(16, stop_token_ids=[stop_id])).outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop_id
    assert out.token_ids == ref.token_ids[:k + 1]  # the stop token is in token_ids ...
    assert out.text == tok.decode(ref.token_ids[:k])  # ... but not in the text (vLLM)

    out = solo(llm, PROMPTS[1], greedy(16, stop_token_ids=[stop_id], include_stop_str_in_output=True)).outputs[0]
    assert out.token_ids == ref.token_ids[:k + 1]
    assert out.text == tok.decode(ref.token_ids[:k + 1])


def _pick_stop_string(text: str, start: int) -> tuple[str, int]:
    for i in range(start, len(text) - 3):
        s = text[i:i + 3]
        if s.strip() and text.find(s) == i:
            return s, i
    pytest.skip("no usable stop string in the greedy text")


def test_stop_strings(llm):
    tok = llm.tokenizer
    ref = solo(llm, PROMPTS[0], greedy(16)).outputs[0]
    # A stop string inside the text of a middle token.
    start = len(tok.decode(ref.token_ids[:4]))
    stop, at = _pick_stop_string(ref.text, start)

    out = solo(llm, PROMPTS[0], greedy(16, stop=[stop, "@@never@@"])).outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.text == ref.text[:at]
    assert stop not in out.text
    n = len(out.token_ids)
    assert n < 16 and out.token_ids == ref.token_ids[:n]
    # The last token is the one that completed the stop string.
    assert len(tok.decode(ref.token_ids[:n - 1])) < at + len(stop) <= len(tok.decode(ref.token_ids[:n]))

    out = solo(llm, PROMPTS[0], greedy(16, stop=stop, include_stop_str_in_output=True)).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == ref.text[:at + len(stop)]
    assert out.token_ids == ref.token_ids[:n]

    # A stop string that never appears: the request runs to max_tokens.
    out = solo(llm, PROMPTS[0], greedy(16, stop=["@@never@@"])).outputs[0]
    assert out.finish_reason == "length" and out.stop_reason is None
    assert out.text == ref.text and out.token_ids == ref.token_ids


def test_min_tokens_prevents_early_stop(llm):
    ref = solo(llm, PROMPTS[2], greedy(16)).outputs[0]
    k = first_occurrence_index(ref.token_ids, 1)
    stop_id = ref.token_ids[k]
    min_tokens = k + 2
    out = solo(llm, PROMPTS[2], greedy(16, stop_token_ids=[stop_id], min_tokens=min_tokens)).outputs[0]
    _check_min_tokens(out, ref.token_ids, k, stop_id, min_tokens, 16)
    assert out.finish_reason == "length" or out.stop_reason == stop_id


def _check_min_tokens(out, ref: list[int], k: int, stop_id: int, min_tokens: int, max_tokens: int) -> None:
    """Before ``min_tokens`` the stop token can neither be sampled nor end the request (vLLM masks it)."""
    assert len(out.token_ids) >= min_tokens
    assert out.token_ids[:k] == ref[:k]
    assert stop_id not in out.token_ids[:min_tokens]
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == stop_id
    else:
        assert out.finish_reason == "length" and len(out.token_ids) == max_tokens


@pytest.fixture(scope="module")
def eos_llm(tiny_llama, tiny_llama_engine, tmp_path_factory):
    """An engine over a copy of the tiny Llama whose generation_config.json makes a token the greedy run of
    PROMPTS[3] produces an EOS id. Returns (llm, reference token ids, index of the EOS token in them)."""
    path, _ = tiny_llama
    ref = solo(tiny_llama_engine, PROMPTS[3], greedy(16)).outputs[0].token_ids
    k = first_occurrence_index(ref, 3)
    out = tmp_path_factory.mktemp("tiny_llama_eos")
    for name in os.listdir(path):
        if name != "generation_config.json":
            shutil.copy(os.path.join(path, name), out / name)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, ref[k]]}))
    llm = LLM(model=str(out), max_model_len=256, num_kv_blocks=64)
    assert ref[k] in llm.tokenizer.eos_token_ids
    yield llm, ref, k
    llm.engine.shutdown()


def test_eos_stops_unless_ignored(eos_llm):
    llm, ref, k = eos_llm
    out = solo(llm, PROMPTS[3], greedy(16)).outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason is None  # EOS: no stop string or stop token id
    assert out.token_ids == ref[:k + 1]
    assert out.text == llm.tokenizer.decode(ref[:k])

    out = solo(llm, PROMPTS[3], greedy(16, ignore_eos=True)).outputs[0]
    assert out.finish_reason == "length"
    assert out.token_ids == ref

    out = solo(llm, PROMPTS[3], greedy(16, min_tokens=k + 2)).outputs[0]
    _check_min_tokens(out, ref, k, ref[k], k + 2, 16)
    assert out.stop_reason is None
    assert_engine_idle(llm)


# ---------------------------------------------------------------------------------------------- seeds
def test_seeded_sampling_is_independent_of_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12)
    alone = solo(llm, PROMPTS[0], seeded).outputs[0].token_ids
    again = solo(llm, PROMPTS[0], seeded).outputs[0].token_ids
    assert alone == again

    others = [SamplingParams(temperature=1.0, max_tokens=20), greedy(5),
              SamplingParams(temperature=0.8, seed=99, max_tokens=9)]
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]],
                         [others[0], seeded, others[1], others[2]])
    assert batch[1].outputs[0].token_ids == alone
    batch = llm.generate([PROMPTS[0], PROMPTS[3], PROMPTS[0]], [seeded, others[0], others[0]])
    assert batch[0].outputs[0].token_ids == alone
    batch = llm.generate([PROMPTS[2]] * 3 + [PROMPTS[0]], [others[0]] * 3 + [seeded])
    assert batch[3].outputs[0].token_ids == alone

    # Joining an engine that is already decoding other requests changes nothing either.
    engine = llm.engine
    engine.add_request("seed-busy-1", PROMPTS[1], SamplingParams(temperature=1.0, max_tokens=30))
    for _ in range(3):
        engine.step()
    engine.add_request("seed-late", PROMPTS[0], seeded)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert final["seed-late"].outputs[0].token_ids == alone

    other_seed = solo(llm, PROMPTS[0], seeded.clone(seed=4321)).outputs[0].token_ids
    assert other_seed != alone


def test_unseeded_sampling_differs(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12)
    runs = [solo(llm, PROMPTS[0], params).outputs[0].token_ids for _ in range(3)]
    assert len({tuple(r) for r in runs}) == 3
    outs = llm.generate([PROMPTS[0]] * 3, params)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 3


# ---------------------------------------------------------------------------------------------- n > 1
def test_n_samples(llm):
    out = solo(llm, PROMPTS[1], SamplingParams(n=4, temperature=1.0, max_tokens=10))
    assert out.finished
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4

    seeded = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7)
    a = solo(llm, PROMPTS[1], seeded)
    b = llm.generate([PROMPTS[0], PROMPTS[1]], [SamplingParams(max_tokens=5), seeded])[1]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3

    g = solo(llm, PROMPTS[1], greedy(8, n=2))
    ref = solo(llm, PROMPTS[1], greedy(8)).outputs[0].token_ids
    assert [c.token_ids for c in g.outputs] == [ref, ref]


def test_n_samples_share_prompt_blocks(llm):
    engine = llm.engine
    kv = engine.scheduler.kv_cache_manager
    block_size = kv.block_size
    # A prompt no other test uses, so nothing of it is cached yet: 2 full blocks + a partial one.
    prompt = [1000 + 7 * i for i in range(2 * block_size + 5)]
    full_blocks = (len(prompt) - 1) // block_size
    hits_before = engine.scheduler.make_stats().prefix_cache_hits

    n = 3
    engine.add_request("share-n", prompt, SamplingParams(n=n, temperature=1.0, max_tokens=6, seed=3))
    engine.step()  # prefill of all samples
    tables = [kv.get_blocks(f"{i}_share-n") for i in range(n)]
    assert all(len(t) == full_blocks + 1 for t in tables)
    for j in range(full_blocks):
        shared = {t[j].block_id for t in tables}
        assert len(shared) == 1
        assert tables[0][j].ref_cnt == n
    assert len({t[-1].block_id for t in tables}) == n  # the partial last block is private
    assert kv.num_blocks - kv.num_free_blocks == full_blocks + n
    hits = engine.scheduler.make_stats().prefix_cache_hits - hits_before
    assert hits >= (n - 1) * full_blocks * block_size

    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    assert final is not None and final.request_id == "share-n"
    assert [c.index for c in final.outputs] == list(range(n))
    assert all(len(c.token_ids) == 6 for c in final.outputs)


# ---------------------------------------------------------------------------------------------- logprobs
def _check_logprobs(c, num: int) -> None:
    """Each position holds the sampled token plus the top-``num`` tokens (ranks 1..num), consistently."""
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    total = 0.0
    for tok_id, entry in zip(c.token_ids, c.logprobs):
        assert tok_id in entry
        sampled = entry[tok_id]
        by_rank = sorted(entry.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in by_rank[:num]] == list(range(1, num + 1))
        if sampled.rank > num:
            assert len(entry) == num + 1
        else:
            assert len(entry) == num
        assert all(a.logprob >= b.logprob for a, b in zip(by_rank, by_rank[1:]))
        for lp in entry.values():
            assert lp.logprob <= 0.0
            assert isinstance(lp.decoded_token, str)
        total += sampled.logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_logprobs_greedy_matches_hf(llm, tiny_llama):
    _, hf_model = tiny_llama
    out = solo(llm, PROMPTS[1], greedy(6, logprobs=5))
    c = out.outputs[0]
    _check_logprobs(c, 5)
    assert all(entry[t].rank == 1 for t, entry in zip(c.token_ids, c.logprobs))
    # The values are the raw model distribution: compare with transformers.
    ids = torch.tensor([out.prompt_token_ids + c.token_ids])
    with torch.no_grad():
        logits = hf_model(ids).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)[len(out.prompt_token_ids) - 1:-1]  # (6, V)
    for pos, (t, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(ref[pos, tid].item(), abs=1e-3)
            assert lp.decoded_token == llm.tokenizer.decode_token(tid)


def test_logprobs_sampled_and_zero(llm):
    c = solo(llm, PROMPTS[0], SamplingParams(temperature=1.0, seed=5, max_tokens=8, logprobs=3)).outputs[0]
    _check_logprobs(c, 3)
    c0 = solo(llm, PROMPTS[0], greedy(5, logprobs=0)).outputs[0]
    assert all(list(entry) == [t] and entry[t].rank == 1 for t, entry in zip(c0.token_ids, c0.logprobs))
    assert c0.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c0.token_ids, c0.logprobs)))
    assert math.isfinite(c0.cumulative_logprob) and c0.cumulative_logprob < 0
    out = solo(llm, PROMPTS[0], SamplingParams(n=2, temperature=1.0, max_tokens=4, logprobs=2, seed=1))
    for c in out.outputs:
        _check_logprobs(c, 2)


# ---------------------------------------------------------------------------------------------- chat
def test_chat_renders_the_template(llm):
    tok = llm.tokenizer
    im_start = tok.hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    (out,) = llm.chat(messages, greedy(5))
    ids = out.prompt_token_ids
    assert ids[0] == im_start
    rendered = tok.decode(ids, skip_special_tokens=False)
    assert rendered.startswith("<|im_start|>")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ids == tok.encode(tok.hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                  tokenize=False), add_special_tokens=False)
    assert out.outputs[0].token_ids == solo(llm, {"prompt_token_ids": ids}, greedy(5)).outputs[0].token_ids

    convs = [messages, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    outs = llm.chat(convs, greedy(3))
    assert len(outs) == 2 and outs[0].prompt_token_ids == ids
    second = tok.decode(outs[1].prompt_token_ids, skip_special_tokens=False)
    assert second.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    (no_gen,) = llm.chat(messages, greedy(3), add_generation_prompt=False)
    assert not tok.decode(no_gen.prompt_token_ids, skip_special_tokens=False).endswith("assistant\n")
