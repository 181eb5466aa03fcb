"""Grammar specs -> xgrammar grammars: validation (no tokenizer) and compilation (cached, in a thread pool).

Contract: ``validate_structured(params)`` parses the request's constraint without a tokenizer and raises
``InvalidRequestError`` naming ``structured_outputs`` for a schema, regex or grammar xgrammar rejects;
``GrammarCache.get(params)`` returns a ``Future`` of the ``xgrammar.CompiledGrammar`` for the model's
tokenizer, compiling each distinct spec once (an LRU of ``max_entries`` specs) on a thread pool, so a caller
never compiles on its own critical path.
"""

from __future__ import annotations

import collections
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import StructuredOutputsParams

_FIELD = "structured_outputs"


def _xgr():
    import xgrammar  # imported on first use: a server without structured requests never loads it

    return xgrammar


def spec_key(params: StructuredOutputsParams) -> str:
    """A canonical string of the constraint (the cache key): equal specs give equal keys."""
    value = getattr(params, params.kind())
    if params.kind() == "json" and isinstance(value, str):
        value = _parse_schema(value)
    return json.dumps([params.kind(), value, params.disable_any_whitespace, params.whitespace_pattern],
                      sort_keys=True, separators=(",", ":"))


def _parse_schema(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise InvalidRequestError(f"{_FIELD}.json is not valid JSON: {e}", _FIELD) from e


def _choice_regex(choices: list[str]) -> str:
    import re

    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def build_grammar(params: StructuredOutputsParams, field: str = _FIELD):
    """The tokenizer-independent ``xgrammar.Grammar`` of a spec; ``InvalidRequestError`` (naming ``field``) if
    xgrammar rejects it."""
    xgr = _xgr()
    kind = params.kind()
    ws = {"any_whitespace": not params.disable_any_whitespace}
    try:
        if kind == "json":
            schema = params.json if isinstance(params.json, dict) else _parse_schema(params.json)
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(f"{_FIELD}.json must be a JSON schema object", _FIELD)
            return xgr.Grammar.from_json_schema(json.dumps(schema), strict_mode=True, **ws)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema(json.dumps({"type": "object"}), **ws)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_regex(_choice_regex(params.choice))
        if kind == "structural_tag":
            return xgr.Grammar.from_structural_tag(params.structural_tag)
        return xgr.Grammar.from_ebnf(params.grammar)
    except InvalidRequestError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses for bad input
        raise InvalidRequestError(f"invalid {field} ({kind}): {_first_line(e)}", field) from e


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:500]


def validate_structured(params: StructuredOutputsParams, field: str = _FIELD) -> None:
    """Raise InvalidRequestError (naming ``field``) unless the spec is well formed and xgrammar accepts it."""
    params.validate(field)
    if params.whitespace_pattern is not None:
        raise InvalidRequestError(f"{field}.whitespace_pattern is not supported by the xgrammar backend; use "
                                  "disable_any_whitespace", field)
    build_grammar(params, field)


class GrammarCache:
    """Compiles specs for one tokenizer on ``num_threads`` threads and keeps the ``max_entries`` most recently
    used compiled grammars. ``tokenizer_info`` is built lazily (in the pool) by ``make_tokenizer_info``."""

    def __init__(self, make_tokenizer_info: Callable[[], Any], max_entries: int = 64, num_threads: int = 1):
        self._make_info = make_tokenizer_info
        self._info_lock = threading.Lock()
        self._compiler = None
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="flotilla-grammar")
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, Future] = collections.OrderedDict()
        self.max_entries = max_entries
        self.num_compiled = 0

    def compiler(self):
        with self._info_lock:
            if self._compiler is None:
                self._compiler = _xgr().GrammarCompiler(self._make_info(), max_threads=1)
            return self._compiler

    def get(self, params: StructuredOutputsParams) -> Future:
        key = spec_key(params)
        with self._lock:
            fut = self._entries.get(key)
            if fut is not None:
                self._entries.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, params)
            self._entries[key] = fut
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return fut

    def _compile(self, params: StructuredOutputsParams):
        compiled = self.compiler().compile_grammar(build_grammar(params))
        self.num_compiled += 1
        return compiled

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def tokenizer_info_factory(source: str, source_kind: str, vocab_size: int,
                           hf_config: Any = None) -> Callable[[], Any]:
    """A function building the ``xgrammar.TokenizerInfo`` of a model (its HF tokenizer, the logits' vocabulary
    size, the tokenizer's EOS ids as stop tokens); called once, on the grammar pool's thread. ``hf_config``
    (the model's transformers config) spares a GGUF tokenizer a second parse of the file."""

    def make():
        import os

        from flotilla.tokenizer import Tokenizer

        if source_kind == "gguf":
            tok = Tokenizer.from_pretrained(os.path.dirname(source), gguf_file=os.path.basename(source),
                                            config=hf_config)
        else:
            tok = Tokenizer.from_pretrained(source)
        return _xgr().TokenizerInfo.from_huggingface(tok.hf_tokenizer, vocab_size=vocab_size,
                                                     stop_token_ids=list(tok.eos_token_ids))

    return make
