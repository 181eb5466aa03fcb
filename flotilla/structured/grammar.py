"""Grammar specs -> the backend that serves them (xgrammar or llguidance) -> compiled grammars, cached.

Contract: ``validate_structured(params, field, backend)`` checks the request's constraint without a
tokenizer and returns the backend that serves it: the spec's own ``params.backend`` or else ``backend``;
"auto" is xgrammar when xgrammar accepts the spec and llguidance when only llguidance does (as vLLM's
``auto``: Lark grammars, regex flags and Unicode classes, draft-07 tuples, ``whitespace_pattern``, ...).
xgrammar "accepts" a JSON schema only when it also enforces all of it (``schemas.xgrammar_gap``). A spec the chosen
backend rejects (with "auto": both) is an ``InvalidRequestError`` naming ``field`` and each backend's reason.
Verdicts are memoised per spec (``spec_key``). ``GrammarCache(assets).get(params)`` returns a ``Future`` of a
compiled grammar for the model's tokenizer (``TokenizerAssets``) whose ``new_matcher()`` makes a per-sequence
matcher (``xgrammar.GrammarMatcher`` or ``GuidanceMatcher``, one interface); each distinct spec compiles once
(an LRU of ``max_entries``) on a thread pool, so a caller never compiles on its own critical path.
``prewarm()`` builds the tokenizer's disk-cache entry on the pool at engine start when it is missing.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import StructuredOutputsParams
from flotilla.structured.guidance import GuidanceGrammar, guidance_error, guidance_grammar
from flotilla.structured.schemas import xgrammar_gap
from flotilla.structured.tokenizer_cache import TokenizerAssets

logger = logging.getLogger(__name__)
_FIELD = "structured_outputs"
_NAMES = {"xgrammar": "xgrammar", "guidance": "llguidance"}
_XGR_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")  # "[00:17:55] /project/cpp/x.cc:5082: "


def _xgr():
    import xgrammar  # imported on first use: a server without structured requests never loads it

    return xgrammar


def spec_key(params: StructuredOutputsParams) -> str:
    """A canonical string of the constraint (the cache key): equal specs give equal keys."""
    value = getattr(params, params.kind())
    if params.kind() == "json" and isinstance(value, str):
        value = _parse_schema(value)
    return json.dumps([params.kind(), value, params.disable_any_whitespace, params.whitespace_pattern,
                       params.backend], sort_keys=True, separators=(",", ":"))


def _parse_schema(text: str, field: str = _FIELD) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise InvalidRequestError(f"{field}.json is not valid JSON: {e}", field) from e


def _choice_regex(choices: list[str]) -> str:
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def build_grammar(params: StructuredOutputsParams, field: str = _FIELD):
    """The tokenizer-independent ``xgrammar.Grammar`` of a spec; ``InvalidRequestError`` (naming ``field``) if
    xgrammar rejects it."""
    try:
        return _xgrammar_grammar(params)
    except ValueError as e:
        raise InvalidRequestError(f"invalid {field} ({params.kind()}): {e}", field) from e


def _xgrammar_grammar(params: StructuredOutputsParams):
    """The ``xgrammar.Grammar`` of a spec; ValueError with xgrammar's one-line reason if it rejects it."""
    xgr = _xgr()
    kind = params.kind()
    ws = {"any_whitespace": not params.disable_any_whitespace}
    if params.whitespace_pattern is not None:
        raise ValueError("xgrammar has no whitespace_pattern (use disable_any_whitespace, or llguidance)")
    try:
        if kind == "json":
            schema = params.json if isinstance(params.json, dict) else json.loads(params.json)
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
    except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses for bad input
        raise ValueError(_first_line(e)) from e


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return _XGR_LOG_PREFIX.sub("", text.splitlines()[0])[:500]


class _Verdicts:
    """Memo of each backend's verdict on a spec: spec_key -> None (accepted) or the reason (bounded LRU)."""

    def __init__(self, max_entries: int = 512):
        self._lock = threading.Lock()
        self._memo: collections.OrderedDict[tuple[str, str], str | None] = collections.OrderedDict()
        self.max_entries = max_entries

    def error(self, backend: str, params: StructuredOutputsParams, key: str) -> str | None:
        with self._lock:
            if (key, backend) in self._memo:
                self._memo.move_to_end((key, backend))
                return self._memo[(key, backend)]
        reason = _xgrammar_error(params) if backend == "xgrammar" else guidance_error(params)
        with self._lock:
            self._memo[(key, backend)] = reason
            while len(self._memo) > self.max_entries:
                self._memo.popitem(last=False)
        return reason


def _xgrammar_error(params: StructuredOutputsParams) -> str | None:
    try:
        _xgrammar_grammar(params)
    except ValueError as e:
        return str(e)
    if params.kind() == "json":
        gap = xgrammar_gap(params.json if isinstance(params.json, dict) else json.loads(params.json))
        if gap is not None:
            return f"it accepts {gap} without enforcing it"
    return None


_VERDICTS = _Verdicts()


def validate_structured(params: StructuredOutputsParams, field: str = _FIELD, backend: str = "auto") -> str:
    """The backend ("xgrammar" | "guidance") that serves the spec (see the module contract)."""
    params.validate(field)
    if params.kind() == "json" and isinstance(params.json, str):
        schema = _parse_schema(params.json, field)
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError(f"{field}.json must be a JSON schema object", field)
    choice = params.backend or backend
    order = ("xgrammar", "guidance") if choice == "auto" else (choice,)
    key = spec_key(params)
    reasons = []
    for name in order:
        reason = _VERDICTS.error(name, params, key)
        if reason is None:
            return name
        reasons.append(f"{_NAMES[name]}: {reason}")
    raise InvalidRequestError(f"invalid {field} ({params.kind()}): {'; '.join(reasons)}", field)


class _XgrammarGrammar:
    def __init__(self, compiled):
        self.compiled = compiled

    def new_matcher(self):
        return _xgr().GrammarMatcher(self.compiled)


class GrammarCache:
    """Compiles specs for one tokenizer on ``num_threads`` threads and keeps the ``max_entries`` most recently
    used compiled grammars. The backends' tokenizers come from ``assets`` (built on first use, in the pool)."""

    def __init__(self, assets: TokenizerAssets, max_entries: int = 64, num_threads: int = 1):
        self.assets = assets
        self._compiler_lock = threading.Lock()
        self._compiler = None
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="flotilla-grammar")
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, Future] = collections.OrderedDict()
        self.max_entries = max_entries
        self.num_compiled = 0

    def compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = _xgr().GrammarCompiler(self.assets.xgrammar_info(), max_threads=1)
            return self._compiler

    def prewarm(self) -> Future | None:
        """When the disk cache lacks this model's tokenizer, build it on the pool now (once per machine and
        model), so no request waits for it; None when it is cached already (a request reads it in ~0.1 s)."""
        if self.assets.is_cached():
            return None
        fut = self._pool.submit(self.compiler)
        fut.add_done_callback(lambda f: f.exception() and logger.warning(
            "caching the grammar engines' tokenizer failed (retried at the first structured request): %s",
            f.exception()))
        return fut

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
        if validate_structured(params) == "xgrammar":
            compiled = _XgrammarGrammar(self.compiler().compile_grammar(build_grammar(params)))
        else:
            compiled = GuidanceGrammar(self.assets.llguidance_tokenizer(), guidance_grammar(params))
        self.num_compiled += 1
        return compiled

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
