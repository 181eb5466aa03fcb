"""Structured output: grammars (JSON schema, regex, choice, EBNF) compiled with xgrammar -> per-request
matchers -> token bitmasks that the batched sampler applies (see ``flotilla.structured.grammar`` and
``flotilla.structured.decoding``)."""
