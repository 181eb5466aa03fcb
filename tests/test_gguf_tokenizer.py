"""A GGUF tokenizer loaded with the model's config (``Tokenizer.from_pretrained(..., config=...)``) is the one
``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds: same class, vocabulary, merges, normalizer and
pre-tokenizer (the backend's JSON), special tokens, chat template and encodings.

flotilla passes the config so AutoTokenizer's config step (a whole-file parse with ``gguf.GGUFReader``, only to
pick the class) is skipped; this test fails loudly if transformers changes how it picks the class. The Qwen
case is skipped when its packages are not installed and, with AutoTokenizer's parse of its 150k-token
vocabulary (about 10 s), is marked slow.
"""

from __future__ import annotations

import os

import pytest
from transformers import AutoTokenizer

from flotilla.models.loader import get_alias, load_hf_config, resolve_model
from flotilla.tokenizer import Tokenizer, _gguf_tokenizer_class

TEXT = "Hello world!  12345 def f(x):\n\treturn ünïcödé ✓ 日本語 <|im_end|> <|endoftext|> <s> </s>"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("alias", [
    "smollm2-135m-instruct",
    pytest.param("qwen2.5-coder-0.5b-instruct", marks=pytest.mark.slow),
])
def test_config_path_builds_what_auto_tokenizer_builds(alias):
    if get_alias(alias).locate() is None:
        pytest.skip(f"{alias} is not installed (./scripts/setup.sh)")
    resolved = resolve_model(alias)
    config = load_hf_config(resolved)
    directory, name = os.path.split(resolved.source)
    assert _gguf_tokenizer_class(config, directory) is not None  # the fast path is taken
    ours = Tokenizer.from_pretrained(directory, gguf_file=name, config=config).hf_tokenizer
    theirs = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    assert type(ours) is type(theirs)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    assert ours.special_tokens_map == theirs.special_tokens_map and ours.all_special_ids == theirs.all_special_ids
    assert ours.chat_template == theirs.chat_template and len(ours) == len(theirs)
    assert dict(ours.init_kwargs) == dict(theirs.init_kwargs)
    assert ours(TEXT)["input_ids"] == theirs(TEXT)["input_ids"]
    assert ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_a_tokenizer_config_next_to_the_file_leaves_the_choice_to_auto_tokenizer(tmp_path):
    config = load_hf_config(resolve_model("smollm2-135m-instruct"))
    assert _gguf_tokenizer_class(config, str(tmp_path)) is not None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert _gguf_tokenizer_class(config, str(tmp_path)) is None
