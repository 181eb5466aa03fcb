"""Structured output: grammars (JSON schema, regex, choice, EBNF/Lark) compiled with xgrammar, or llguidance
for what xgrammar rejects -> per-request matchers -> token bitmasks that the batched sampler applies (see
``flotilla.structured.grammar``, ``flotilla.structured.guidance``, ``flotilla.structured.tokenizer_cache`` and
``flotilla.structured.decoding``)."""
