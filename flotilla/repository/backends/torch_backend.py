"""The PyTorch backend (Triton's ``backend: "pytorch"`` / ``platform: "pytorch_libtorch"``).

``<version>/model.pt`` or ``model.pt2`` (or ``default_model_filename``) holds a TorchScript archive
(``torch.jit.save``) or a ``torch.export`` program (``torch.export.save``); which one is read from the file,
never from its name. Pickled ``nn.Module``s and checkpoints are refused before anything is unpickled
(``torch_archive``). Each instance loads its own copy, on the CPU or (KIND_GPU) ``cuda:<device_id>``.

The config must list the inputs and outputs (a TorchScript file does not record names or dtypes). Config
inputs map to forward's positional arguments by Triton's naming convention: all names are forward's argument
names (FORWARD_ARGUMENT), else all are ``<name>__<index>`` (NAMED_INDEX), else the config's order. Outputs: a
returned tensor, tuple/list (NAMED_INDEX or config order) or dict (by config name). For a torch.export
program the input/output data types, ranks and a dynamic batch dim (when max_batch_size > 0) are checked
against the config at load; for TorchScript the output dtypes are checked on every run. BYTES tensors are
not supported here (use the python backend).

Config ``parameters`` honoured: ``INFERENCE_MODE`` (default true: ``torch.inference_mode``, else
``torch.no_grad``) and ``DISABLE_OPTIMIZED_EXECUTION`` (``torch.jit.optimized_execution(False)``). Thread
counts are torch's process-wide setting and are not changed per model.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from flotilla.errors import ModelLoadError
from flotilla.repository import dtypes
from flotilla.repository.backends import torch_archive
from flotilla.repository.backends.base import (Backend, ModelExecutionError, TensorSpec,
                                               check_parameters, config_parameters, from_model_shape,
                                               model_name_of, named_index, naming_convention, resolve_device,
                                               to_model_shape)

logger = logging.getLogger(__name__)

PLATFORM, BACKEND = "pytorch_libtorch", "pytorch"
FILENAMES = ("model.pt", "model.pt2")
PARAMETERS = ("INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION")


def model_path(config, version_dir: str) -> str:
    """The model file of a version directory; ModelLoadError when there is none."""
    candidates = [config.default_model_filename] if config.default_model_filename else list(FILENAMES)
    for filename in candidates:
        path = os.path.join(version_dir, filename)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(f"model '{model_name_of(config, version_dir)}': no {' or '.join(candidates)} in "
                         f"{version_dir}")


def _bool_parameter(model_name: str, params: Mapping[str, str], key: str, default: bool) -> bool:
    value = params.get(key)
    if value is None:
        return default
    if value.lower() in ("true", "1", "on", "yes"):
        return True
    if value.lower() in ("false", "0", "off", "no"):
        return False
    raise ModelLoadError(f"model '{model_name}': parameter {key}={value!r} is not true or false")


def _torch_types():
    import torch
    return {torch.bool: "BOOL", torch.uint8: "UINT8", torch.uint16: "UINT16", torch.uint32: "UINT32",
            torch.uint64: "UINT64", torch.int8: "INT8", torch.int16: "INT16", torch.int32: "INT32",
            torch.int64: "INT64", torch.float16: "FP16", torch.float32: "FP32", torch.float64: "FP64",
            torch.bfloat16: "BF16"}


def _load(path: str, kind: str, device, model_name: str):
    """(callable module, forward's argument names, the ExportedProgram or None)."""
    import torch
    try:
        if kind == torch_archive.TORCHSCRIPT:
            module = torch.jit.load(path, map_location=device).eval()
            return module, [a.name for a in module.forward.schema.arguments[1:]], None
        program = torch.export.load(path)
        module = program.module()
        if device.type != "cpu":
            module = module.to(device)
        return module, list(inspect.signature(module.forward).parameters), program
    except Exception as e:  # torch raises many types for corrupt or incompatible archives
        raise ModelLoadError(f"model '{model_name}': torch cannot load {path}: {type(e).__name__}: {e}") from None


def input_positions(model_name: str, inputs: Mapping[str, TensorSpec], argument_names: list[str]) -> dict[str, int]:
    """Config input name -> forward's positional argument index (Triton's naming convention)."""
    names = list(inputs)
    convention = naming_convention(names, argument_names)
    if convention == "FORWARD_ARGUMENT":
        positions = {n: argument_names.index(n) for n in names}
    elif convention == "NAMED_INDEX":
        positions = {n: named_index(n) for n in names}
    else:
        positions = {n: i for i, n in enumerate(names)}
    beyond = [n for n, p in positions.items() if p >= len(argument_names)]
    if beyond:
        raise ModelLoadError(f"model '{model_name}': input '{beyond[0]}' maps to forward argument "
                             f"{positions[beyond[0]]} ({convention}), but forward takes {len(argument_names)} "
                             f"({', '.join(argument_names)})")
    return positions


def output_positions(outputs: Mapping[str, TensorSpec]) -> dict[str, int]:
    """Config output name -> index in forward's returned tuple (NAMED_INDEX, else config order)."""
    names = list(outputs)
    if naming_convention(names, None) == "NAMED_INDEX":
        return {n: named_index(n) for n in names}
    return {n: i for i, n in enumerate(names)}


def check_program(model_name: str, program, max_batch_size: int, inputs: Mapping[str, TensorSpec],
                  in_pos: dict[str, int], outputs: Mapping[str, TensorSpec], out_pos: dict[str, int]) -> None:
    """A torch.export program's recorded inputs/outputs against the config: dtype, rank, batch dim."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    user_inputs = [placeholders[name].meta.get("val") for name in program.graph_signature.user_inputs]
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    returned = output_node.args[0] if isinstance(output_node.args[0], (tuple, list)) else [output_node.args[0]]
    n_outputs = len(program.graph_signature.user_outputs)  # the last n returned values (mutations come first)
    user_outputs = [getattr(node, "meta", {}).get("val") for node in returned][len(returned) - n_outputs:]
    for kind, specs, positions, values in (("input", inputs, in_pos, user_inputs),
                                           ("output", outputs, out_pos, user_outputs)):
        for name, spec in specs.items():
            position = positions[name]
            if position >= len(values):
                raise ModelLoadError(f"model '{model_name}': {kind} '{name}' maps to position {position}, but "
                                     f"the exported program has {len(values)} {kind}s")
            _check_fake(model_name, kind, spec, values[position], max_batch_size)


def _check_fake(model_name: str, kind: str, spec: TensorSpec, fake, max_batch_size: int) -> None:
    if fake is None or not hasattr(fake, "dtype"):
        return
    v2 = _torch_types().get(fake.dtype)
    if v2 != spec.type.v2_name:
        raise ModelLoadError(f"unable to load model '{model_name}', configuration expects datatype "
                             f"{spec.type.config_name} for {kind} '{spec.name}', model provides {fake.dtype}")
    shape = list(fake.shape)
    if max_batch_size > 0:
        if not shape or (isinstance(shape[0], int) and not (shape[0] == 1 == max_batch_size)):
            raise ModelLoadError(
                f"model '{model_name}': max_batch_size is {max_batch_size} but {kind} '{spec.name}' of the "
                f"exported program has shape {shape} with a static first dim; export it with dynamic_shapes "
                f"(e.g. {{0: torch.export.Dim('batch')}}), or set max_batch_size: 0 and give the full dims")
        shape = shape[1:]
    if len(shape) != len(spec.model_dims) or any(isinstance(m, int) and c != -1 and m != c
                                                 for m, c in zip(shape, spec.model_dims)):
        shown = [m if isinstance(m, int) else -1 for m in shape]
        raise ModelLoadError(f"model '{model_name}', tensor '{spec.name}': the model expects dims {shown} but "
                             f"the model configuration specifies dims {list(spec.model_dims)}")


class PyTorchBackend(Backend):
    """One loaded TorchScript module or torch.export program per instance (see the module doc)."""

    def __init__(self, config, version_dir: str, instance_index: int):
        import torch
        path = model_path(config, version_dir)
        kind = torch_archive.classify(path)
        super().__init__(self.auto_complete(config, version_dir), version_dir, instance_index)
        params = config_parameters(self.config)
        check_parameters(self.name, params, PARAMETERS)
        self._inference_mode = _bool_parameter(self.name, params, "INFERENCE_MODE", True)
        self._optimized = not _bool_parameter(self.name, params, "DISABLE_OPTIMIZED_EXECUTION", False)
        self._check_specs()
        where = resolve_device(self.name, self.instance, torch.cuda.is_available(), "torch")
        self._device = torch.device(f"cuda:{self.instance.device_id}" if where == "GPU" else "cpu")
        self._module, arguments, program = _load(path, kind, self._device, self.name)
        self._input_pos = input_positions(self.name, self.inputs, arguments)
        self._output_pos = output_positions(self.outputs)
        self._arity = len(arguments)
        if program is not None:
            check_program(self.name, program, self.max_batch_size, self.inputs, self._input_pos, self.outputs,
                          self._output_pos)
        logger.info("model '%s' instance '%s': %s on %s", self.name, self.instance.name, kind, self._device)

    @classmethod
    def auto_complete(cls, config, version_dir: str):
        completed = super().auto_complete(config, version_dir)
        completed.platform = completed.platform or PLATFORM
        completed.backend = completed.backend or BACKEND
        return completed

    def _check_specs(self) -> None:
        if not self.inputs or not self.outputs:
            raise ModelLoadError(f"model '{self.name}': the pytorch backend needs the config to list the "
                                 f"inputs and outputs (a TorchScript file records neither names nor dtypes)")
        for spec in (*self.inputs.values(), *self.outputs.values()):
            if spec.type.is_bytes:
                raise ModelLoadError(f"model '{self.name}': tensor '{spec.name}' is TYPE_STRING, which the "
                                     f"pytorch backend does not support; use the python backend")

    def execute(self, inputs: Mapping[str, np.ndarray],
                output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        import torch
        if self._module is None:
            raise ModelExecutionError(f"model '{self.name}' instance '{self.instance.name}' was finalized",
                                      "UNAVAILABLE")
        arrays, batch, names = self.check_request(inputs, output_names)
        args = [None] * (max(self._input_pos.values()) + 1)
        for name, array in arrays.items():
            args[self._input_pos[name]] = self._to_torch(to_model_shape(array, self.inputs[name], batch))
        grad = torch.inference_mode() if self._inference_mode else torch.no_grad()
        optimized = contextlib.nullcontext() if self._optimized else torch.jit.optimized_execution(False)
        try:
            with grad, optimized:
                result = self._module(*args)
        except Exception as e:  # any failure inside the model is this batch's error
            raise ModelExecutionError(f"model '{self.name}' failed: {type(e).__name__}: {str(e)[:2000]}") from None
        return {name: self._output(name, result, batch) for name in names}

    def _to_torch(self, array: np.ndarray):
        import torch
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:
            array = array.copy()
        if array.dtype.name == "bfloat16":
            tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(array)
        return tensor.to(self._device)

    def _output(self, name: str, result, batch: int | None) -> np.ndarray:
        import torch
        spec = self.outputs[name]
        if isinstance(result, dict):
            tensor = result.get(name)
        elif isinstance(result, (tuple, list)):
            position = self._output_pos[name]
            tensor = result[position] if position < len(result) else None
        else:
            tensor = result if self._output_pos[name] == 0 else None
        if not isinstance(tensor, torch.Tensor):
            raise ModelExecutionError(f"model '{self.name}' returned no tensor for output '{name}' "
                                      f"(got {type(result).__name__})")
        tensor = tensor.detach().cpu()
        array = (tensor.view(torch.int16).numpy().view(dtypes.from_v2("BF16").numpy)
                 if tensor.dtype == torch.bfloat16 else tensor.numpy())
        actual = _torch_types().get(tensor.dtype)
        if actual != spec.type.v2_name:
            raise ModelExecutionError(f"unexpected datatype {tensor.dtype} for inference output '{name}' of "
                                      f"model '{self.name}', expecting {spec.type.config_name}")
        return from_model_shape(array, spec, batch, self.name)

    def finalize(self) -> None:
        self._module = None
