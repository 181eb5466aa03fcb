"""Structured output (xgrammar) on the embedded SmolLM2 through the offline ``LLM`` API.

The outputs must parse and validate against their JSON schemas (``jsonschema``), match their regex or be one
of their choices; the per-step allowed-token sets of our path (``StructuredDecoding`` bitmask unpacked by the
sampler) must equal an independent ``xgrammar.GrammarMatcher`` on the same tokenizer.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
import xgrammar

from flotilla import LLM, SamplingParams
from flotilla.errors import InvalidRequestError
from flotilla.sampler import unpack_bitmask
from flotilla.sampling_params import StructuredOutputsParams as S
from flotilla.structured.decoding import StructuredDecoding
from flotilla.structured.grammar import GrammarCache, build_grammar, tokenizer_info_factory

pytestmark = pytest.mark.slow

_XY = {"type": "integer", "minimum": -100, "maximum": 100}
_DEFS = {"point": {"type": "object", "properties": {"x": _XY, "y": _XY},
                   "required": ["x", "y"]}}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "active": {"type": "boolean"}},
        "required": ["id", "active"]}}, "required": ["user"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["score"]},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 16},
                                      "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                      "subtitle": {"type": "string", "maxLength": 10}},
     "required": ["title", "year"]},
    {"$defs": _DEFS, "type": "object", "properties": {"a": {"$ref": "#/$defs/point"},
                                                      "b": {"$ref": "#/$defs/point"}}, "required": ["a", "b"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                      "confidence": {"type": "integer", "minimum": 1, "maximum": 5}},
     "required": ["answer", "confidence"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
]
PROMPT = "Reply with a JSON value only.\n"


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


def _params(spec: S, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 120)
    return SamplingParams(structured_outputs=spec, **kw)


def test_json_schemas_validate_greedy_and_sampled_in_a_mixed_batch(llm):
    """Every schema twice (greedy, sampled with a seed) plus unconstrained requests, all in one batch."""
    prompts, params = [], []
    for schema in SCHEMAS:
        for kw in ({"temperature": 0}, {"temperature": 0.8, "seed": 7}):
            prompts.append(PROMPT + json.dumps(schema)[:80])
            params.append(_params(S(json=schema, disable_any_whitespace=True), **kw))
    plain = ["The capital of France is", "Once upon a time"]
    prompts += plain
    params += [SamplingParams(temperature=0, max_tokens=20), SamplingParams(temperature=0.9, max_tokens=20)]
    outs = llm.generate(prompts, params)
    for i, schema in enumerate(s for s in SCHEMAS for _ in range(2)):
        out = outs[i].outputs[0]
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)
    for out in outs[-2:]:  # the unconstrained ones ran to their length as usual
        assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 20


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


def test_allowed_sets_equal_xgrammars_own_matcher(llm):
    """Drive our masking path and an independent xgrammar matcher over a generated sequence; at every step the
    allowed-token sets are equal and the engine's token is in them."""
    mc = llm.engine.config.model
    schema = SCHEMAS[0]
    spec = S(json=schema)
    out = llm.generate(PROMPT, _params(spec, temperature=0.7, seed=11))[0].outputs[0]
    tokens = out.token_ids
    assert out.finish_reason == "stop" and len(tokens) > 5
    make_info = tokenizer_info_factory(mc.source, mc.source_kind, mc.vocab_size)
    ours = StructuredDecoding(GrammarCache(make_info), mc.vocab_size)
    ref_info = make_info()
    ref = xgrammar.GrammarMatcher(xgrammar.GrammarCompiler(ref_info).compile_grammar(build_grammar(spec)))
    params = SamplingParams(structured_outputs=spec, eos_token_ids=tuple(llm.get_tokenizer().eos_token_ids))
    ours.add("r", params, [])
    for step, token in enumerate(tokens):
        rows, bitmask = ours.collect(ours.start_fill(["other", "r"]))
        assert rows == [1]
        allowed = unpack_bitmask(bitmask, mc.vocab_size)[0]  # (V,) the sampler's view
        ref_mask = xgrammar.allocate_token_bitmask(1, mc.vocab_size)
        ref.fill_next_token_bitmask(ref_mask)
        logits = torch.zeros(1, mc.vocab_size)
        xgrammar.apply_token_bitmask_inplace(logits, ref_mask)
        assert torch.equal(allowed, torch.isfinite(logits[0])), f"step {step}"
        assert bool(allowed[token]), f"step {step}: the engine sampled a forbidden token {token}"
        ours.accept("r", token)
        assert ref.accept_token(token)
    assert ref.is_terminated()
    ours.shutdown()
