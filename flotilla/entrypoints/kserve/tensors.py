"""Tensor encodings of the KServe v2 / Open Inference Protocol: pure functions between numpy and the wire.

Three encodings, all row-major (C order):
- raw bytes (Triton's binary tensor extension over HTTP, ``raw_input_contents`` / ``raw_output_contents`` over
  gRPC): fixed-size types little-endian, BOOL one byte per element, BYTES as each element's 4-byte
  little-endian length followed by its bytes (``serialize_bytes`` / ``deserialize_bytes``, the format of
  ``tritonclient.utils.serialize_byte_tensor``);
- JSON ``data``: a flat or nested list of numbers (BOOL: ``true``/``false``; BYTES: strings, utf-8 encoded);
- gRPC typed ``contents`` (``bool_contents``, ``int_contents``, ...): a flat sequence of Python values.

Contracts: every decoder returns an array of exactly ``shape`` in the datatype's numpy form
(``repository.dtypes``: BYTES -> object array of ``bytes``, BF16 -> ml_dtypes.bfloat16) or raises
``InferError("INVALID_ARG", ...)`` with Triton's message (byte size mismatch, string element count, element
byte size indicator past the buffer's end) naming the input and the model. Encoders never fail on a valid
array, except ``to_json_data`` for BYTES elements that are not UTF-8 (JSON cannot carry them: the message asks
for ``binary_data``).
"""

from __future__ import annotations

import math
import struct
from typing import Any, Sequence

import numpy as np

from flotilla.errors import InvalidRequestError
from flotilla.repository import dtypes
from flotilla.repository.errors import InferError, invalid_arg

_LENGTH = struct.Struct("<I")
_INT_KINDS = "iu"


def triton_type(datatype: Any, name: str) -> dtypes.TritonType:
    """The type of a request's ``datatype`` string; INVALID_ARG naming the input and the valid names."""
    try:
        return dtypes.from_v2(datatype)
    except InvalidRequestError:
        raise invalid_arg(f"invalid datatype {datatype!r} for input '{name}'; expected one of "
                          f"{', '.join(dtypes.V2_NAMES)}") from None


def check_shape(shape: Any, name: str) -> tuple[int, ...]:
    """A request's ``shape`` as a tuple of ints >= 0 (Triton: "Unable to parse 'shape'" otherwise)."""
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise invalid_arg(f"Unable to parse 'shape' of input '{name}': expected a list of integers >= 0, "
                          f"got {shape!r}")
    return tuple(int(d) for d in shape)


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


# ------------------------------------------------------------------------------------------------- BYTES

def serialize_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor (object array of bytes/str, or numpy S/U) as length-prefixed elements, row-major."""
    parts = []
    for item in np.asarray(array).reshape(-1):
        value = item if isinstance(item, bytes) else (
            item.encode("utf-8") if isinstance(item, str) else bytes(item))
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, name: str, model: str) -> list[bytes]:
    """The elements of a length-prefixed BYTES buffer; INVALID_ARG when a length runs past its end."""
    view = memoryview(buffer)
    out, offset, end = [], 0, len(view)
    while offset < end:
        if offset + 4 > end:
            raise invalid_arg(f"element byte size indicator exceeds the end of the buffer for input '{name}' "
                              f"for model '{model}'")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise invalid_arg(f"element byte size indicator exceeds the end of the buffer for input '{name}' "
                              f"for model '{model}'")
        out.append(bytes(view[offset:offset + length]))
        offset += length
    return out


def _bytes_array(elements: Sequence[bytes], shape: tuple[int, ...], name: str, model: str) -> np.ndarray:
    expected = element_count(shape)
    if len(elements) != expected:
        raise invalid_arg(f"expected {expected} string elements for inference input '{name}' for model "
                          f"'{model}', got {len(elements)}")
    out = np.empty(len(elements), dtype=np.object_)
    out[:] = list(elements)
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------------- raw

def from_raw(buffer: bytes | memoryview, datatype: str, shape: tuple[int, ...], name: str,
             model: str) -> np.ndarray:
    """Decode one tensor's raw bytes (binary extension / ``raw_input_contents``)."""
    kind = triton_type(datatype, name)
    if kind.is_bytes:
        return _bytes_array(deserialize_bytes(buffer, name, model), shape, name, model)
    expected = element_count(shape) * kind.itemsize
    if len(buffer) != expected:
        raise invalid_arg(f"input byte size mismatch for input '{name}' for model '{model}'. Expected "
                          f"{expected}, got {len(buffer)}")
    if kind.v2_name == "BOOL":                 # any non-zero byte is true, as in Triton
        return (np.frombuffer(buffer, dtype=np.uint8) != 0).reshape(shape)
    array = np.frombuffer(buffer, dtype=kind.numpy)        # little-endian hosts (x86-64, aarch64)
    return array.copy().reshape(shape)


def to_raw(array: np.ndarray) -> bytes:
    """One output's raw bytes (row-major, little-endian; BYTES length-prefixed)."""
    kind = dtypes.from_numpy(array.dtype)
    if kind.is_bytes:
        return serialize_bytes(array)
    array = np.ascontiguousarray(array)
    if kind.itemsize > 1 and array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()


# -------------------------------------------------------------------------------------------------- JSON

def flatten(data: Any, name: str) -> list:
    """The scalars of a flat or nested JSON ``data`` list, row-major."""
    if not isinstance(data, list):
        raise invalid_arg(f"Unable to parse 'data' of input '{name}': expected a list, got "
                          f"{type(data).__name__}")
    if not any(isinstance(v, list) for v in data):
        return data
    out: list = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def from_values(values: Sequence[Any], datatype: str, shape: tuple[int, ...], name: str, model: str,
                field: str = "data") -> np.ndarray:
    """Decode a flat sequence of Python values (JSON ``data`` flattened, or gRPC typed contents): BOOL takes
    bools, integer types ints (range-checked), floating types numbers, BYTES str (utf-8) or bytes."""
    kind = triton_type(datatype, name)
    expected = element_count(shape)
    if len(values) != expected:
        raise invalid_arg(f"Unable to parse '{field}' of input '{name}' for model '{model}': shape "
                          f"{list(shape)} holds {expected} elements, got {len(values)}")
    if kind.is_bytes:
        elements = []
        for v in values:
            if isinstance(v, str):
                elements.append(v.encode("utf-8"))
            elif isinstance(v, bytes):
                elements.append(v)
            else:
                raise _element_error(name, model, field, "BYTES", v)
        return _bytes_array(elements, shape, name, model)
    if kind.v2_name == "BOOL":
        bad = next((v for v in values if not isinstance(v, (bool, np.bool_))), None)
        if bad is not None:
            raise _element_error(name, model, field, "BOOL", bad)
        return np.array(values, dtype=np.bool_).reshape(shape)
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating))
           for v in values):
        bad = next(v for v in values if isinstance(v, (bool, np.bool_))
                   or not isinstance(v, (int, float, np.integer, np.floating)))
        raise _element_error(name, model, field, kind.v2_name, bad)
    target = kind.numpy
    if target.kind in _INT_KINDS:
        return _integers(values, target, kind.v2_name, name, model, field).reshape(shape)
    return np.array(values, dtype=np.float64).astype(target).reshape(shape)


def _integers(values: Sequence[Any], target: np.dtype, v2: str, name: str, model: str, field: str) -> np.ndarray:
    bad = next((v for v in values if isinstance(v, float) and not v.is_integer()), None)
    if bad is not None:
        raise _element_error(name, model, field, v2, bad)
    info = np.iinfo(target)
    ints = [int(v) for v in values]
    if ints and (min(ints) < info.min or max(ints) > info.max):
        out_of_range = next(v for v in ints if v < info.min or v > info.max)
        raise invalid_arg(f"Unable to parse '{field}' of input '{name}' for model '{model}': {out_of_range} is "
                          f"out of the range of {v2} [{info.min}, {info.max}]")
    return np.array(ints, dtype=target)


def _element_error(name: str, model: str, field: str, v2: str, value: Any) -> InferError:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return invalid_arg(f"Unable to parse '{field}' of input '{name}' for model '{model}': {shown} "
                       f"({type(value).__name__}) is not a valid {v2} element")


def to_json_data(array: np.ndarray, name: str) -> list:
    """One output as a flat JSON ``data`` list (BYTES as strings)."""
    kind = dtypes.from_numpy(array.dtype)
    flat = np.asarray(array).reshape(-1)
    if kind.is_bytes:
        out = []
        for item in flat:
            if isinstance(item, str):
                out.append(item)
                continue
            try:
                out.append(bytes(item).decode("utf-8"))
            except UnicodeDecodeError:
                raise InferError("INVALID_ARG", f"output '{name}' holds bytes that are not valid UTF-8, which "
                                                f"JSON cannot carry; request it with binary_data: true") from None
        return out
    if kind.v2_name in ("FP16", "BF16"):
        return flat.astype(np.float32).tolist()
    return flat.tolist()
