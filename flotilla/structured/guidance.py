"""The llguidance backend: a spec's llguidance grammar, its check, and matchers with xgrammar's interface.

Contract: ``guidance_grammar(params)`` is the llguidance grammar text of a spec: a JSON schema under
xgrammar's strict mode (``schemas.strict_schema``: properties and tuple items a schema does not list are not
generated, whichever backend serves it; free JSON whitespace, or with ``disable_any_whitespace`` xgrammar's one-line
form ``{"a": 1, "b": 2}``; ``whitespace_pattern`` when given), a regex, a choice (a Lark
alternation of the literal strings), a Lark or GBNF/EBNF grammar, or any JSON object; ValueError when it
cannot be translated (an xgrammar ``structural_tag``). ``guidance_error(params)`` is None when llguidance accepts the spec, else its one-line
reason (no tokenizer needed). ``GuidanceGrammar(tokenizer, grammar)`` compiles it for an
``llguidance.LLTokenizer`` (ValueError for a grammar the matcher rejects); ``new_matcher()`` returns a
``GuidanceMatcher`` with the methods the decoding loop uses on ``xgrammar.GrammarMatcher``:
``fill_next_token_bitmask(bitmask, row)`` (``bitmask`` a CPU int32 tensor (B, ceil(V / 32)), filled with
``llguidance.numpy``), ``accept_token(token) -> bool`` and ``is_terminated()`` (True once an EOS id was
accepted). llguidance releases the GIL while it computes a mask.
"""

from __future__ import annotations

import json
from typing import Any

from flotilla.sampling_params import StructuredOutputsParams
from flotilla.structured.schemas import strict_schema


def _llg():
    import llguidance  # imported on first use, as xgrammar is

    return llguidance


def _json_options(params: StructuredOutputsParams) -> dict[str, Any]:
    if params.whitespace_pattern is not None:
        return {"whitespace_pattern": params.whitespace_pattern}
    if params.disable_any_whitespace:  # xgrammar's one-line form, {"a": 1, "b": 2}, on both backends
        return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return {"whitespace_flexible": True}


def guidance_grammar(params: StructuredOutputsParams) -> str:
    llg = _llg()
    kind = params.kind()
    if kind == "json":
        schema = params.json if isinstance(params.json, dict) else json.loads(params.json)
        return llg.LLMatcher.grammar_from_json_schema(strict_schema(schema), defaults=_json_options(params))
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_json_options(params))
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return llg.grammar_from("choice", params.choice)
    if kind == "structural_tag":
        raise ValueError("a structural_tag is xgrammar's format")
    return llg.grammar_from("grammar", params.grammar)  # Lark, or GBNF converted to Lark


def guidance_error(params: StructuredOutputsParams) -> str | None:
    try:
        grammar = guidance_grammar(params)
    except ValueError as e:
        return _first_line(e)
    error = _llg().LLMatcher.validate_grammar(grammar, None)
    return _first_line(error) if error else None


def _first_line(e: Any) -> str:
    """The reason in one line: llguidance's first line, completed by its "error: ..." line when the first one
    only announces it ("regex parse error:")."""
    lines = [line.strip() for line in (str(e).strip() or type(e).__name__).splitlines()]
    reason = lines[0]
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    if reason.endswith(":") and detail:
        reason = f"{reason} {detail[len('error:'):].strip()}"
    return reason[:500]


class GuidanceGrammar:
    """A spec compiled for one tokenizer: a matcher prototype that ``new_matcher`` copies."""

    def __init__(self, tokenizer, grammar: str):
        self._prototype = _llg().LLMatcher(tokenizer, grammar, log_level=0)
        if self._prototype.is_error():
            raise ValueError(f"llguidance rejects the grammar: {_first_line(self._prototype.get_error())}")

    def new_matcher(self) -> "GuidanceMatcher":
        return GuidanceMatcher(self._prototype.deep_copy())


class GuidanceMatcher:
    """One sequence's ``llguidance.LLMatcher`` behind xgrammar's matcher methods (see the module contract)."""

    def __init__(self, matcher):
        self._matcher = matcher

    def fill_next_token_bitmask(self, bitmask, row: int = 0) -> None:
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, bitmask.numpy(), row)  # a view: writes into the tensor
        if self._matcher.is_error():
            raise RuntimeError(f"llguidance matcher failed: {self._matcher.get_error()}")

    def accept_token(self, token: int) -> bool:
        return self._matcher.consume_token(token) and not self._matcher.is_error()

    def is_terminated(self) -> bool:
        return self._matcher.is_stopped()
