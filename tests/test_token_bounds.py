"""The lower bound on a text's token count (flotilla.tokenizer_bounds): sound for the tokenizers it accepts,
refused for those it cannot prove, and used by the input processor to reject a prompt that cannot fit
before tokenizing it, never one that would fit."""

from __future__ import annotations

import json
import random
import sys
import unicodedata

import pytest
from tokenizers import Regex, Tokenizer as RawTokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from flotilla.engine.input_processor import InputProcessor
from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import SamplingParams
from flotilla.tokenizer import Tokenizer
from flotilla.tokenizer_bounds import _BYTE_SYMBOLS, MAX_CANONICAL_DECOMPOSITION, length_bound

SMOLLM2_DROPPED = "\x04\x06\x13\x14\x16\x1d"  # byte symbols SmolLM2's vocabulary lacks


@pytest.fixture(scope="module")
def smol(smollm2_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(smollm2_tokenizer_dir)


def adversarial_texts(tok: Tokenizer, seed: int = 0) -> list[str]:
    """Texts that pack many characters into few tokens, drop characters, or mix scripts."""
    rng = random.Random(seed)
    vocab = tok.hf_tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    longest = sorted(vocab, key=len)[-20:]
    decoded = [tok.hf_tokenizer.convert_tokens_to_string([t]) for t in longest]
    alphabet = ["a", " ", "\n", "#", "=", "é", "中", "😀", "e\u0301", "\t", *SMOLLM2_DROPPED, "<|im_start|>"]
    texts = [d * 7 for d in decoded] + ["".join(decoded), "\x04" * 500, "\x04a" * 300, " " * 4000, "\n" * 3000]
    for _ in range(100):
        pieces = rng.choices(alphabet + decoded, k=rng.randint(1, 60))
        texts.append("".join(p * rng.randint(1, 20) for p in pieces))
    return texts


def test_canonical_decomposition_is_at_most_four_characters():
    longest = max(len(unicodedata.normalize("NFD", chr(c))) for c in range(sys.maxunicode + 1)
                  if not 0xD800 <= c < 0xE000)
    assert longest == MAX_CANONICAL_DECOMPOSITION


def test_byte_symbol_table_is_the_byte_level_pre_tokenizers():
    assert set(_BYTE_SYMBOLS) == set(pre_tokenizers.ByteLevel.alphabet())
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in ["a", " ", "\n", "é", "中", "😀", "\x04"]:
        (piece, _), = pre.pre_tokenize_str(text)
        assert piece == "".join(_BYTE_SYMBOLS[b] for b in text.encode()), text


def test_smollm2_bound_is_sound(smol):
    bound = smol.length_bound
    assert bound is not None and bound.max_chars_per_token >= 16 and bound.dropped == SMOLLM2_DROPPED
    assert smol.encode("\x04" * 50) == []  # why dropped characters must not count
    for text in adversarial_texts(smol):
        for special in (True, False):
            assert smol.min_num_tokens(text) <= len(smol.encode(text, add_special_tokens=special)), text[:80]


def test_sentencepiece_style_bound_is_sound():
    """Llama 2 / Mistral style: Metaspace pieces, byte fallback for every byte."""
    from transformers import LlamaTokenizer
    raw = _trained(models.BPE(unk_token="<unk>"), pre_tokenizers.Metaspace(replacement="\u2581",
                                                                           prepend_scheme="first", split=False))
    model = _spec(raw)["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(LlamaTokenizer(vocab=vocab, merges=merges))
    assert tok.length_bound is not None and tok.length_bound.dropped == ""
    for text in adversarial_texts(tok, seed=2) + ["the quick brown fox jumps over the lazy dog " * 30]:
        assert tok.min_num_tokens(text) <= len(tok.encode(text)), text[:80]


def test_clone_is_an_equivalent_independent_tokenizer(smol):
    twin = smol.clone()
    assert twin.hf_tokenizer is not smol.hf_tokenizer and twin.length_bound == smol.length_bound
    for text in adversarial_texts(smol, seed=1)[:20]:
        assert twin.encode(text) == smol.encode(text)
    assert twin.eos_token_ids == smol.eos_token_ids and twin.chat_template == smol.chat_template


def _spec(raw: RawTokenizer) -> dict:
    return json.loads(raw.to_str())


def _trained(model, pre=None, norm=None, byte_alphabet: bool = False, special=("<unk>",)) -> RawTokenizer:
    raw = RawTokenizer(model)
    if pre is not None:
        raw.pre_tokenizer = pre
    if norm is not None:
        raw.normalizer = norm
    kwargs = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()} if byte_alphabet else {}
    trainer = (trainers.BpeTrainer(vocab_size=300, special_tokens=list(special), **kwargs)
               if isinstance(model, models.BPE) else
               trainers.WordPieceTrainer(vocab_size=300, special_tokens=list(special)))
    raw.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return raw


def test_pipelines_that_can_drop_or_fuse_text_have_no_bound():
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    cases = {
        "WordPiece": _trained(models.WordPiece(unk_token="<unk>"), pre_tokenizers.Digits()),
        "Whitespace": _trained(models.BPE(unk_token="<unk>"), pre_tokenizers.WhitespaceSplit()),
        "char BPE with unk": _trained(models.BPE(unk_token="<unk>", fuse_unk=True)),
        "Strip": _trained(models.BPE(), byte_level, normalizers.Strip(), byte_alphabet=True),
        "deleting Replace": _trained(models.BPE(), byte_level, normalizers.Replace("x", ""), byte_alphabet=True),
        "regex Replace": _trained(models.BPE(), byte_level, normalizers.Replace(Regex(" +"), " "),
                                  byte_alphabet=True),
        "removed Split": _trained(models.BPE(), pre_tokenizers.Sequence(
            [pre_tokenizers.Split(" ", "removed"), byte_level]), byte_alphabet=True),
    }
    for name, raw in cases.items():
        bound, why = length_bound(_spec(raw))
        assert bound is None and why, name
    raw = _trained(models.BPE(), byte_level, byte_alphabet=True)
    spec = _spec(raw)
    spec["added_tokens"].append({"id": 999, "content": "<mask>", "single_word": False, "lstrip": True,
                                 "rstrip": False, "normalized": False, "special": True})
    assert length_bound(spec)[0] is None
    spec = _spec(raw)
    spec["model"]["vocab"].pop(_BYTE_SYMBOLS[0x85])  # a continuation byte: characters could vanish whole
    assert length_bound(spec)[0] is None


def test_normalizer_factors():
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain = length_bound(_spec(_trained(models.BPE(), byte_level, byte_alphabet=True)))[0]
    nfc = length_bound(_spec(_trained(models.BPE(), byte_level, normalizers.NFC(), byte_alphabet=True)))[0]
    halve = length_bound(_spec(_trained(models.BPE(), byte_level, normalizers.Replace("  ", " "),
                                        byte_alphabet=True)))[0]
    assert plain.max_chars_per_token >= 1 and plain.dropped == ""
    assert nfc.max_chars_per_token == MAX_CANONICAL_DECOMPOSITION * plain.max_chars_per_token
    assert halve.max_chars_per_token == 2 * plain.max_chars_per_token
    tok = Tokenizer(PreTrainedTokenizerFast(
        tokenizer_object=_trained(models.BPE(), byte_level, normalizers.NFC(), byte_alphabet=True)))
    for text in ["e\u0301" * 400, "\u1100\u1161\u11a8" * 300, "\u03b1\u0313\u0300\u0345" * 200, "the fox " * 90]:
        assert tok.min_num_tokens(text) <= len(tok.encode(text))


def test_input_processor_rejects_what_cannot_fit_and_never_what_fits(smol):
    limit = 512
    proc = InputProcessor(smol, smol.vocab_size, limit)
    bound = smol.length_bound.max_chars_per_token
    huge = "The quick brown fox. " * 500_000  # 10 MB: rejected by the bound, so never tokenized
    with pytest.raises(InvalidRequestError) as info:
        proc.process(huge, SamplingParams(max_tokens=4))
    assert info.value.param == "prompt" and "at least" in info.value.message and "512" in info.value.message
    with pytest.raises(InvalidRequestError) as info:
        proc.precheck({"prompt": huge}, SamplingParams(max_tokens=4), "messages")
    assert info.value.param == "messages"
    # Text as dense as the vocabulary allows: the most characters per token, still fitting.
    vocab = smol.hf_tokenizer.backend_tokenizer.get_vocab()
    densest = smol.hf_tokenizer.convert_tokens_to_string([max(vocab, key=len)])
    per_token = len(smol.encode(densest * 3, add_special_tokens=False)) / 3
    dense = densest * int((limit - 8) / per_token)
    assert len(dense) > limit * bound / 2
    processed = proc.process(dense, SamplingParams(max_tokens=4))
    assert len(processed.prompt_token_ids) + 4 <= limit
    # Token ids past the limit are rejected by their count, before each id is checked.
    with pytest.raises(InvalidRequestError) as info:
        proc.process(["not an id"] * limit, SamplingParams(max_tokens=4))
    assert "512" in info.value.message
