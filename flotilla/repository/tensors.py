"""A model's tensors: Triton data types <-> numpy, request checks with Triton's messages, and batching.

Contracts:
- ``ModelIO.from_config(config)`` is the per-model view of inputs and outputs the batcher and the protocol
  layer share (protocol dtype names as in KServe v2: "FP32", "INT64", "BYTES", ...).
- ``ModelIO.check_request(inputs)`` raises ``InferError("INVALID_ARG", <Triton's message>)`` for unknown or
  missing inputs, a wrong dtype, a wrong shape or a batch size above ``max_batch_size``; otherwise it returns
  the request's batch size (1 for a model without batching) and its *batch key*: requests with different
  keys are never in one batch (the shapes of variable-size inputs that are not ``allow_ragged_batch``, and
  which optional inputs are present: Triton's "enforce equal shape" rule).
- ``concat_inputs`` stacks the requests of a batch along dimension 0, padding each ``allow_ragged_batch``
  input to the longest request of this batch in every dimension with the input's pad value (model parameter
  ``pad_value.<INPUT>`` or ``pad_value``; default 0, or b"" for BYTES), then applies ``reshape``.
- ``split_outputs`` undoes output ``reshape``, checks each output's dtype and batch dimension and cuts it
  back per request; outputs named by a ``batch_output { kind: BATCH_SCATTER_WITH_INPUT_SHAPE }`` are cut in
  their variable dimensions to the request's own source-input shape (so padding never reaches the client).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from flotilla.repository.config import WILDCARD_DIM, ModelConfig
from flotilla.repository.errors import InferError, ModelConfigError, invalid_arg

# DataType enum value -> KServe v2 / Triton protocol name.
PROTOCOL_DTYPE = {v.number: ("BYTES" if v.name == "TYPE_STRING" else v.name[len("TYPE_"):])
                  for v in mc.DataType.DESCRIPTOR.values if v.name != "TYPE_INVALID"}
_NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64, "BF16": ml_dtypes.bfloat16, "BYTES": np.object_}


def numpy_dtype(protocol: str) -> np.dtype:
    """The numpy dtype of a protocol dtype name (BYTES -> object arrays of bytes, BF16 -> ml_dtypes)."""
    try:
        return np.dtype(_NUMPY[protocol])
    except KeyError:
        raise ValueError(f"unknown data type {protocol!r}") from None


def protocol_dtype(array: np.ndarray) -> str | None:
    """The protocol dtype name of a numpy array (object and fixed-width bytes arrays are BYTES)."""
    if array.dtype == np.object_ or array.dtype.kind == "S":
        return "BYTES"
    for name, t in _NUMPY.items():
        if name != "BYTES" and array.dtype == np.dtype(t):
            return name
    return None


def dims_str(dims: Sequence[int]) -> str:
    """Triton's DimsListToString: [-1,16]."""
    return "[" + ",".join(str(int(d)) for d in dims) + "]"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str                       # protocol name: "FP32", "BYTES", ...
    dims: tuple[int, ...]               # without the batch dimension; -1 = variable
    reshape: tuple[int, ...] | None     # what the model sees / produces instead of dims, or None
    ragged: bool = False                # allow_ragged_batch (inputs)
    optional: bool = False              # inputs
    pad_value: Any = 0                  # padding of ragged inputs

    @property
    def variable(self) -> bool:
        return WILDCARD_DIM in self.dims


def _pad_value(config: ModelConfig, name: str, datatype: str) -> Any:
    params = config.parameters
    raw = None
    for key in (f"pad_value.{name}", "pad_value"):
        if key in params:
            raw = params[key].string_value
            break
    if datatype == "BYTES":
        return b"" if raw is None else raw.encode()
    if raw is None:
        return 0
    try:
        return numpy_dtype(datatype).type(float(raw) if datatype.startswith(("FP", "BF")) else int(raw))
    except ValueError:
        raise ModelConfigError(f"model '{config.name}': pad value {raw!r} of input '{name}' is not a "
                               f"{datatype} number") from None


@dataclass(frozen=True)
class ModelIO:
    """Inputs and outputs of one model, as the batcher and the protocol layer check them."""
    model: str
    max_batch_size: int
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    scatter: Mapping[str, str]            # output name -> source input name (BATCH_SCATTER_WITH_INPUT_SHAPE)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "ModelIO":
        def spec(io, is_input: bool) -> TensorSpec:
            datatype = PROTOCOL_DTYPE[io.data_type]
            return TensorSpec(io.name, datatype, tuple(io.dims),
                              tuple(io.reshape.shape) if io.HasField("reshape") else None,
                              ragged=is_input and io.allow_ragged_batch, optional=is_input and io.optional,
                              pad_value=_pad_value(config, io.name, datatype) if is_input else 0)
        scatter = {t: bo.source_input[0] for bo in config.batch_output for t in bo.target_name}
        return cls(config.name, config.max_batch_size, {io.name: spec(io, True) for io in config.input},
                   {io.name: spec(io, False) for io in config.output}, scatter)

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def check_request(self, inputs: Mapping[str, np.ndarray]) -> tuple[int, tuple]:
        """Validate one request's inputs; return (batch_size, batch_key). Raises InferError (INVALID_ARG)."""
        for name in inputs:
            if name not in self.inputs:
                raise invalid_arg(f"unexpected inference input '{name}' for model '{self.model}'")
        self._check_required(inputs)
        batch_size = 1
        if self.batching:
            batch_size = self._batch_size(inputs)
        key = []
        for name, array in sorted(inputs.items()):
            spec = self.inputs[name]
            self._check_input(spec, array)
            if spec.variable and not spec.ragged:
                key.append((name, tuple(array.shape[1:] if self.batching else array.shape)))
        if any(s.optional for s in self.inputs.values()):
            key.append(tuple(sorted(inputs)))
        return batch_size, tuple(key)

    def _check_required(self, inputs: Mapping[str, np.ndarray]) -> None:
        required = [n for n, s in self.inputs.items() if not s.optional]
        missing = [n for n in required if n not in inputs]
        if not missing:
            return
        got = "[" + ",".join(f"'{n}'" for n in inputs) + "]"
        want = "[" + ",".join(f"'{n}'" for n in missing) + "]"
        if len(required) == len(self.inputs):
            head = f"expected {len(self.inputs)} inputs but got {len(inputs)} inputs"
        else:
            head = (f"expected number of inputs between {len(required)} and {len(self.inputs)} but got "
                    f"{len(inputs)} inputs")
        raise invalid_arg(f"{head} for model '{self.model}'. Got input(s) {got}, but missing required input(s) "
                          f"{want}. Please provide all required input(s).")

    def _batch_size(self, inputs: Mapping[str, np.ndarray]) -> int:
        batch_size = None
        for name, array in inputs.items():
            if array.ndim == 0:
                raise invalid_arg(f"input '{name}' has no shape but model requires batch dimension for "
                                  f"'{self.model}'")
            if batch_size is None:
                batch_size = array.shape[0]
            elif array.shape[0] != batch_size:
                raise invalid_arg(f"input '{name}' batch size does not match other inputs for '{self.model}'")
        batch_size = batch_size or 0
        if batch_size < 1:
            raise invalid_arg(f"inference request batch-size must be >= 1 for '{self.model}'")
        if batch_size > self.max_batch_size:
            raise invalid_arg(f"inference request batch-size must be <= {self.max_batch_size} for "
                              f"'{self.model}'")
        return batch_size

    def _check_input(self, spec: TensorSpec, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray):
            raise invalid_arg(f"input '{spec.name}' for model '{self.model}' must be a numpy array")
        got = protocol_dtype(array)
        if got != spec.datatype:
            raise invalid_arg(f"inference input '{spec.name}' data-type is '{got or array.dtype}', but model "
                              f"'{self.model}' expects '{spec.datatype}'")
        shape = array.shape[1:] if self.batching else array.shape
        ok = len(shape) == len(spec.dims) and all(d == WILDCARD_DIM or d == s for d, s in zip(spec.dims, shape))
        if not ok:
            full = ((WILDCARD_DIM,) if self.batching else ()) + spec.dims
            note = ""
            if self.batching:
                note = ("NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension "
                        "to be prepended to each input shape. If you want to specify the full shape including "
                        "the batch dim in your input dims config, try setting max_batch_size to zero. See the "
                        "model configuration docs for more info on max_batch_size.")
            raise invalid_arg(f"unexpected shape for input '{spec.name}' for model '{self.model}'. Expected "
                              f"{dims_str(full)}, got {dims_str(array.shape)}. {note}".rstrip())

    def check_requested_outputs(self, names: Sequence[str]) -> None:
        """Raise InferError for a requested output the model does not declare (when it declares any)."""
        for name in names:
            if self.outputs and name not in self.outputs:
                raise invalid_arg(f"unexpected inference output '{name}' for model '{self.model}'")


# ----------------------------------------------------------------------------------------------- batching

def _reshape(shape: Sequence[int], src: Sequence[int], dst: Sequence[int]) -> tuple[int, ...]:
    """Map a concrete shape matching ``src`` (with -1 wildcards) onto ``dst``: wildcard values in order."""
    values = [s for s, d in zip(shape, src) if d == WILDCARD_DIM]
    it = iter(values)
    return tuple(next(it) if d == WILDCARD_DIM else d for d in dst)


def _pad_to(array: np.ndarray, target: Sequence[int], value: Any) -> np.ndarray:
    """Pad ``array`` (batch, *dims) at the end of every non-batch dimension up to ``target``."""
    if tuple(array.shape[1:]) == tuple(target):
        return array
    out = np.full((array.shape[0], *target), value, dtype=array.dtype)
    out[(slice(None), *(slice(0, n) for n in array.shape[1:]))] = array
    return out


def concat_inputs(io: ModelIO, requests: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One input dict for a batch of checked requests (same batch key). Without batching the single request's
    tensors pass through (reshaped)."""
    if not requests:
        raise ValueError("empty batch")
    if not io.batching:
        if len(requests) != 1:
            raise ValueError(f"model '{io.model}' does not batch; got {len(requests)} requests in one batch")
        return {n: _model_view(io.inputs[n], a, batched=False) for n, a in requests[0].items()}
    out = {}
    for name in requests[0]:
        spec = io.inputs[name]
        arrays = [r[name] for r in requests]          # each (batch_i, *dims_i)
        if spec.ragged:
            target = tuple(max(a.shape[d] for a in arrays) for d in range(1, arrays[0].ndim))
            arrays = [_pad_to(a, target, spec.pad_value) for a in arrays]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)   # (sum batch_i, *dims)
        out[name] = _model_view(spec, batch, batched=True)
    return out


def _model_view(spec: TensorSpec, array: np.ndarray, batched: bool) -> np.ndarray:
    if spec.reshape is None:
        return array
    lead = array.shape[:1] if batched else ()
    inner = array.shape[1:] if batched else array.shape
    return array.reshape(lead + _reshape(inner, spec.dims, spec.reshape))


def split_outputs(io: ModelIO, outputs: Mapping[str, np.ndarray], requests: Sequence[Mapping[str, np.ndarray]],
                  batch_sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut a batch's outputs back into one dict per request. Raises InferError (INTERNAL) when the model's
    outputs do not match its config (missing output, wrong dtype, wrong batch dimension)."""
    per_request: list[dict[str, np.ndarray]] = [{} for _ in requests]
    names = list(io.outputs) if io.outputs else list(outputs)
    total = sum(batch_sizes)
    for name in names:
        if name not in outputs:
            raise InferError("INTERNAL", f"model '{io.model}' did not produce output '{name}'")
        array = np.asarray(outputs[name])
        spec = io.outputs.get(name)
        if spec is not None:
            got = protocol_dtype(array)
            if got != spec.datatype:
                raise InferError("INTERNAL", f"output '{name}' of model '{io.model}' has data type "
                                             f"'{got or array.dtype}' but its config declares '{spec.datatype}'")
            if spec.reshape is not None:
                lead = array.shape[:1] if io.batching else ()
                inner = array.shape[1:] if io.batching else array.shape
                array = array.reshape(lead + _reshape(inner, spec.reshape, spec.dims))
        if not io.batching:
            per_request[0][name] = array
            continue
        if array.ndim == 0 or array.shape[0] != total:
            raise InferError("INTERNAL", f"output '{name}' of model '{io.model}' has batch dimension "
                                         f"{array.shape[:1] or 'none'}, expected {total} (the batch's requests)")
        offset = 0
        for i, (request, n) in enumerate(zip(requests, batch_sizes)):
            part = array[offset:offset + n]                       # (n, *dims)
            offset += n
            source = io.scatter.get(name)
            if source is not None and spec is not None and source in request:
                part = _scatter_to(part, spec.dims, request[source].shape[1:])
            per_request[i][name] = part
    return per_request


def _scatter_to(part: np.ndarray, dims: Sequence[int], source_shape: Sequence[int]) -> np.ndarray:
    """Cut the variable dimensions of one request's output to the same dimensions of its source input."""
    index = [slice(None)]
    for d, dim in enumerate(dims):
        if dim == WILDCARD_DIM and d < len(source_shape) and d + 1 < part.ndim:
            index.append(slice(0, source_shape[d]))
        else:
            index.append(slice(None))
    return part[tuple(index[:part.ndim])]
