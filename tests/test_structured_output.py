"""Structured output (xgrammar, and llguidance for what xgrammar rejects) on the embedded SmolLM2 through the
offline ``LLM`` API.

The outputs must parse and validate against their JSON schemas (``jsonschema``, formats included), match
their regex or be one of their choices, on both backends; the per-step allowed-token sets of our path
(``StructuredDecoding`` bitmask unpacked by the sampler) must equal an independent ``xgrammar.GrammarMatcher``
and an independent ``llguidance.LLMatcher`` on the same tokenizer (built afresh: ours comes from the disk
cache).
"""

from __future__ import annotations

import json
import re

import llguidance
import llguidance.hf
import numpy as np
import pytest
import torch
import xgrammar

from flotilla import LLM, SamplingParams
from flotilla.errors import InvalidRequestError
from flotilla.sampler import unpack_bitmask
from flotilla.sampling_params import StructuredOutputsParams as S
from flotilla.structured.decoding import StructuredDecoding
from flotilla.structured.grammar import GrammarCache, build_grammar, validate_structured
from flotilla.structured.tokenizer_cache import TokenizerAssets
from structured_schemas import GUIDANCE_ONLY, LARK, SCHEMAS, validate

pytestmark = pytest.mark.slow

PROMPT = "Reply with a JSON value only.\n"


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


def _params(spec: S, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 120)
    return SamplingParams(structured_outputs=spec, **kw)


def test_json_schemas_validate_on_both_backends_in_a_mixed_batch(llm):
    """Every schema with the auto backend (xgrammar for all but one; greedy, and sampled with a seed) and
    with llguidance (greedy), plus unconstrained requests, all in one batch."""
    prompts, params, schemas = [], [], []
    for schema in SCHEMAS:
        for backend, kw in ((None, {"temperature": 0}), (None, {"temperature": 0.8, "seed": 7}),
                            ("guidance", {"temperature": 0})):
            prompts.append(PROMPT + json.dumps(schema)[:80])
            params.append(_params(S(json=schema, disable_any_whitespace=True, backend=backend), **kw))
            schemas.append(schema)
    plain = ["The capital of France is", "Once upon a time"]
    prompts += plain
    params += [SamplingParams(temperature=0, max_tokens=20), SamplingParams(temperature=0.9, max_tokens=20)]
    outs = llm.generate(prompts, params)
    for out, schema, p in zip(outs, schemas, params):
        out = out.outputs[0]
        assert out.finish_reason == "stop", (schema, p.structured_outputs.backend, out.text)
        validate(json.loads(out.text), schema)
    for out in outs[-2:]:  # the unconstrained ones ran to their length as usual
        assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 20


def test_specs_xgrammar_rejects_are_served_by_llguidance(llm):
    """The auto backend: a draft-07 tuple schema, a regex with a scoped flag, a Lark grammar and a JSON
    whitespace_pattern are each rejected by xgrammar alone and served (and obeyed) with llguidance."""
    regex = "(?i:yes|no), [0-9]{2}"
    specs = [S(json=GUIDANCE_ONLY), S(regex=regex), S(grammar=LARK),
             S(json={"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                     "additionalProperties": False}, whitespace_pattern="[ ]?")]
    for spec in specs:
        with pytest.raises(InvalidRequestError, match="xgrammar: "):
            validate_structured(spec, backend="xgrammar")
        assert validate_structured(spec) == "guidance"
    outs = llm.generate([PROMPT + "Answer yes and give a pair:", "Is water wet? Then a number:", "Is water wet?",
                         PROMPT], [_params(s, temperature=0) for s in specs])
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
    validate(json.loads(texts[0]), GUIDANCE_ONLY)
    assert re.fullmatch(regex, texts[1]), texts[1]
    assert re.fullmatch(r"The answer is (yes|no)\.", texts[2]), texts[2]
    assert json.loads(texts[3]) in ({"ok": True}, {"ok": False}) and "  " not in texts[3] and "\n" not in texts[3]


def test_regex_choice_grammar_and_json_object(llm):
    specs = [S(regex=r"[0-9]{3}-[0-9]{4}"), S(choice=["Paris", "London", "Rome"]),
             S(grammar='root ::= "The answer is " ("yes" | "no") "."'), S(json_object=True)]
    outs = llm.generate(["Phone number:", "The capital of France is", "Is water wet?", "A JSON object:"],
                        [_params(s, temperature=0) for s in specs])
    texts = [o.outputs[0].text for o in outs]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", texts[0])
    assert texts[1] in ("Paris", "London", "Rome")
    assert re.fullmatch(r"The answer is (yes|no)\.", texts[2])
    assert isinstance(json.loads(texts[3]), dict)


def test_n_samples_each_constrained_and_seeded_reproducible(llm):
    params = _params(S(regex=r"(red|green|blue) [0-9]{1,2}"), n=4, temperature=1.0, seed=3, max_tokens=20)
    first = [c.text for c in llm.generate("A color and a number:", params)[0].outputs]
    again = [c.text for c in llm.generate("A color and a number:", params)[0].outputs]
    assert len(first) == 4 and first == again
    assert all(re.fullmatch(r"(red|green|blue) [0-9]{1,2}", t) for t in first)


@pytest.mark.parametrize("spec,field", [
    (S(json='{"type": "object", "properties": '), "structured_outputs"),
    (S(json={"type": "object", "properties": {"a": {"type": "no-such-type"}}}), "structured_outputs"),
    (S(regex="([a-z"), "structured_outputs"),
    (S(grammar="root ::= undefined_rule"), "structured_outputs"),
    (S(regex="a", choice=["b"]), "structured_outputs"),
])
def test_invalid_spec_is_invalid_request(llm, spec, field):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate("x", _params(spec))
    assert e.value.param == field


def _generated(llm, spec: S) -> list[int]:
    out = llm.generate(PROMPT, _params(spec, temperature=0.7, seed=11))[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) > 5, out.text
    return out.token_ids


def _step_with_reference(llm, spec: S, tokens: list[int], ref_allowed, ref_accept) -> None:
    """Step our masking path (``GrammarCache`` over the disk-cached ``TokenizerAssets``) and a reference
    matcher through ``tokens``: at every step the allowed sets are equal and the engine's token is in them."""
    mc = llm.engine.config.model
    assets = TokenizerAssets(mc.source, mc.source_kind, mc.vocab_size)
    assert assets.is_cached()  # ours reads the disk cache; the references are built from the tokenizer
    ours = StructuredDecoding(GrammarCache(assets), mc.vocab_size)
    ours.add("r", SamplingParams(structured_outputs=spec, eos_token_ids=tuple(llm.get_tokenizer().eos_token_ids)),
             [])
    try:
        for step, token in enumerate(tokens):
            rows, bitmask = ours.collect(ours.start_fill(["other", "r"]))
            assert rows == [1]
            allowed = unpack_bitmask(bitmask, mc.vocab_size)[0]  # (V,) the sampler's view
            assert torch.equal(allowed, ref_allowed()), f"step {step}"
            assert bool(allowed[token]), f"step {step}: the engine sampled a forbidden token {token}"
            ours.accept("r", token)
            assert ref_accept(token), f"step {step}"
    finally:
        ours.shutdown()


def test_allowed_sets_equal_xgrammars_own_matcher(llm):
    mc, tok = llm.engine.config.model, llm.get_tokenizer()
    spec = S(json=SCHEMAS[0])
    tokens = _generated(llm, spec)
    info = xgrammar.TokenizerInfo.from_huggingface(tok.hf_tokenizer, vocab_size=mc.vocab_size,
                                                   stop_token_ids=list(tok.eos_token_ids))
    ref = xgrammar.GrammarMatcher(xgrammar.GrammarCompiler(info).compile_grammar(build_grammar(spec)))

    def ref_allowed() -> torch.Tensor:
        mask = xgrammar.allocate_token_bitmask(1, mc.vocab_size)
        ref.fill_next_token_bitmask(mask)
        logits = torch.zeros(1, mc.vocab_size)
        xgrammar.apply_token_bitmask_inplace(logits, mask)
        return torch.isfinite(logits[0])

    _step_with_reference(llm, spec, tokens, ref_allowed, ref.accept_token)
    assert ref.is_terminated()


def test_allowed_sets_equal_llguidances_own_matcher(llm):
    """A schema only llguidance serves: our path (auto -> llguidance, its tokenizer from the disk cache)
    against an ``llguidance.LLMatcher`` over a tokenizer built afresh with ``llguidance.hf``."""
    mc, tok = llm.engine.config.model, llm.get_tokenizer()
    spec = S(json=GUIDANCE_ONLY)
    assert validate_structured(spec) == "guidance"
    tokens = _generated(llm, spec)
    validate(json.loads(llm.get_tokenizer().decode(tokens)), GUIDANCE_ONLY)
    ref_tok = llguidance.hf.from_tokenizer(tok.hf_tokenizer, n_vocab=mc.vocab_size, eos_token=list(tok.eos_token_ids))
    ref = llguidance.LLMatcher(ref_tok, llguidance.LLMatcher.grammar_from_json_schema(GUIDANCE_ONLY), log_level=0)

    def ref_allowed() -> torch.Tensor:
        bits = np.unpackbits(np.frombuffer(ref.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[:mc.vocab_size].astype(bool))

    _step_with_reference(llm, spec, tokens, ref_allowed, ref.consume_token)
    assert ref.is_stopped() and not ref.is_error()
