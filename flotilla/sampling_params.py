"""SamplingParams: how one request is decoded (vLLM's names and defaults)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from flotilla.config import STRUCTURED_OUTPUTS_BACKENDS
from flotilla.errors import InvalidRequestError

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_INT32 = 2**31 - 1
MAX_CHOICES = 256
MAX_BAD_WORDS = 128
MAX_LOGIT_BIAS = 100.0
_EPS = 1e-5


@dataclass
class StructuredOutputsParams:
    """vLLM's ``StructuredOutputsParams``: constrain the output to a JSON schema, a regex, one of a list of
    strings, an EBNF/Lark grammar, or any JSON object. Exactly one of them must be set.

    ``json``: a JSON schema (dict or JSON text); ``regex``: a regular expression the whole output matches;
    ``choice``: the output is exactly one of these strings; ``grammar``: an EBNF (GBNF/xgrammar) grammar with a
    ``root`` rule; ``json_object``: any JSON object; ``structural_tag``: an xgrammar structural tag (JSON text,
    ``{"type": "structural_tag", "format": {...}}``; e.g. free text in which tool-call blocks follow their
    schemas; xgrammar only). ``disable_any_whitespace``: JSON without free whitespace (one line:
    ``{"a": 1, "b": 2}``); ``whitespace_pattern``: a regex for the whitespace JSON may contain (vLLM's field).
    ``backend``: the grammar engine of this request (vLLM's older request-level backend): None for the
    engine's (``--structured-outputs-config``), "auto" (xgrammar, else llguidance), "xgrammar" or "guidance";
    the engine's input processor replaces it with the one that serves the spec.
    ``validate()`` checks the form only; the grammar is parsed by ``flotilla.structured`` (a bad schema,
    regex or grammar is an ``InvalidRequestError`` naming the field).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None
    backend: str | None = None

    def kind(self) -> str:
        """The one constraint set: "json" | "regex" | "choice" | "grammar" | "json_object" | "structural_tag"."""
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    def validate(self, field_name: str = "structured_outputs") -> None:
        kinds = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise InvalidRequestError(
                f"{field_name} needs exactly one of {', '.join(_STRUCTURED_KINDS)}; got "
                f"{', '.join(kinds) if kinds else 'none'}", field_name)
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidRequestError(f"{field_name}.json must be a JSON schema (object or string)", field_name)
        for name in ("regex", "grammar", "structural_tag", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError(f"{field_name}.{name} must be a non-empty string", field_name)
        if self.choice is not None:
            ok = isinstance(self.choice, list) and 0 < len(self.choice) <= MAX_CHOICES and all(
                isinstance(c, str) and c for c in self.choice)
            if not ok:
                raise InvalidRequestError(f"{field_name}.choice must be a list of 1 to {MAX_CHOICES} non-empty "
                                          "strings", field_name)
        if self.structural_tag is not None and self.disable_any_whitespace:
            raise InvalidRequestError(f"{field_name}.disable_any_whitespace does not apply to a structural_tag",
                                      field_name)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise InvalidRequestError(f"{field_name}.json_object must be a boolean", field_name)
        if self.backend not in (None, *STRUCTURED_OUTPUTS_BACKENDS):
            raise InvalidRequestError(f"{field_name}.backend must be one of "
                                      f"{', '.join(STRUCTURED_OUTPUTS_BACKENDS)}, got {self.backend!r}", field_name)


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class SamplingParams:
    """Decoding parameters of one request.

    Contract: ``validate()`` (called by the engine before a request is admitted) raises
    ``InvalidRequestError`` naming the field for any out-of-range value. ``temperature == 0`` means greedy.
    ``top_k <= 0`` (or -1) disables top-k, ``top_p == 1`` and ``min_p == 0`` disable theirs. ``seed`` makes
    the request's samples depend only on the seed and its own logits, whatever else is batched with it.
    ``logprobs=N`` returns the sampled token's logprob and the top-N (raw model distribution).
    ``prompt_logprobs=K`` returns, for every prompt token after the first, its logprob and the top-K
    (``RequestOutput.prompt_logprobs``, ``None`` for the first token); such a request does not read the prefix
    cache (its prompt is computed in full, as in vLLM). ``max_tokens=0`` generates nothing (finish reason
    "length"): only the prompt is computed, e.g. to score it with ``prompt_logprobs``.
    Stop strings are removed from the output text unless ``include_stop_str_in_output``.
    ``structured_outputs`` constrains every sampled token to a grammar (see ``StructuredOutputsParams``);
    the request ends with EOS when the grammar is complete.
    ``logit_bias`` (OpenAI): token id -> bias in [-100, 100] added to that token's logit before sampling
    (greedy rows too). ``allowed_token_ids`` (vLLM): only these tokens may be sampled. ``bad_words`` (vLLM):
    words never generated: the engine tokenizes each (as is, and with one leading space when that gives a
    different first token and as many tokens) into ``bad_words_token_ids``; the last token of a sequence is
    banned whenever the output ends with the tokens before it. Token ids outside the vocabulary are an
    ``InvalidRequestError`` from the engine's input processor.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # Filled by the engine: the model's EOS ids, so the scheduler can stop without a tokenizer.
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)
    # Filled by the engine from ``bad_words`` (the sampler needs no tokenizer).
    bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    def clone(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise InvalidRequestError (naming the field) for any value out of range."""
        _check_int("n", self.n, 1, MAX_N)
        _check_number("temperature", self.temperature, 0.0, None)
        _check_number("top_p", self.top_p, _EPS, 1.0, "must be in (0, 1]")
        _check_int("top_k", self.top_k, None, 2**63 - 1)
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 or 0 (disabled) or positive, got {self.top_k}", "top_k")
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_number("repetition_penalty", self.repetition_penalty, _EPS, None, "must be > 0")
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), 2**64 - 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 0, MAX_INT32)
        _check_int("min_tokens", self.min_tokens, 0, MAX_INT32)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})", "min_tokens")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        self._validate_stops()
        self._validate_token_extras()
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise InvalidRequestError("structured_outputs must be a StructuredOutputsParams",
                                          "structured_outputs")
            self.structured_outputs.validate()
            if self.ignore_eos:
                raise InvalidRequestError("ignore_eos cannot be combined with structured_outputs (the grammar "
                                          "ends the output with EOS)", "ignore_eos")

    def _validate_token_extras(self) -> None:
        """logit_bias, allowed_token_ids, bad_words (the vocabulary bound is the input processor's)."""
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InvalidRequestError("logit_bias must map token ids to biases", "logit_bias")
            for token, bias in self.logit_bias.items():
                _check_token_id("logit_bias", token)
                _check_number("logit_bias", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS,
                              f"values must be in [-100, 100] (token {token})")
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids:
                raise InvalidRequestError("allowed_token_ids must be a non-empty list of token ids",
                                          "allowed_token_ids")
            for t in self.allowed_token_ids:
                _check_token_id("allowed_token_ids", t)
        if self.bad_words is not None:
            ok = isinstance(self.bad_words, list) and len(self.bad_words) <= MAX_BAD_WORDS and all(
                isinstance(w, str) and w.strip() for w in self.bad_words)
            if not ok:
                raise InvalidRequestError(f"bad_words must be a list of at most {MAX_BAD_WORDS} non-blank strings",
                                          "bad_words")

    def _validate_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}",
                                      "stop")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_LEN:
                raise InvalidRequestError(
                    f"each stop string must be a non-empty string of at most {MAX_STOP_STRING_LEN} characters",
                    "stop")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise InvalidRequestError(f"stop_token_ids must be non-negative integers, got {t!r}",
                                          "stop_token_ids")


def _check_token_id(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{name} must hold token ids (non-negative integers), got {value!r}", name)


def _check_int(name: str, value, lo, hi) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidRequestError(f"{name} must be in [{lo if lo is not None else '-inf'}, "
                                  f"{hi if hi is not None else 'inf'}], got {value}", name)


def _check_number(name: str, value, lo, hi, what: str | None = None) -> None:
    not_finite = isinstance(value, float) and not math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not_finite:
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = what or f"must be in [{lo}, {hi if hi is not None else 'inf'}]"
        raise InvalidRequestError(f"{name} {rng}, got {value}", name)
