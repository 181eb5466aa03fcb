"""flotilla's GGUF header reader (``gguf_file.GGUFFile``) against the ``gguf`` package's ``GGUFReader``.

A small file written with ``gguf.GGUFWriter`` holds every metadata value type (scalars, strings, arrays of
numbers, of strings, of arrays) and tensors of several types and alignments; every field and every tensor
table entry must read as GGUFReader reads it. Corrupt headers are ModelLoadErrors naming the file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from flotilla.errors import ModelLoadError
from flotilla.models.loader.gguf_file import field_length, field_value, open_gguf

V = GGUFValueType


def _write(path: str, alignment: int | None = None) -> None:
    w = GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_uint32("general.alignment", alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-6)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓ <|im_end|>")
    w.add_string("t.empty", "")
    w.add_array("t.tokens", ["<s>", "", "Ġthe", "日本", "\n"] * 7)
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.empty_array", [])
    w.add_key_value("t.nested", [[1, 2], [3]], V.ARRAY, V.ARRAY)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 5)).astype(np.float32))
    q = quantize(rng.standard_normal((4, 64)).astype(np.float32), T.Q8_0)
    w.add_tensor("b.weight", q, raw_dtype=T.Q8_0)  # byte shape (4, 68): 4 rows of 64 values
    w.add_tensor("c.bias", rng.standard_normal(7).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])  # 64: the data section starts at a multiple of 64
def test_header_reads_as_gguf_reader_reads_it(tmp_path, alignment):
    path = str(tmp_path / "all.gguf")
    _write(path, alignment)
    ours, theirs = open_gguf(path), GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for key in keys:
        if key != "t.nested":
            assert field_value(ours, key) == theirs.fields[key].contents(), key
    assert field_value(ours, "t.nested") == [[1, 2], [3]]  # GGUFReader flattens arrays of arrays: [1, 2, 3]
    assert field_length(ours, "t.tokens") == 35 and field_length(ours, "t.str") is None
    assert field_value(ours, "t.missing", "x") == "x"
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.shape, a.n_elements, a.n_bytes, a.data_offset) == \
            (b.tensor_type, tuple(b.shape.tolist()), b.n_elements, b.n_bytes, b.data_offset)
        assert a.torch_shape == tuple(reversed(b.shape.tolist()))
        assert ours.raw(a).numpy().tobytes() == b.data.tobytes()


def test_tensor_data_are_not_writable_through_a_copy(tmp_path):
    path = str(tmp_path / "t.gguf")
    _write(path)
    before = open(path, "rb").read()
    reader = open_gguf(path)
    reader.raw(reader.tensors[0]).fill_(0)  # a private (copy-on-write) map: the file never changes
    assert open(path, "rb").read() == before
    assert torch.count_nonzero(open_gguf(path).raw(reader.tensors[0])) > 0


@pytest.mark.parametrize("damage, match", [
    (lambda d: d[:40], "truncated or corrupt"),
    (lambda d: d[:4] + (7).to_bytes(4, "little") + d[8:], "GGUF version 7"),
    (lambda d: d[:16] + (2**40).to_bytes(8, "little") + d[24:], "truncated or corrupt"),  # field count
    (lambda d: d[:8] + (2**40).to_bytes(8, "little") + d[16:], "truncated or corrupt"),   # tensor count
    (lambda d: d[: len(d) - 24], "truncated: tensor 'c.bias'"),  # its 14 bytes + 18 of padding
])
def test_corrupt_header_is_a_model_load_error(tmp_path, damage, match):
    good = str(tmp_path / "good.gguf")
    _write(good)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(open(good, "rb").read()))
    with pytest.raises(ModelLoadError, match=f"bad.gguf.*{match}"):
        open_gguf(str(bad))
