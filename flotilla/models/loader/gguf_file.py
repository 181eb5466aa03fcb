"""Opening GGUF files and reading their metadata, with corrupt files reported as ModelLoadError.

``gguf.GGUFReader`` memory-maps the file and parses the header; tensor data stays on disk until a
tensor is dequantized.
"""

from __future__ import annotations

import os
from typing import Any

from gguf import GGUFReader

from flotilla.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"

# GGUF ``general.architecture`` values flotilla can load. Mistral GGUFs are written as "llama".
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")


def open_gguf(path: str) -> GGUFReader:
    """Open and validate ``path`` (magic, header, tensor extents inside the file).

    Raises ModelLoadError naming the file for a missing, non-GGUF, truncated or corrupt file.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic {magic!r}, expected {GGUF_MAGIC!r}); "
                             f"the file is corrupt or of another format")
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # GGUFReader raises ValueError/IndexError/struct errors on bad bytes
        raise ModelLoadError(f"GGUF file {path} is truncated or corrupt ({size} bytes): cannot parse it "
                             f"({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelLoadError(f"GGUF file {path} is truncated: tensor {t.name!r} ends at byte {end} but "
                                 f"the file has {size} bytes")
    return reader


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """The decoded value of metadata field ``key`` (str, number, bool or list), or ``default``."""
    field = reader.get_field(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception as e:
        raise ModelLoadError(f"GGUF file {reader.data.filename}: metadata field {key!r} is corrupt: {e}") \
            from None


def field_length(reader: GGUFReader, key: str) -> int | None:
    """The number of items of an array field (e.g. ``tokenizer.ggml.tokens``) without decoding them."""
    field = reader.get_field(key)
    return None if field is None else len(field.data)


def gguf_architecture(reader: GGUFReader, path: str) -> str:
    """``general.architecture``, checked against the architectures flotilla supports."""
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"GGUF file {path} has no general.architecture metadata")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(f"GGUF file {path} has architecture {arch!r}; flotilla supports GGUF "
                             f"architectures {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    return arch
