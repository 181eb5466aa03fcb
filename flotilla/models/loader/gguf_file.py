"""Opening GGUF files and reading their metadata, with corrupt files reported as ModelLoadError.

``open_gguf`` parses the header (metadata and tensor table) of a memory-mapped file with ``struct``; tensor
data stays on disk until ``GGUFFile.raw`` is read. Arrays of strings (a vocabulary of 150k tokens, its
merges) are only stepped over at open and decoded when ``field_value`` asks for one, so opening a file
costs milliseconds; ``gguf.GGUFReader``, which builds numpy views of every string, takes seconds to tens of
seconds on a large vocabulary and is not used here. Types and block sizes come from the ``gguf`` package.

Format (little-endian, GGUF v2/v3): magic, version u32, tensor count u64, metadata count u64; metadata
``key string, type u32, value``; then per tensor ``name string, n_dims u32, dims u64[n_dims] (ne0 first),
type u32, offset u64``; tensor data starts at the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import torch
from gguf import GGMLQuantizationType

from flotilla.errors import ModelLoadError
from flotilla.models.loader.gguf_dequant import n_bytes

GGUF_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# GGUF ``general.architecture`` values flotilla can load. Mistral GGUFs are written as "llama".
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")

# metadata value types: fixed-size scalars (struct format), 8 = string, 9 = array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table. ``shape`` is in GGUF order (``ne0``, the row length, first);
    ``data_offset`` is absolute in the file."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The shape in torch (row-major) order: ``reversed(shape)``."""
        return tuple(reversed(self.shape))


@dataclass(frozen=True)
class _StringArray:
    """An array of strings not decoded yet: ``count`` strings from byte ``pos``."""

    pos: int
    count: int


class GGUFFile:
    """A parsed GGUF header over a copy-on-write memory map of the file (never written).

    ``tensors`` lists the tensor table in file order; ``raw(tensor)`` is a uint8 tensor viewing that
    tensor's bytes in the map (read on access). Use ``field_value``/``field_length`` for metadata.
    """

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._buf = memoryview(self._map)
        self.fields: dict[str, Any] = {}
        self.tensors: list[GGUFTensor] = []
        self._parse()

    # --- parsing ------------------------------------------------------------------------------------
    def _unpack(self, fmt: str, pos: int) -> tuple:
        return struct.unpack_from("<" + fmt, self._buf, pos)

    def _string(self, pos: int) -> tuple[str, int]:
        (length,) = self._unpack("Q", pos)
        end = pos + 8 + length
        if end > len(self._buf):
            raise ValueError(f"a string of {length} bytes at byte {pos} runs past the end of the file")
        return str(self._buf[pos + 8:end], "utf-8"), end

    def _parse(self) -> None:
        version, n_tensors, n_fields = self._unpack("IQQ", 4)
        if version not in _VERSIONS:
            raise ValueError(f"GGUF version {version} (flotilla reads little-endian GGUF v2 and v3)")
        pos = 24
        for _ in range(n_fields):
            key, pos = self._string(pos)
            (vtype,) = self._unpack("I", pos)
            if key in self.fields:
                raise ValueError(f"metadata key {key!r} appears twice")
            self.fields[key], pos = self._value(vtype, pos + 4)
        table_end = self._parse_tensor_table(pos, n_tensors)
        alignment = self.fields.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError(f"general.alignment is {alignment!r}")
        data_start = -(-table_end // alignment) * alignment
        self.tensors = [GGUFTensor(t.name, t.tensor_type, t.shape, t.n_elements, t.n_bytes,
                                   data_start + t.data_offset) for t in self.tensors]

    def _value(self, vtype: int, pos: int) -> tuple[Any, int]:
        """One metadata value starting at ``pos`` -> (value, position after it)."""
        if vtype in _SCALAR:
            fmt = _SCALAR[vtype]
            return self._unpack(fmt, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            return self._string(pos)
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype} at byte {pos}")
        etype, count = self._unpack("IQ", pos)
        pos += 12
        if etype in _SCALAR:
            fmt = _SCALAR[etype]
            end = pos + count * struct.calcsize(fmt)
            if end > len(self._buf):
                raise ValueError(f"an array of {count} values at byte {pos} runs past the end of the file")
            return list(struct.unpack_from(f"<{count}{fmt}", self._buf, pos)), end
        if count * 8 > len(self._buf) - pos:  # every element takes at least 8 bytes
            raise ValueError(f"an array of {count} elements at byte {pos} runs past the end of the file")
        if etype == _STRING:  # step over; decoded on request
            start = pos
            for _ in range(count):
                (length,) = self._unpack("Q", pos)
                pos += 8 + length
            if pos > len(self._buf):
                raise ValueError(f"an array of {count} strings at byte {start} runs past the end of the file")
            return _StringArray(start, count), pos
        values = []
        for _ in range(count):  # arrays of arrays
            value, pos = self._value(etype, pos)
            values.append(self._decoded(value))
        return values, pos

    def _parse_tensor_table(self, pos: int, n_tensors: int) -> int:
        if n_tensors * 24 > len(self._buf) - pos:
            raise ValueError(f"a table of {n_tensors} tensors does not fit in the file")
        names = set()
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,) = self._unpack("I", pos)
            if n_dims > 8:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            dims = self._unpack(f"{n_dims}Q", pos + 4)
            ttype, offset = self._unpack("IQ", pos + 4 + 8 * n_dims)
            pos += 16 + 8 * n_dims
            if name in names:
                raise ValueError(f"tensor {name!r} appears twice")
            names.add(name)
            qtype = GGMLQuantizationType(ttype)  # ValueError for an unknown type id
            n_elements = 1
            for d in dims:
                n_elements *= d
            self.tensors.append(GGUFTensor(name, qtype, tuple(dims), n_elements, n_bytes(qtype, n_elements),
                                           offset))
        return pos

    # --- access -------------------------------------------------------------------------------------
    def _decoded(self, value: Any) -> Any:
        if isinstance(value, _StringArray):
            out, pos = [], value.pos
            for _ in range(value.count):
                s, pos = self._string(pos)
                out.append(s)
            return out
        return value

    def field(self, key: str) -> Any:
        """The decoded value of metadata ``key`` (str, int, float, bool or list), or None if absent."""
        return self._decoded(self.fields.get(key))

    def field_length(self, key: str) -> int | None:
        """The number of items of array field ``key`` (without decoding them), or None."""
        value = self.fields.get(key)
        if isinstance(value, _StringArray):
            return value.count
        return len(value) if isinstance(value, list) else None

    def raw(self, tensor: GGUFTensor) -> torch.Tensor:
        """``(n_bytes,)`` uint8: the stored bytes of ``tensor``, a view of the map (do not write to it)."""
        if tensor.n_bytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._map, dtype=torch.uint8, count=tensor.n_bytes, offset=tensor.data_offset)


def open_gguf(path: str) -> GGUFFile:
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
        reader = GGUFFile(path)
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError, OSError) as e:
        raise ModelLoadError(f"GGUF file {path} is truncated or corrupt ({size} bytes): cannot parse it "
                             f"({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise ModelLoadError(f"GGUF file {path} is truncated: tensor {t.name!r} ends at byte {end} but "
                                 f"the file has {size} bytes")
    return reader


def field_value(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """The decoded value of metadata field ``key`` (str, number, bool or list), or ``default``."""
    try:
        value = reader.field(key)
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise ModelLoadError(f"GGUF file {reader.path}: metadata field {key!r} is corrupt: {e}") from None
    return default if value is None else value


def field_length(reader: GGUFFile, key: str) -> int | None:
    """The number of items of an array field (e.g. ``tokenizer.ggml.tokens``) without decoding them."""
    return reader.field_length(key)


def gguf_architecture(reader: GGUFFile, path: str) -> str:
    """``general.architecture``, checked against the architectures flotilla supports."""
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"GGUF file {path} has no general.architecture metadata")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(f"GGUF file {path} has architecture {arch!r}; flotilla supports GGUF "
                             f"architectures {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    return arch
