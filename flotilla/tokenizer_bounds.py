"""A provable lower bound on the number of tokens a text encodes to, from its length alone.

If no token of a tokenizer ever stands for more than ``L`` characters of the text it came from, a text of
``c`` characters encodes to at least ``ceil(c / L)`` tokens, so a prompt that cannot fit a context can be
rejected before it is tokenized (the work of tokenizing is then bounded by ``max_model_len * L``).

``length_bound(spec)`` finds ``L`` from a ``tokenizer.json`` description (``tokenizers``' own
serialization) and returns None whenever a step of the pipeline could drop text or let one token stand for
an unbounded run of it, so the bound never rejects a text that would fit:

- model: BPE over bytes (a ``ByteLevel`` pre-tokenizer, or ``byte_fallback`` with a ``<0xNN>`` token for
  every byte UTF-8 uses), or Unigram with ``byte_fallback``: every character is covered by tokens, none
  becomes a fused unknown token. A byte-level BPE silently drops the bytes its vocabulary lacks (SmolLM2's
  lacks six ASCII control characters): such characters are not counted (``dropped``); a missing
  continuation byte (0x80-0xBF), or dropped characters behind a normalizer: None. WordPiece, WordLevel and
  character-level BPE with an unknown token: None.
- ``L`` is the longest token string of the vocabulary, added tokens included (a byte-level token string has
  one symbol per byte, at least one byte per character; a ``<0xNN>`` token covers one byte). Added tokens
  that strip surrounding whitespace (``lstrip``/``rstrip``) cover unbounded runs: None.
- normalizers that never shorten text (NFD, NFKD, Lowercase, Prepend, Replace by a string at least as long)
  keep ``L``; NFC and NFKC compose at most ``MAX_CANONICAL_DECOMPOSITION`` characters into one, so ``L`` is
  multiplied by it; a Replace by a shorter string multiplies it by the ratio; anything else (Strip,
  StripAccents, BertNormalizer, Precompiled, regex replacements): None.
- pre-tokenizers that only split or map (ByteLevel, Metaspace, Digits, UnicodeScripts, Split and Punctuation
  without the "removed" behaviour) are fine; those that drop whitespace or delimiters: None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The longest canonical decomposition of one code point (e.g. U+1F82 -> 4 code points); NFC/NFKC can
# therefore compose at most this many characters into one. tests/test_token_bounds.py checks it.
MAX_CANONICAL_DECOMPOSITION = 4

# The byte values valid UTF-8 can contain (0xC0, 0xC1 and 0xF5-0xFF never occur): text is a str, so only
# these must have a token.
UTF8_BYTES = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]

_KEEP_LENGTH_NORMALIZERS = {"NFD", "NFKD", "Lowercase", "Prepend"}
_COMPOSING_NORMALIZERS = {"NFC", "NFKC"}
_SPLITTING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"}
_BEHAVIOUR_PRE_TOKENIZERS = {"Split", "Punctuation"}


@dataclass(frozen=True)
class LengthBound:
    """No token stands for more than ``max_chars_per_token`` characters of a text; the characters in
    ``dropped`` get no token at all."""

    max_chars_per_token: int
    dropped: str = ""

    def min_num_tokens(self, text: str) -> int:
        """A lower bound on the token count of ``text`` (O(len(text)) only when ``dropped`` is not empty)."""
        n = len(text)
        if self.dropped and n:
            n -= sum(text.count(c) for c in self.dropped)
        return -(-n // self.max_chars_per_token)


def length_bound(spec: dict) -> tuple[LengthBound | None, str]:
    """(bound, why) for a parsed tokenizer.json; the bound is None when none is sound (``why`` says why)."""
    factor, why = _normalizer_factor(spec.get("normalizer"))
    if factor is None:
        return None, why
    pre = spec.get("pre_tokenizer")
    why = _pre_tokenizer_problem(pre)
    if why:
        return None, why
    model = spec.get("model") or {}
    vocab = _vocab_strings(model)
    dropped, why = _model_dropped(model, vocab, _has_byte_level(pre))
    if why:
        return None, why
    if dropped and spec.get("normalizer") is not None:
        return None, "a normalizer in front of a vocabulary that drops characters"
    added = spec.get("added_tokens") or []
    if any(a.get("lstrip") or a.get("rstrip") for a in added):
        return None, "an added token strips surrounding whitespace"
    longest = max([len(s) for s in vocab] + [len(a.get("content", "")) for a in added], default=0)
    if longest < 1:
        return None, "empty vocabulary"
    return LengthBound(longest * factor, dropped), (f"longest token {longest} characters, normalizer factor "
                                                     f"{factor}, {len(dropped)} characters dropped")


def _normalizer_factor(norm: dict | None) -> tuple[int | None, str]:
    """How many input characters one normalized character may stand for (None: unbounded)."""
    if norm is None:
        return 1, ""
    kind = norm.get("type")
    if kind == "Sequence":
        factor = 1
        for step in norm.get("normalizers", []):
            f, why = _normalizer_factor(step)
            if f is None:
                return None, why
            factor *= f
        return factor, ""
    if kind in _KEEP_LENGTH_NORMALIZERS:
        return 1, ""
    if kind in _COMPOSING_NORMALIZERS:
        return MAX_CANONICAL_DECOMPOSITION, ""
    if kind == "Replace":
        pattern, content = norm.get("pattern") or {}, norm.get("content", "")
        if "String" not in pattern:
            return None, "a regex Replace normalizer"
        if not content:
            return None, "a Replace normalizer that deletes text"
        return max(1, math.ceil(len(pattern["String"]) / len(content))), ""
    return None, f"the {kind} normalizer can drop text"


def _pre_tokenizer_problem(pre: dict | None) -> str:
    if pre is None:
        return ""
    kind = pre.get("type")
    if kind == "Sequence":
        return next((why for p in pre.get("pretokenizers", []) if (why := _pre_tokenizer_problem(p))), "")
    if kind in _SPLITTING_PRE_TOKENIZERS:
        return ""
    if kind in _BEHAVIOUR_PRE_TOKENIZERS and str(pre.get("behavior", "")).lower() != "removed":
        return ""
    return f"the {kind} pre-tokenizer can drop text"


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character table (what a ByteLevel pre-tokenizer maps each byte to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


_BYTE_SYMBOLS = _byte_symbols()


def _has_byte_level(pre: dict | None) -> bool:
    if pre is None:
        return False
    if pre.get("type") == "Sequence":
        return any(_has_byte_level(p) for p in pre.get("pretokenizers", []))
    return pre.get("type") == "ByteLevel"


def _vocab_strings(model: dict) -> list[str]:
    vocab = model.get("vocab") or {}
    if isinstance(vocab, dict):
        return list(vocab)
    return [entry[0] for entry in vocab]  # Unigram: [[piece, score], ...]


def _model_dropped(model: dict, vocab: list[str], byte_level: bool) -> tuple[str, str]:
    """(characters the model drops, problem) -- a non-empty problem means no bound."""
    kind = model.get("type")
    if kind not in ("BPE", "Unigram"):
        return "", f"a {kind} model can map a long unknown word to one token"
    have = set(vocab)
    if model.get("byte_fallback"):
        missing = [b for b in UTF8_BYTES if f"<0x{b:02X}>" not in have]
        return "", f"byte_fallback without the byte token <0x{missing[0]:02X}>" if missing else ""
    if kind == "BPE" and byte_level:
        missing = [b for b in UTF8_BYTES if _BYTE_SYMBOLS[b] not in have]
        if any(0x80 <= b < 0xC0 for b in missing):
            return "", "a byte-level vocabulary without a UTF-8 continuation byte"
        # A character loses only its missing bytes; one with no byte left (an ASCII byte) is dropped.
        return "".join(chr(b) for b in missing if b < 0x80), ""
    return "", f"a {kind} model without byte fallback turns unknown characters into unknown tokens"
