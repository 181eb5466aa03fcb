"""A model's tensors: the per-model view of inputs and outputs, Triton's request checks, and batching.

Data types are ``flotilla.repository.dtypes`` (the one map of Triton's names to numpy); this module is the one
request check of the repository: the dynamic batcher runs it before queueing and the backends run it on what
they are handed, with the same messages.

Contracts:
- ``ModelIO.from_config(config)`` is the per-model view of inputs and outputs (``TensorSpec``: the v2 data
  type, the dims clients see, the dims the model sees after ``reshape``, optional / ragged, the pad value).
  ModelConfigError for a config no check could serve (duplicate names, no or invalid data type, shape
  tensors, a pad value that is not a number).
- ``ModelIO.check_request(inputs)`` raises ``InvalidArgError`` (``InferError`` INVALID_ARG and
  ``InvalidRequestError``, Triton's message, ``param`` the tensor) for unknown or missing inputs, a wrong data
  type, a wrong shape or a batch size outside [1, ``max_batch_size``]; otherwise it returns a
  ``CheckedRequest``: the batch size (1 for a model without batching), the *batch key* (requests with different
  keys are never in one batch: the shapes of variable-size inputs that are not ``allow_ragged_batch``, and which
  optional inputs are present: Triton's "enforce equal shape" rule) and the inputs normalised (BYTES as object
  arrays of ``bytes``).
- ``ModelIO.select_outputs(requested)``: the output names to compute (all when none are requested);
  InvalidArgError for a name the model does not declare.
- ``concat_inputs`` stacks the requests of a batch along dimension 0, padding each ``allow_ragged_batch``
  input to the longest request of this batch in every dimension with the input's pad value (model parameter
  ``pad_value.<INPUT>`` or ``pad_value``; default 0, or b"" for BYTES), then applies ``reshape``.
- ``split_outputs`` undoes output ``reshape``, checks each output's dtype and batch dimension and cuts it
  back per request; outputs named by a ``batch_output { kind: BATCH_SCATTER_WITH_INPUT_SHAPE }`` are cut in
  their variable dimensions to the request's own source-input shape (so padding never reaches the client).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from flotilla.repository import dtypes
from flotilla.repository.config import WILDCARD_DIM, ModelConfig
from flotilla.repository.errors import InferError, ModelConfigError, invalid_arg

# Config parameters the batcher itself reads (every backend accepts them next to its own).
BATCHER_PARAMETERS = ("pad_value",)
BATCHER_PARAMETER_PREFIXES = ("pad_value.",)


def dims_str(dims: Sequence[int]) -> str:
    """Triton's DimsListToString: [-1,16]."""
    return "[" + ",".join(str(int(d)) for d in dims) + "]"


def _type_name(array: np.ndarray) -> str:
    try:
        return dtypes.from_numpy(array.dtype).v2_name
    except ValueError:
        return str(array.dtype)


@dataclass(frozen=True)
class TensorSpec:
    """One config input or output."""
    name: str
    type: dtypes.TritonType
    dims: tuple[int, ...]               # as clients see them, without the batch dimension; -1 = variable
    model_dims: tuple[int, ...]         # as the model sees them: the config's reshape, else dims
    optional: bool = False              # inputs
    ragged: bool = False                # allow_ragged_batch (inputs)
    pad_value: Any = 0                  # padding of ragged inputs

    @property
    def datatype(self) -> str:
        """The v2 data type name ("FP32", "BYTES", ...)."""
        return self.type.v2_name

    @property
    def reshaped(self) -> bool:
        return self.model_dims != self.dims

    @property
    def variable(self) -> bool:
        return WILDCARD_DIM in self.dims


def _pad_value(config: ModelConfig, name: str, triton_type: dtypes.TritonType) -> Any:
    params = config.parameters
    raw = None
    for key in (f"pad_value.{name}", "pad_value"):
        if key in params:
            raw = params[key].string_value
            break
    if triton_type.is_bytes:
        return b"" if raw is None else raw.encode()
    if raw is None:
        return 0
    try:
        number = float(raw) if triton_type.v2_name.startswith(("FP", "BF")) else int(raw)
        return triton_type.numpy.type(number)
    except ValueError:
        raise ModelConfigError(f"model '{config.name}': pad value {raw!r} of input '{name}' is not a "
                               f"{triton_type.v2_name} number") from None


def _spec(config: ModelConfig, io, is_input: bool) -> TensorSpec:
    kind = "input" if is_input else "output"
    if io.is_shape_tensor or io.is_non_linear_format_io:
        raise ModelConfigError(f"model '{config.name}': {kind} '{io.name}' sets is_shape_tensor or "
                               f"is_non_linear_format_io (TensorRT only); not supported")
    try:
        triton_type = dtypes.from_config(io.data_type)
    except ValueError as e:
        raise ModelConfigError(f"model '{config.name}': {kind} '{io.name}': {e}") from None
    dims = tuple(int(d) for d in io.dims)
    model_dims = tuple(int(d) for d in io.reshape.shape) if io.HasField("reshape") else dims
    ragged = is_input and io.allow_ragged_batch
    return TensorSpec(io.name, triton_type, dims, model_dims, optional=is_input and io.optional, ragged=ragged,
                      pad_value=_pad_value(config, io.name, triton_type) if is_input else 0)


class CheckedRequest(NamedTuple):
    batch_size: int                      # 1 for a model without batching
    key: tuple                           # requests with different keys never share a batch
    inputs: dict[str, np.ndarray]        # normalised (BYTES as object arrays of bytes)


@dataclass(frozen=True)
class ModelIO:
    """Inputs and outputs of one model, as the batcher, the backends and the protocol layer check them."""
    model: str
    max_batch_size: int
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    scatter: Mapping[str, str]            # output name -> source input name (BATCH_SCATTER_WITH_INPUT_SHAPE)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "ModelIO":
        specs: list[dict[str, TensorSpec]] = []
        for kind, entries in (("input", config.input), ("output", config.output)):
            found: dict[str, TensorSpec] = {}
            for io in entries:
                if io.name in found:
                    raise ModelConfigError(f"model {kind} '{io.name}' is specified more than once for "
                                           f"{config.name}")
                found[io.name] = _spec(config, io, kind == "input")
            specs.append(found)
        scatter = {t: bo.source_input[0] for bo in config.batch_output for t in bo.target_name if bo.source_input}
        return cls(config.name, config.max_batch_size, specs[0], specs[1], scatter)

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def check_request(self, inputs: Mapping[str, np.ndarray]) -> CheckedRequest:
        """Validate one request's inputs (see the module contract). Raises InvalidArgError."""
        for name in inputs:
            if name not in self.inputs:
                raise invalid_arg(f"unexpected inference input '{name}' for model '{self.model}'", name)
        self._check_required(inputs)
        batch_size = self._batch_size(inputs) if self.batching else 1
        key, checked = [], {}
        for name, array in sorted(inputs.items()):
            spec = self.inputs[name]
            checked[name] = array = self._check_input(spec, array)
            if spec.variable and not spec.ragged:
                key.append((name, tuple(array.shape[1:] if self.batching else array.shape)))
        if any(s.optional for s in self.inputs.values()):
            key.append(tuple(sorted(inputs)))
        return CheckedRequest(batch_size, tuple(key), {name: checked[name] for name in inputs})

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
                          f"{want}. Please provide all required input(s).", missing[0])

    def _batch_size(self, inputs: Mapping[str, np.ndarray]) -> int:
        batch_size = None
        for name, array in inputs.items():
            shape = np.shape(array)
            if not shape:
                raise invalid_arg(f"input '{name}' has no shape but model requires batch dimension for "
                                  f"'{self.model}'", name)
            if batch_size is None:
                batch_size = shape[0]
            elif shape[0] != batch_size:
                raise invalid_arg(f"input '{name}' batch size does not match other inputs for '{self.model}'",
                                  name)
        batch_size = batch_size or 0
        if batch_size < 1:
            raise invalid_arg(f"inference request batch-size must be >= 1 for '{self.model}'", "inputs")
        if batch_size > self.max_batch_size:
            raise invalid_arg(f"inference request batch-size must be <= {self.max_batch_size} for "
                              f"'{self.model}'", "inputs")
        return batch_size

    def _check_input(self, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
        if not isinstance(array, np.ndarray):
            raise invalid_arg(f"input '{spec.name}' for model '{self.model}' must be a numpy array", spec.name)
        try:
            array = dtypes.as_type(array, spec.type)
        except ValueError:
            raise invalid_arg(f"inference input '{spec.name}' data-type is '{_type_name(array)}', but model "
                              f"'{self.model}' expects '{spec.datatype}'", spec.name) from None
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
                              f"{dims_str(full)}, got {dims_str(array.shape)}. {note}".rstrip(), spec.name)
        return array

    def select_outputs(self, requested: Sequence[str] | None = ()) -> list[str]:
        """The output names to compute: ``requested`` (each checked to be declared, duplicates dropped) or all.
        A model that declares no outputs accepts any name (its backend decides)."""
        if isinstance(requested, str):
            requested = (requested,)
        if not requested:
            return list(self.outputs)
        for name in requested:
            if self.outputs and name not in self.outputs:
                raise invalid_arg(f"unexpected inference output '{name}' for model '{self.model}'", name)
        return list(dict.fromkeys(requested))


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
        return {n: to_model_view(io.inputs[n], a, batched=False) for n, a in requests[0].items()}
    out = {}
    for name in requests[0]:
        spec = io.inputs[name]
        arrays = [r[name] for r in requests]          # each (batch_i, *dims_i)
        if spec.ragged:
            target = tuple(max(a.shape[d] for a in arrays) for d in range(1, arrays[0].ndim))
            arrays = [_pad_to(a, target, spec.pad_value) for a in arrays]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)   # (sum batch_i, *dims)
        out[name] = to_model_view(spec, batch, batched=True)
    return out


def to_model_view(spec: TensorSpec, array: np.ndarray, batched: bool) -> np.ndarray:
    """An input as the model takes it (the config's ``reshape``; ``batched``: dimension 0 is the batch)."""
    if not spec.reshaped:
        return array
    lead = array.shape[:1] if batched else ()
    inner = array.shape[1:] if batched else array.shape
    return array.reshape(lead + _reshape(inner, spec.dims, spec.model_dims))


def from_model_view(spec: TensorSpec, array: np.ndarray, batched: bool) -> np.ndarray:
    """An output as clients see it (the config's ``dims`` when it has a ``reshape``)."""
    if not spec.reshaped:
        return array
    lead = array.shape[:1] if batched else ()
    inner = array.shape[1:] if batched else array.shape
    return array.reshape(lead + _reshape(inner, spec.model_dims, spec.dims))


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
            got = _type_name(array)
            if got != spec.datatype:
                raise InferError("INTERNAL", f"output '{name}' of model '{io.model}' has data type "
                                             f"'{got}' but its config declares '{spec.datatype}'")
            array = from_model_view(spec, array, io.batching)
            if spec.type.is_bytes:
                try:
                    array = dtypes.as_bytes_array(array)
                except ValueError as e:
                    raise InferError("INTERNAL", f"output '{name}' of model '{io.model}': {e}") from None
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
