"""Tokenizer wrapper, chat templates and the incremental detokenizer (with stop strings).

``Tokenizer`` wraps a transformers fast tokenizer loaded from a Hugging Face directory or a GGUF file (never
with ``trust_remote_code``). ``IncrementalDetokenizer`` turns a stream of generated token ids into text with
the ``tokenizers`` library's ``DecodeStream`` primed with the end of the prompt, so multi-token characters
(emoji, CJK in byte-level BPE, byte fallback in SentencePiece) are emitted whole and leading spaces come out
as they would in context.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

from jinja2 import TemplateSyntaxError
from tokenizers.decoders import DecodeStream

from flotilla.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from flotilla.tokenizer_bounds import LengthBound, length_bound

logger = logging.getLogger(__name__)

logger = logging.getLogger(__name__)

# The detokenizer is primed with the shortest suffix of at least this many prompt tokens (at most
# _MAX_CONTEXT) that decodes to whole characters, so the first generated token is decoded in context.
_INITIAL_OFFSET = 5
_MAX_CONTEXT = 24
_MAX_TAIL = 3  # a prompt may end with up to this many tokens of an unfinished character (UTF-8: 4 bytes)
_REPLACEMENT_CHAR = "\ufffd"
# DecodeStream raises a plain Exception with this text when a tokenizer's decoding is not monotonic (e.g.
# invalid byte-fallback sequences); the stream is then restarted.
_INVALID_PREFIX = "Invalid prefix encountered"


class Tokenizer:
    """A transformers fast tokenizer plus the model's EOS ids.

    Contract: ``vocab_size`` is ``len(tokenizer)`` (added tokens included); ``eos_token_ids`` is the
    tokenizer's EOS id followed by the ids of ``generation_config.json``'s ``eos_token_id`` (int or list)
    when that file sits in the model directory, without duplicates. ``decode`` never cleans up tokenization
    spaces, so it agrees with ``IncrementalDetokenizer``. ``apply_chat_template`` renders the template to
    text and tokenizes it with ``add_special_tokens=False`` (the template writes its own BOS); it raises
    ``InvalidRequestError`` when there is no template or the template rejects the messages.
    ``min_num_tokens(text)`` is a lower bound on ``len(encode(text))`` that never tokenizes (0 when the
    tokenizer admits no provable bound, see ``flotilla.tokenizer_bounds``); ``clone()`` is an independent
    copy for another thread (a fast tokenizer must not be used from two threads at once).
    """

    def __init__(self, hf_tokenizer: Any, extra_eos_token_ids: tuple[int, ...] = ()):
        self.hf_tokenizer = hf_tokenizer
        eos = [hf_tokenizer.eos_token_id] if hf_tokenizer.eos_token_id is not None else []
        self._eos_token_ids = tuple(dict.fromkeys([*eos, *extra_eos_token_ids]))
        self._token_str_cache: dict[tuple[int, bool], str] = {}
        self.length_bound = _length_bound(hf_tokenizer)

    @classmethod
    def from_pretrained(cls, path_or_dir: str, gguf_file: str | None = None, config: Any = None) -> "Tokenizer":
        """Load from a model directory (optionally with ``gguf_file`` inside it) or a path to a .gguf file.

        For a GGUF file, pass the model's transformers ``config`` (flotilla builds it from the file's header
        in milliseconds) to skip AutoTokenizer's own config step, which parses the whole file with the
        ``gguf`` package's reader (seconds; about 9 s for a 150k-token vocabulary) only to pick the
        tokenizer class; the class is then the one AutoTokenizer picks for that config (see
        ``_gguf_tokenizer_class``), and the tokenizer is the same.
        """
        from transformers import AutoTokenizer

        path = os.fspath(path_or_dir)
        if gguf_file is None and os.path.isfile(path) and path.endswith(".gguf"):
            path, gguf_file = os.path.split(os.path.abspath(path))
        if not os.path.exists(path):
            raise ModelNotFoundError(f"tokenizer path {path!r} does not exist")
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer_class = _gguf_tokenizer_class(config, path) if gguf_file and config is not None else None
        try:
            if tokenizer_class is not None:
                hf = tokenizer_class.from_pretrained(path, trust_remote_code=False, **kwargs)
            else:
                hf = AutoTokenizer.from_pretrained(path, trust_remote_code=False, use_fast=True, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {e}") from e
        if not getattr(hf, "is_fast", False):
            raise ModelLoadError(f"the tokenizer at {path!r} is not a fast (tokenizers-backed) tokenizer")
        return cls(hf, _generation_config_eos_ids(path))

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def eos_token_id(self) -> int | None:
        return self.hf_tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf_tokenizer.bos_token_id

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.hf_tokenizer.all_special_ids)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf_tokenizer, "chat_template", None)

    def __len__(self) -> int:
        return self.vocab_size

    def min_num_tokens(self, text: str) -> int:
        """``text`` encodes to at least this many tokens (0 when the tokenizer has no length bound)."""
        return self.length_bound.min_num_tokens(text) if self.length_bound is not None else 0

    def clone(self) -> "Tokenizer":
        """A copy with its own HF tokenizer (same vocabulary, template and EOS ids) for another thread."""
        twin = copy.copy(self)
        twin.hf_tokenizer = copy.deepcopy(self.hf_tokenizer)
        twin._token_str_cache = {}
        return twin

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Token ids of ``text``; with ``max_length``, truncated to that many tokens, special tokens included
        (Hugging Face's ``truncation=True``: the end of the text is cut, the closing special tokens kept)."""
        if max_length is None:
            return list(self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return list(self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens, truncation=True,
                                             max_length=max_length))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)

    def convert_ids_to_tokens(self, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
        """Token strings of ``ids``; ids outside the vocabulary give ""."""
        tokens = self.hf_tokenizer.convert_ids_to_tokens(list(ids), skip_special_tokens=skip_special_tokens)
        return [t if t is not None else "" for t in tokens]

    def decode_token(self, token_id: int, skip_special_tokens: bool = False) -> str:
        """The text of one token on its own (for logprob entries); cached. Out-of-vocabulary ids give ""."""
        key = (token_id, skip_special_tokens)
        text = self._token_str_cache.get(key)
        if text is None:
            text = self.decode([token_id], skip_special_tokens) if 0 <= token_id < self.vocab_size else ""
            self._token_str_cache[key] = text
        return text

    def render_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                             chat_template: str | None = None, **kwargs) -> str:
        """The chat template applied to ``messages``, as text."""
        if chat_template is None and not self.chat_template:
            raise InvalidRequestError("this model's tokenizer has no chat template; pass chat_template",
                                      "chat_template")
        kwargs.pop("tokenize", None)
        kwargs.pop("return_dict", None)
        try:
            rendered = self.hf_tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                tokenize=False, **kwargs)
        except TemplateSyntaxError as e:
            raise InvalidRequestError(f"the chat template is not a valid jinja2 template: {e}",
                                      "chat_template") from e
        except Exception as e:  # jinja2 errors (raise_exception in templates), malformed messages
            raise InvalidRequestError(f"the chat template cannot render these messages: {e}", "messages") from e
        if isinstance(rendered, list):  # a batch of one conversation
            rendered = rendered[0]
        return rendered

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs) -> list[int]:
        """Token ids of the rendered chat template (tokenized with ``add_special_tokens=False``)."""
        text = self.render_chat_template(messages, add_generation_prompt, chat_template, **kwargs)
        return self.encode(text, add_special_tokens=False)


def _gguf_tokenizer_class(config: Any, directory: str) -> type | None:
    """The class AutoTokenizer picks for a GGUF file whose model config is ``config``, or None (then
    AutoTokenizer decides). Without a tokenizer_config.json next to the file (which could name a class) and
    without ``config.tokenizer_class``, AutoTokenizer takes ``TOKENIZER_MAPPING.get(type(config),
    TokenizersBackend)``, with TokenizersBackend for a Mistral-format backend; anything else is left to it.
    tests/test_gguf_tokenizer.py checks the result against AutoTokenizer on both embedded models."""
    try:
        from transformers import TokenizersBackend
        from transformers.models.auto import TOKENIZER_MAPPING
    except ImportError:  # a transformers without these: let AutoTokenizer decide
        return None
    if getattr(config, "tokenizer_class", None) or os.path.exists(os.path.join(directory,
                                                                            "tokenizer_config.json")):
        return None
    tokenizer_class = TOKENIZER_MAPPING.get(type(config), TokenizersBackend)
    if tokenizer_class is None or tokenizer_class.__name__ == "MistralCommonBackend":
        return None
    return tokenizer_class


def _length_bound(hf_tokenizer: Any) -> LengthBound | None:
    """The tokenizer's length bound (flotilla.tokenizer_bounds), found once from its tokenizer.json."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    bound, why = length_bound(json.loads(backend.to_str()))
    if bound is None:
        logger.info("no length bound for this tokenizer (%s): long prompts are tokenized whole", why)
    return bound


def _generation_config_eos_ids(model_dir: str) -> tuple[int, ...]:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return ()
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    if isinstance(eos, int) and not isinstance(eos, bool):
        return (eos,)
    if isinstance(eos, list):
        return tuple(e for e in eos if isinstance(e, int) and not isinstance(e, bool))
    return ()


class IncrementalDetokenizer:
    """Generated token ids -> text, one update at a time, with stop strings.

    Contract: ``update(ids)`` appends tokens and extends ``output_text`` by what they add to the text of the
    whole sequence (``Tokenizer.decode`` of prompt + output, honouring ``skip_special_tokens``); text ending
    in an incomplete character (U+FFFD) is held back until later tokens complete it. The first token's
    leading space is kept as in context (a prompt that ends inside a character: the output starts with the
    text of the tokens that completed it, that character included). Stop strings are searched only where
    the new text could have completed one; on a hit ``output_text`` is truncated before the stop string
    (after it with ``include_stop_str_in_output``) and the stop string is returned. ``get_next_output_text``
    gives the cumulative text or the delta since its last call, holding back the last ``max_stop_len - 1``
    characters while unfinished, so a stop string is never partly streamed.

    Decoding is ``tokenizers.decoders.DecodeStream`` over the tokenizer's Rust backend (one step per update:
    it decodes only the few ids since the last complete character), primed with a short prompt suffix that
    decodes to whole characters (``_prompt_context``). Should the stream find its decoded prefix changed (a
    tokenizer whose decoding is not monotonic, e.g. invalid byte-fallback sequences), it is restarted at the
    current token: text already emitted stays as it was.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.stop_buffer_length = self.max_stop_len - 1 if self.stop else 0
        self._backend = _backend_tokenizer(tokenizer)
        context, tail = _prompt_context(self._backend, prompt_token_ids, skip_special_tokens)
        self._stream = DecodeStream(context, skip_special_tokens=skip_special_tokens)
        if tail:  # the prompt ends inside a character: the output will start with that character
            self._stream.step(self._backend, tail)
        self.output_token_ids: list[int] = []
        self.output_text = ""
        self._last_output_text_offset = 0

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Append ``new_token_ids``; return the stop string that ended the text, else None.

        ``stop_terminated``: the last id is a stop/EOS token that ended the request; its text is not added
        unless ``include_stop_str_in_output``.
        """
        ids = list(new_token_ids)
        if stop_terminated and ids and not self.include_stop_str_in_output:
            ids = ids[:-1]
        if not ids:
            return None
        self.output_token_ids.extend(ids)
        length_before = len(self.output_text)
        self.output_text += self._step(ids)
        new_char_count = len(self.output_text) - length_before
        if not self.stop or new_char_count == 0:
            return None
        hit = find_stop_string(self.output_text, new_char_count, self.stop, self.include_stop_str_in_output)
        if hit is None:
            return None
        stop_str, truncate_to = hit
        self.output_text = self.output_text[:truncate_to]
        return stop_str

    def _step(self, ids: list[int]) -> str:
        """The text ``ids`` add (held back while it ends in an incomplete character)."""
        try:
            return self._stream.step(self._backend, ids if len(ids) > 1 else ids[0]) or ""
        except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            logger.debug("detokenizer: the decoded prefix changed (%s); restarting the stream", e)
            self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
            return self._stream.step(self._backend, ids) or ""

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Cumulative text, or the text added since the previous call when ``delta``."""
        buffer_length = 0 if finished else self.stop_buffer_length
        length = max(len(self.output_text) - buffer_length, 0)
        if not delta:
            return self.output_text[:length]
        last = self._last_output_text_offset
        if last < length:
            self._last_output_text_offset = length
            return self.output_text[last:length]
        return ""

    def decode_token(self, token_id: int) -> str:
        """The text of one token on its own, for logprob entries."""
        return self.tokenizer.decode_token(token_id, skip_special_tokens=False)


def find_stop_string(text: str, new_char_count: int, stop: list[str],
                     include_in_output: bool) -> tuple[str, int] | None:
    """Earliest stop string completed by the last ``new_char_count`` characters of ``text``.

    Returns (stop string, length to truncate ``text`` to) or None. Only occurrences ending inside the new
    tail are considered (earlier ones were checked before); the earliest start wins, then the longest.
    """
    best: tuple[int, int, str] | None = None  # (index, -len, stop string)
    for s in stop:
        index = text.find(s, max(len(text) - new_char_count - len(s) + 1, 0))
        if index != -1 and (best is None or (index, -len(s)) < best[:2]):
            best = (index, -len(s), s)
    if best is None:
        return None
    index, _, stop_str = best
    return stop_str, index + len(stop_str) if include_in_output else index


def _backend_tokenizer(tokenizer: Tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer."""
    backend = getattr(tokenizer.hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"the incremental detokenizer needs a fast (tokenizers-backed) tokenizer, got "
                        f"{type(tokenizer.hf_tokenizer).__name__}")
    return backend


def _prompt_context(backend, prompt_token_ids: list[int], skip_special_tokens: bool) -> tuple[list[int], list[int]]:
    """``(context, tail)``: the prompt's last ``_MAX_TAIL`` tokens at most that end inside a character
    (usually none), and before them the shortest run of at least ``_INITIAL_OFFSET`` prompt tokens (at most
    ``_MAX_CONTEXT``; all of them if fewer) that decodes to whole characters ([] when none does)."""
    for end in range(len(prompt_token_ids), max(len(prompt_token_ids) - _MAX_TAIL, 0) - 1, -1):
        for size in range(min(_INITIAL_OFFSET, end), min(_MAX_CONTEXT, end) + 1):
            context = list(prompt_token_ids[end - size:end])
            if _REPLACEMENT_CHAR not in backend.decode(context, skip_special_tokens=skip_special_tokens):
                return context, list(prompt_token_ids[end:])
    return [], []
