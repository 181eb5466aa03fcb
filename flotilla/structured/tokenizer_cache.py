"""One model's tokenizer as the grammar engines see it, cached on disk under the flotilla cache dir.

Contract: ``TokenizerAssets(source, source_kind, vocab_size, hf_config=...)`` stands for the tokenizer of a
model (a Hugging Face directory or a GGUF file, whose tokenizer loads faster given the model's config) with
``vocab_size`` logits. ``key`` names it without loading it: the sha256 of the tokenizer files' contents for a
directory (the tiny test models that copy one tokenizer share an entry), of the file's real path, size and
modification time for a GGUF file (its vocabulary sits inside weights of hundreds of MB), together with
``vocab_size`` and the transformers version that converts it. ``xgrammar_info()`` is the
``xgrammar.TokenizerInfo`` (stop tokens: the tokenizer's EOS ids) and ``llguidance_tokenizer()`` the
``llguidance.LLTokenizer`` (same vocabulary size and EOS ids); each is built once per process. On a cache
miss the Hugging Face tokenizer is loaded once and both tables are built (about 1 s for SmolLM2, 3.5 s for
Qwen2.5-Coder's 152k tokens) and written, atomically, to ``<cache_dir>/structured/<key>/``; a hit reads the
xgrammar table back without transformers (30 ms for SmolLM2, 85 ms for Qwen2.5-Coder). A missing, unreadable
or stale (other xgrammar version) entry is rebuilt, never a failure. ``is_cached()`` tells whether the entry
is complete.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flotilla import envs

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when what an entry holds changes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")
_TOKENIZER_JSON = "tokenizer.json"  # the tokenizers (Rust) JSON, no padding or truncation
_EOS_JSON = "eos.json"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def _xgrammar_file() -> str:
    return f"xgrammar-{_version('xgrammar')}.json"


class TokenizerAssets:
    """See the module contract."""

    def __init__(self, source: str, source_kind: str, vocab_size: int, cache_root: str | None = None,
                 hf_config: Any = None):
        self.source = source
        self.source_kind = source_kind
        self.vocab_size = vocab_size
        self.hf_config = hf_config  # the model's transformers config: spares a GGUF tokenizer a parse of the file
        self._root = cache_root or os.path.join(envs.cache_dir(), "structured")
        self._lock = threading.Lock()
        self._key: str | None = None
        self._xgrammar = None
        self._llguidance = None

    @property
    def key(self) -> str:
        if self._key is None:
            h = hashlib.sha256(f"flotilla-structured/{FORMAT}/{self.vocab_size}/"
                               f"transformers-{_version('transformers')}/{self.source_kind}/".encode())
            if self.source_kind == "gguf":
                st = os.stat(self.source)
                h.update(f"{os.path.realpath(self.source)}/{st.st_size}/{st.st_mtime_ns}".encode())
            else:
                for name in TOKENIZER_FILES:
                    path = os.path.join(self.source, name)
                    if os.path.isfile(path):
                        h.update(f"{name}/{os.path.getsize(path)}/".encode())
                        with open(path, "rb") as f:
                            h.update(f.read())
            self._key = h.hexdigest()[:32]
        return self._key

    @property
    def entry_dir(self) -> str:
        return os.path.join(self._root, self.key)

    def is_cached(self) -> bool:
        return all(os.path.isfile(os.path.join(self.entry_dir, n)) for n in (_xgrammar_file(), _TOKENIZER_JSON,
                                                                            _EOS_JSON))

    def xgrammar_info(self):
        with self._lock:
            if self._xgrammar is None:
                import xgrammar

                text = self._read(_xgrammar_file())
                try:
                    self._xgrammar = xgrammar.TokenizerInfo.deserialize_json(text)
                except Exception as e:  # a corrupt or foreign entry: rebuild it
                    logger.warning("rebuilding the cached xgrammar tokenizer info in %s: %s", self.entry_dir, e)
                    self._build()
                    self._xgrammar = xgrammar.TokenizerInfo.deserialize_json(self._read(_xgrammar_file()))
            return self._xgrammar

    def llguidance_tokenizer(self):
        with self._lock:
            if self._llguidance is None:
                import llguidance

                text = self._read(_TOKENIZER_JSON)
                eos = json.loads(self._read(_EOS_JSON))["eos_token_ids"]
                self._llguidance = llguidance.LLTokenizer(text, n_vocab=self.vocab_size, eos_token=eos or None)
            return self._llguidance

    def _read(self, name: str) -> str:
        """The entry's file ``name``, building the entry first when it is incomplete."""
        if not self.is_cached():
            self._build()
        with open(os.path.join(self.entry_dir, name), encoding="utf-8") as f:
            return f.read()

    def _build(self) -> None:
        """Load the Hugging Face tokenizer and write the entry (each file atomically: readers in other processes
        see a whole file or none)."""
        import xgrammar

        tok = load_hf_tokenizer(self.source, self.source_kind, self.hf_config)
        eos = list(tok.eos_token_ids)
        backend = copy.copy(tok.hf_tokenizer.backend_tokenizer)  # as llguidance.hf.from_tokenizer does
        backend.no_padding()
        backend.no_truncation()
        info = xgrammar.TokenizerInfo.from_huggingface(tok.hf_tokenizer, vocab_size=self.vocab_size,
                                                       stop_token_ids=eos)
        os.makedirs(self.entry_dir, exist_ok=True)
        _write(os.path.join(self.entry_dir, _TOKENIZER_JSON), backend.to_str())
        _write(os.path.join(self.entry_dir, _EOS_JSON), json.dumps({"eos_token_ids": eos}))
        _write(os.path.join(self.entry_dir, _xgrammar_file()), info.serialize_json())
        logger.info("cached the grammar engines' tokenizer of %s in %s", self.source, self.entry_dir)


def load_hf_tokenizer(source: str, source_kind: str, hf_config: Any = None) -> Any:
    """flotilla's ``Tokenizer`` of a model (the path a cache hit skips)."""
    from flotilla.tokenizer import Tokenizer

    if source_kind == "gguf":
        return Tokenizer.from_pretrained(os.path.dirname(source), gguf_file=os.path.basename(source),
                                         config=hf_config)
    return Tokenizer.from_pretrained(source)


def _write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
