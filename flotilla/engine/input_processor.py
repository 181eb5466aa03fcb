"""Turns a user's prompt and SamplingParams into validated engine requests (tokenize, check limits)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import SamplingParams
from flotilla.structured.grammar import validate_structured
from flotilla.tokenizer import Tokenizer

PromptType = str | list[int] | dict


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams  # validated, with max_tokens and eos ids filled in
    cache_salt: str | None = None  # the prompt dict's "cache_salt": prefix-cache blocks shared only within it


class InputProcessor:
    """Validates requests before they reach the scheduler, so a bad request never disturbs others.

    Contract: ``process`` returns a prompt whose token ids are all in ``[0, vocab_size)`` and whose
    ``len(prompt) + max_tokens <= max_model_len`` (``max_tokens`` None becomes the rest of the context, which
    must hold ``min_tokens``: EOS is suppressed until then); anything else raises ``InvalidRequestError`` naming the
    problem (the context-length message names the limit, the prompt tokens and max_tokens; ``param`` names
    the request field the prompt came from, "prompt" unless told). ``precheck`` (which ``process`` runs
    first) validates the params and rejects a prompt that provably cannot fit (token ids by their count,
    text by ``Tokenizer.min_num_tokens``) without tokenizing it, so the text ``process`` tokenizes is at
    most about ``max_model_len`` times the tokenizer's longest token; it never rejects a prompt that would
    fit; a ``structured_outputs`` spec its grammar backend (``structured_backend``, or the spec's own) rejects is
    an ``InvalidRequestError`` too, and the processed params name the backend that serves it. ``clone()`` is
    an equivalent processor with its own tokenizer copy (for another thread). A prompt dict may carry
    ``cache_salt`` (a non-empty string, as in vLLM): requests share prefix-cache blocks only with requests of
    the same salt (or, unsalted, with unsalted ones).
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, structured_backend: str = "auto"):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.structured_backend = structured_backend

    def clone(self) -> "InputProcessor":
        return InputProcessor(self.tokenizer.clone(), self.vocab_size, self.max_model_len, self.structured_backend)

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'", "prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", "prompt")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise InvalidRequestError("the prompt encodes to no tokens", "prompt")
            return prompt, ids
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(prompt)
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}",
                                  "prompt")

    def _check_ids(self, ids) -> list[int]:
        ids = list(ids)
        if not ids:
            raise InvalidRequestError("the prompt is empty (no token ids)", "prompt")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise InvalidRequestError(f"prompt token ids must be integers, got {t!r}", "prompt")
            if t < 0 or t >= self.vocab_size:
                raise InvalidRequestError(
                    f"prompt token id {t} is outside the vocabulary [0, {self.vocab_size})", "prompt")
        return ids

    def precheck(self, prompt: PromptType, params: SamplingParams, param: str = "prompt") -> None:
        """Validate ``params`` and reject ``prompt`` if it provably cannot fit (see the contract)."""
        params.validate()
        if params.structured_outputs is not None:
            validate_structured(params.structured_outputs, backend=self.structured_backend)
        if isinstance(prompt, dict):
            salt = prompt.get("cache_salt")
            if salt is not None and (not isinstance(salt, str) or not salt):
                raise InvalidRequestError("cache_salt must be a non-empty string", "cache_salt")
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if isinstance(prompt, str):
            self._check_fits(self.tokenizer.min_num_tokens(prompt), params, param, at_least=True)
        elif isinstance(prompt, (list, tuple)):
            self._check_fits(len(prompt), params, param)

    def _check_fits(self, n: int, params: SamplingParams, param: str, at_least: bool = False) -> None:
        """InvalidRequestError unless a prompt of ``n`` tokens (at least ``n`` when ``at_least``) leaves room
        for ``params.max_tokens`` (when None: for one token, and for ``min_tokens``)."""
        some = "at least " if at_least else ""
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{some}{n} tokens, leaving no room for the completion.", param)
        max_tokens = params.max_tokens
        if max_tokens is not None and n + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{some}{n + max_tokens} tokens ({some}{n} in the prompt, {max_tokens} for the completion "
                f"(max_tokens)). Please reduce the prompt or max_tokens.", "max_tokens")
        room = self.max_model_len - n
        if max_tokens is None and params.min_tokens > room:
            raise InvalidRequestError(
                f"min_tokens ({params.min_tokens}) is more than the context has room for: this model's maximum "
                f"context length is {self.max_model_len} tokens and the prompt has {some}{n} tokens, leaving "
                f"{'at most ' if at_least else ''}{room} for the completion.", "min_tokens")

    def process(self, prompt: PromptType, params: SamplingParams, param: str = "prompt") -> ProcessedPrompt:
        self.precheck(prompt, params, param)
        text, ids = self.tokenize(prompt)
        n = len(ids)
        self._check_fits(n, params, param)
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - n
        for t in params.stop_token_ids:
            if t >= self.vocab_size:
                raise InvalidRequestError(f"stop token id {t} is outside the vocabulary", "stop_token_ids")
        for name in ("logit_bias", "allowed_token_ids"):
            for t in getattr(params, name) or ():
                if t >= self.vocab_size:
                    raise InvalidRequestError(f"{name}: token id {t} is outside the vocabulary [0, "
                                              f"{self.vocab_size})", name)
        eos = () if params.ignore_eos else tuple(self.tokenizer.eos_token_ids)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        bad = self.bad_words_token_ids(params.bad_words) if params.bad_words else None
        so = params.structured_outputs
        if so is not None:  # the backend that serves it (validated by precheck; the verdict is memoised)
            so = dataclasses.replace(so, backend=validate_structured(so, backend=self.structured_backend))
        return ProcessedPrompt(text, ids, params.clone(max_tokens=max_tokens, eos_token_ids=eos,
                                                       bad_words_token_ids=bad, structured_outputs=so), salt)

    def bad_words_token_ids(self, bad_words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of ``bad_words``: each word stripped of leading spaces, as is and, when that
        gives a different first token and as many tokens, with one leading space."""
        out: list[list[int]] = []
        for word in bad_words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            for seq in (plain, spaced) if spaced[:1] != plain[:1] and len(spaced) == len(plain) else (plain,):
                if any(t >= self.vocab_size for t in seq):
                    raise InvalidRequestError(f"bad word {word!r} has tokens outside the model's vocabulary",
                                              "bad_words")
                out.append(seq)
        return out
