"""Structured output's two backends without a server: which backend serves a spec (``auto`` = xgrammar, then
llguidance), the keywords xgrammar accepts without enforcing (each shown with a document that breaks the
schema and that xgrammar 0.2.9 lets through), the on-disk cache of the tokenizer tables (a hit never loads the
tokenizer and equals a fresh build), and the backend option (``--structured-outputs-config``,
``--guided-decoding-backend``, ``EngineArgs.structured_outputs_config``, a request's own backend).
"""

from __future__ import annotations

import json
import os
import shutil

import llguidance
import llguidance.hf
import pytest
import xgrammar

from flotilla import LLM, SamplingParams
from flotilla.deploy.engine_args import engine_args_from
from flotilla.engine.arg_utils import EngineArgs
from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import StructuredOutputsParams as S
from flotilla.structured import tokenizer_cache
from flotilla.structured.grammar import validate_structured
from flotilla.structured.guidance import guidance_grammar
from flotilla.structured.tokenizer_cache import TokenizerAssets
from flotilla.tokenizer import Tokenizer
from structured_schemas import GUIDANCE_ONLY, LARK

VOCAB = 49152  # SmolLM2's


@pytest.fixture(scope="module")
def assets(smollm2_tokenizer_dir, tmp_path_factory) -> TokenizerAssets:
    return TokenizerAssets(smollm2_tokenizer_dir, "hf_dir", VOCAB, cache_root=str(tmp_path_factory.mktemp("cache")))


@pytest.mark.parametrize("spec, backend, served", [
    (S(json={"type": "object", "properties": {"a": {"type": "integer"}}}), "auto", "xgrammar"),
    (S(json=GUIDANCE_ONLY), "auto", "guidance"),  # draft-07 tuple: xgrammar "items must be a boolean or an object"
    (S(grammar='root ::= "a" | "b"'), "auto", "xgrammar"),
    (S(grammar=LARK), "auto", "guidance"),  # Lark: xgrammar parses EBNF only
    (S(regex="(?i:yes|no)"), "auto", "guidance"),  # scoped flags: xgrammar "not supported yet"
    (S(regex=r"\p{Lu}{2}"), "auto", "guidance"),  # Unicode classes: likewise
    (S(json_object=True, whitespace_pattern="[ ]?"), "auto", "guidance"),  # xgrammar has no whitespace_pattern
    (S(json={"type": "number", "multipleOf": 0.5}), "auto", "guidance"),  # accepted, not enforced by xgrammar
    (S(choice=["a b", "c.d"]), "guidance", "guidance"),
    (S(regex="[0-9]+", backend="xgrammar"), "guidance", "xgrammar"),  # the request's own backend wins
    (S(json=GUIDANCE_ONLY), "xgrammar", "xgrammar: items must be a boolean or an object"),
    (S(json={"type": "integer", "not": {"const": 5}}), "auto", "xgrammar: it accepts 'not' without enforcing it; "
                                                               "llguidance: Unimplemented keys: [\"not\"]"),
    (S(regex="(?=a)a"), "auto", "llguidance: at 1(8): invalid regex"),
    (S(grammar="root ::= missing"), "guidance", "llguidance: Failed to convert the grammar from GBNF to Lark"),
])
def test_which_backend_serves_a_spec(spec, backend, served):
    if served in ("xgrammar", "guidance"):
        assert validate_structured(spec, backend=backend) == served
        return
    with pytest.raises(InvalidRequestError) as e:
        validate_structured(spec, "response_format", backend=backend)
    assert e.value.param == "response_format" and served in str(e.value), str(e.value)


# Each keyword xgrammar_gap names, with a document that breaks the schema and that xgrammar 0.2.9 accepts.
GAPS = [
    ({"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}, "0.3"),
    ({"type": "integer", "minimum": 0, "maximum": 9, "not": {"const": 5}}, "5"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}, "maxItems": 2}, "[2]"),
    ({"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 10}]}, "11"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, '"abcdef"'),
    ({"type": "string", "format": "email", "maxLength": 5}, '"abcdef@x.com"'),
]


@pytest.mark.parametrize("schema, violating", GAPS)
def test_keywords_xgrammar_does_not_enforce_go_to_llguidance(assets, schema, violating):
    """If xgrammar starts enforcing one of these, this fails: drop it from ``schemas.xgrammar_gap``."""
    compiled = xgrammar.GrammarCompiler(assets.xgrammar_info()).compile_json_schema(json.dumps(schema),
                                                                                     any_whitespace=False)
    matcher = xgrammar.GrammarMatcher(compiled)
    assert matcher.accept_string(violating) and matcher.is_completed(), "xgrammar enforces it now"
    with pytest.raises(InvalidRequestError, match="xgrammar: it accepts .* without enforcing it"):
        validate_structured(S(json=schema), backend="xgrammar")
    try:
        assert validate_structured(S(json=schema)) == "guidance"
    except InvalidRequestError as e:  # llguidance does not implement it either: a 400 naming both
        assert "llguidance: Unimplemented keys" in str(e)
        return
    tok = assets.llguidance_tokenizer()
    ours = llguidance.LLMatcher(tok, guidance_grammar(S(json=schema, disable_any_whitespace=True)), log_level=0)
    assert not (ours.consume_tokens(tok.tokenize_str(violating)) and ours.is_accepting())


def test_tokenizer_tables_cached_on_disk(assets, smollm2_tokenizer_dir, tmp_path, monkeypatch, caplog):
    """A miss builds both tables once; a hit (even for another directory holding the same tokenizer) reads
    them without loading the tokenizer and equals a fresh build; another vocabulary size or tokenizer file is
    another entry; a corrupt entry is rebuilt."""
    assets.xgrammar_info()
    assert assets.is_cached()
    copy_dir = tmp_path / "same_tokenizer"
    shutil.copytree(smollm2_tokenizer_dir, copy_dir)
    root = os.path.dirname(assets.entry_dir)
    hit = TokenizerAssets(str(copy_dir), "hf_dir", VOCAB, cache_root=root)
    assert hit.key == assets.key and hit.is_cached()

    def no_load(*args):
        raise AssertionError("a cache hit loaded the tokenizer")

    monkeypatch.setattr(tokenizer_cache, "load_hf_tokenizer", no_load)
    tok = Tokenizer.from_pretrained(smollm2_tokenizer_dir)
    fresh = xgrammar.TokenizerInfo.from_huggingface(tok.hf_tokenizer, vocab_size=VOCAB,
                                                    stop_token_ids=list(tok.eos_token_ids))
    assert hit.xgrammar_info().serialize_json() == fresh.serialize_json()
    fresh_ll = llguidance.hf.from_tokenizer(tok.hf_tokenizer, n_vocab=VOCAB, eos_token=list(tok.eos_token_ids))
    ll = hit.llguidance_tokenizer()
    text = 'Héllo {"a": [1, 2.5e3]} ✓ <|im_end|>'
    assert (ll.vocab_size, ll.eos_tokens, ll.tokenize_str(text)) == (
        fresh_ll.vocab_size, fresh_ll.eos_tokens, fresh_ll.tokenize_str(text))
    assert TokenizerAssets(str(copy_dir), "hf_dir", VOCAB + 64, cache_root=root).key != assets.key
    with open(copy_dir / "tokenizer_config.json", "a", encoding="utf-8") as f:
        f.write("\n")
    assert TokenizerAssets(str(copy_dir), "hf_dir", VOCAB, cache_root=root).key != assets.key
    monkeypatch.undo()
    xgr_file = [n for n in os.listdir(assets.entry_dir) if n.startswith("xgrammar-")][0]
    with open(os.path.join(assets.entry_dir, xgr_file), "w", encoding="utf-8") as f:
        f.write("{not json")
    rebuilt = TokenizerAssets(smollm2_tokenizer_dir, "hf_dir", VOCAB, cache_root=root)
    assert rebuilt.xgrammar_info().serialize_json() == fresh.serialize_json()
    assert "rebuilding the cached xgrammar tokenizer info" in caplog.text


def test_backend_flags_and_engine_args(tiny_llama):
    from flotilla.deploy.schema import EngineOverrides
    from flotilla.entrypoints.cli import build_parser

    parser = build_parser()

    def config(*flags):
        return engine_args_from(parser.parse_args(["serve", *flags])).structured_outputs_config

    assert config() is None
    assert config("--structured-outputs-config", '{"backend": "guidance"}') == {"backend": "guidance"}
    assert config("--structured-outputs-config.backend", "xgrammar") == {"backend": "xgrammar"}
    assert config("--guided-decoding-backend", "auto") == {"backend": "auto"}
    with pytest.raises(ValueError, match="contradicts"):
        config("--structured-outputs-config", '{"backend": "guidance"}', "--guided-decoding-backend", "xgrammar")
    for bad in (["--structured-outputs-config", "[1]"], ["--guided-decoding-backend", "outlines"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *bad])
    path = tiny_llama[0]
    assert EngineArgs(model=path).create_engine_config().structured_outputs.backend == "auto"
    for given, message in (({"backend": "outlines"}, "backend must be one of"),
                           ({"backend": "xgrammar", "disable_fallback": True}, r"unsupported key\(s\) disable_fallback")):
        with pytest.raises(InvalidRequestError, match=message) as e:
            EngineArgs(model=path, structured_outputs_config=given).create_engine_config()
        assert e.value.param == "structured_outputs_config"
    assert EngineOverrides(structured_outputs_config={"backend": "guidance"}).structured_outputs_config == {
        "backend": "guidance"}


def test_engine_backend_and_request_override(tiny_llama):
    """An engine on xgrammar alone refuses what only llguidance serves, unless the request asks for it."""
    llm = LLM(model=tiny_llama[0], max_model_len=256, num_kv_blocks=64,
              structured_outputs_config={"backend": "xgrammar"})
    with pytest.raises(InvalidRequestError, match="xgrammar: EBNF"):
        llm.generate("x", SamplingParams(max_tokens=16, structured_outputs=S(grammar=LARK)))
    params = SamplingParams(max_tokens=16, temperature=0, structured_outputs=S(grammar=LARK, backend="auto"))
    assert llm.engine.input_processor.process("x", params).params.structured_outputs.backend == "guidance"
    out = llm.generate("x", params)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text in ("The answer is yes.", "The answer is no."), out.text
    regex = SamplingParams(max_tokens=8, structured_outputs=S(regex="[0-9]{3}"))
    assert llm.engine.input_processor.process("x", regex).params.structured_outputs.backend == "xgrammar"
