"""Tensor data types across Triton's three spellings and numpy.

A type has a model-config name (``TYPE_FP32``, the ``DataType`` enum of Triton's ``model_config.proto``, also
its integer value 11), a KServe v2 / Open Inference Protocol name (``FP32``) and a numpy dtype. The mapping is
Triton's (``tritonclient.utils.triton_to_np_dtype``) with these conventions:

- ``TYPE_STRING`` <-> ``BYTES`` <-> numpy ``object`` arrays whose elements are ``bytes``. ``as_bytes_array``
  turns ``str`` elements (utf-8), numpy ``S``/``U`` arrays and object arrays of either into that form.
- ``TYPE_BOOL`` <-> ``BOOL`` <-> ``numpy.bool_``.
- ``TYPE_BF16`` <-> ``BF16`` <-> ``ml_dtypes.bfloat16`` (numpy has no bfloat16; tritonclient uses ml_dtypes
  too, and it is imported only when BF16 is used).

Errors: an unknown v2 name raises ``InvalidRequestError`` (``param="datatype"``: it comes from a request);
an unknown config type or numpy dtype raises ``ValueError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from flotilla.errors import InvalidRequestError


@dataclass(frozen=True)
class TritonType:
    """One tensor data type: ``config_name`` (``TYPE_FP32``), ``config_value`` (the proto enum's number, 11),
    ``v2_name`` (``FP32``) and ``itemsize`` (bytes per element; 0 for BYTES, whose elements vary)."""

    config_name: str
    config_value: int
    v2_name: str
    itemsize: int

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype of arrays of this type (``object`` for BYTES, ml_dtypes' bfloat16 for BF16)."""
        return _numpy_dtype(self.v2_name)

    @property
    def is_bytes(self) -> bool:
        return self.v2_name == "BYTES"


# The enum numbers are those of model_config.proto's DataType (part of the wire format, never renumbered);
# tests check this table against tritonclient's generated model_config_pb2.
TYPES: tuple[TritonType, ...] = (
    TritonType("TYPE_BOOL", 1, "BOOL", 1),
    TritonType("TYPE_UINT8", 2, "UINT8", 1),
    TritonType("TYPE_UINT16", 3, "UINT16", 2),
    TritonType("TYPE_UINT32", 4, "UINT32", 4),
    TritonType("TYPE_UINT64", 5, "UINT64", 8),
    TritonType("TYPE_INT8", 6, "INT8", 1),
    TritonType("TYPE_INT16", 7, "INT16", 2),
    TritonType("TYPE_INT32", 8, "INT32", 4),
    TritonType("TYPE_INT64", 9, "INT64", 8),
    TritonType("TYPE_FP16", 10, "FP16", 2),
    TritonType("TYPE_FP32", 11, "FP32", 4),
    TritonType("TYPE_FP64", 12, "FP64", 8),
    TritonType("TYPE_STRING", 13, "BYTES", 0),
    TritonType("TYPE_BF16", 14, "BF16", 2),
)
_BY_CONFIG_NAME = {t.config_name: t for t in TYPES}
_BY_CONFIG_VALUE = {t.config_value: t for t in TYPES}
_BY_V2 = {t.v2_name: t for t in TYPES}
_NUMPY_FIXED = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
V2_NAMES = tuple(_BY_V2)


@lru_cache(maxsize=None)
def _numpy_dtype(v2_name: str) -> np.dtype:
    if v2_name == "BF16":
        return np.dtype(_bfloat16())
    return np.dtype(_NUMPY_FIXED[v2_name])


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError as e:  # pragma: no cover - ml_dtypes comes with tritonclient and onnx
        raise ValueError("BF16 tensors need the ml_dtypes package (pip install ml_dtypes)") from e
    return ml_dtypes.bfloat16


def from_config(data_type: int | str) -> TritonType:
    """The type of a model-config ``data_type``: the enum's number (as in a parsed ``ModelConfig``) or its
    name (``"TYPE_FP32"``, as in the config's JSON form)."""
    found = _BY_CONFIG_VALUE.get(data_type) if isinstance(data_type, int) else _BY_CONFIG_NAME.get(data_type)
    if data_type in (0, "TYPE_INVALID"):
        raise ValueError("data_type is TYPE_INVALID (not set); set it, e.g. data_type: TYPE_FP32")
    if found is None:
        raise ValueError(f"unsupported model config data_type {data_type!r}; expected one of "
                         f"{', '.join(_BY_CONFIG_NAME)}")
    return found


def from_v2(name: str) -> TritonType:
    """The type of a v2 protocol ``datatype`` (``"FP32"``); an unknown name is the request's error."""
    found = _BY_V2.get(name) if isinstance(name, str) else None
    if found is None:
        raise InvalidRequestError(f"invalid datatype {name!r}; expected one of {', '.join(V2_NAMES)}",
                                  param="datatype")
    return found


def from_numpy(dtype) -> TritonType:
    """The type of a numpy dtype (or array's dtype). ``object``, ``S`` (bytes) and ``U`` (str) are BYTES."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return _BY_V2["BYTES"]
    if dtype.kind == "V" and dtype.name == "bfloat16":
        return _BY_V2["BF16"]
    for name, scalar in _NUMPY_FIXED.items():
        if name != "BYTES" and dtype == np.dtype(scalar):
            return _BY_V2[name]
    raise ValueError(f"numpy dtype {dtype} has no Triton data type; supported: bool, (u)int8-64, float16/32/64, "
                     f"ml_dtypes.bfloat16 and object arrays of bytes")


def config_to_v2(data_type: int | str) -> str:
    """``TYPE_FP32`` (or 11) -> ``"FP32"``; ``TYPE_STRING`` -> ``"BYTES"``."""
    return from_config(data_type).v2_name


def v2_to_config(name: str) -> int:
    """``"FP32"`` -> 11 (the ``DataType`` enum number to set on a ``ModelInput``/``ModelOutput``)."""
    return from_v2(name).config_value


def as_bytes_array(array) -> np.ndarray:
    """``array`` as a BYTES tensor: a numpy object array of ``bytes`` with the same shape (``str`` elements
    are utf-8 encoded). Raises ``ValueError`` for an element that is neither ``bytes`` nor ``str``."""
    array = np.asarray(array)
    out = np.empty(array.shape, dtype=np.object_)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, value in enumerate(flat_in):
        if isinstance(value, (bytes, np.bytes_)):
            flat_out[i] = bytes(value)
        elif isinstance(value, str):
            flat_out[i] = value.encode("utf-8")
        else:
            raise ValueError(f"a BYTES tensor element must be bytes or str, got {type(value).__name__}")
    return out


def as_type(array, triton_type: TritonType) -> np.ndarray:
    """``array`` in ``triton_type``'s numpy form when it already is that type (BYTES normalised with
    ``as_bytes_array``); ``ValueError`` naming both types when it is another type (no silent casts)."""
    array = np.asarray(array)
    actual = from_numpy(array.dtype)
    if actual != triton_type:
        raise ValueError(f"data type is {actual.v2_name}, expected {triton_type.v2_name}")
    return as_bytes_array(array) if triton_type.is_bytes else array
