"""Ensembles (``platform: "ensemble"``, ``ensemble_scheduling { step [...] }``): validation with Triton's messages
and the request-level DAG that runs the steps, each through its own model's dynamic batcher.

Contracts:
- ``validate_ensemble_scheduling(config)``: the config on its own (Triton's ValidateEnsembleSchedulingConfig):
  steps present with model_name / input_map / output_map, no instance_group / optimization / warmup, an
  ensemble tensor written by at most one step, every ensemble output written (a cycle or a tensor nothing
  writes is "not written ... is not connected"), every tensor used. Raises ``ModelConfigError``.
- ``validate_dependencies(config, lookup)``: the config against its composing models once they are loaded
  (Triton's CheckNode + ValidateEnsembleConfig): each step's model exists, has a loaded (required) version,
  allows the ensemble's max_batch_size, and the input_map / output_map name its real inputs and outputs with
  consistent data types and shapes. ``lookup(name)`` is None for a model the repository does not have, else
  ``(loaded version -> effective config, load error or None)``. Raises ``ModelConfigError``.
- ``ensemble_cycle(name, steps_of)``: Triton's "circular dependency between ensembles" message, or None.
- ``EnsembleModel`` is a ``service.ServedModel``. ``infer`` checks the request against the ensemble's own
  inputs, then starts every step whose mapped inputs exist (independent steps run concurrently) with
  ``resolve(model_name, model_version)`` looked up when the step starts (so a reloaded composing model is
  picked up between steps), and answers with the requested (default: all) ensemble outputs. A failing step
  fails the request with that step's error and cancels the steps still running; cancelling the request
  cancels its running steps. Statistics: success / fail and durations of the ensemble requests; queue and
  compute are the sums over the requests' steps (as Triton's ensemble statistics aggregate the composing
  models'); an ensemble has no batch statistics of its own (its steps' models do).
- Decoupled steps (``decoupled_steps``: a model that streams its responses, such as an LLM of the server named
  by a step, see ``external``): the ensemble's effective config is then decoupled too, and ``infer_stream``
  yields one response per response of such a step, each flowing through the steps after it (Triton's ensemble
  over a decoupled model, e.g. pre-process -> LLM -> post-process streaming token by token). A streamed request
  runs its steps one at a time in step order. ``infer`` (not streamed) asks every step for one response.
- ``generate(text_input, parameters)`` (Triton's generate extension on an ensemble): ``text_input`` and every
  parameter named like an ensemble input become that input (one element, the input's data type); the other
  parameters are the request's. Yields one dict per response (``infer_stream`` for a decoupled ensemble):
  each output as a value (a one-element tensor as its element, BYTES decoded as UTF-8), else a list.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import numpy as np

from tritonclient.grpc import model_config_pb2 as mc

from flotilla.repository import dtypes
from flotilla.repository.config import ENSEMBLE_PLATFORM, WILDCARD_DIM, ModelConfig
from flotilla.repository.errors import InferError, ModelConfigError
from flotilla.repository.served import RequestStats, StepTimes, model_metadata, statistics_json
from flotilla.repository.service import InferOutcome, ModelMetadata
from flotilla.repository.tensors import ModelIO, dims_str

LATEST = -1


@dataclass(frozen=True)
class EnsembleStep:
    model_name: str
    model_version: int                     # -1: the latest ready version
    input_map: Mapping[str, str]           # model input -> ensemble tensor
    output_map: Mapping[str, str]          # model output -> ensemble tensor


def ensemble_steps(config: ModelConfig) -> list[EnsembleStep]:
    return [EnsembleStep(s.model_name, int(s.model_version), dict(sorted(s.input_map.items())),
                         dict(sorted(s.output_map.items()))) for s in config.ensemble_scheduling.step]


def is_ensemble(config: ModelConfig | None) -> bool:
    return config is not None and config.platform == ENSEMBLE_PLATFORM


# ------------------------------------------------------------------------------------ the config alone

def _fail(message: str) -> ModelConfigError:
    return ModelConfigError(message)


def validate_ensemble_scheduling(config: ModelConfig) -> None:
    """Raise ModelConfigError unless the ensemble's own config is a valid data flow (see the module contract)."""
    name = config.name
    if config.instance_group:
        raise _fail(f"instance group should not be specified for ensemble '{name}'")
    if config.HasField("optimization"):
        raise _fail(f"optimization should not be specified for ensemble '{name}'")
    if config.model_warmup:
        raise _fail(f"model_warmup can not be specified for ensemble '{name}'")
    steps = ensemble_steps(config)
    if not steps:
        raise _fail(f"must specify 'step' for ensemble '{name}'")
    writers, readers = _graph(name, steps)
    ready = _reachable(config, steps)
    outputs = {o.name for o in config.output}
    for output in config.output:
        if output.name not in writers and output.name not in readers:
            raise _fail(f"ensemble output '{output.name}' for ensemble {name}' is not used")
        if output.name not in ready:
            raise _fail(_not_written(name, output.name, writers, steps, ready))
    for tensor in sorted(set(writers) | set(readers)):
        if tensor in outputs:
            continue
        if tensor not in ready or tensor not in readers:
            raise _fail(f"ensemble tensor '{tensor}' is unused in ensemble '{name}'")


def _graph(name: str, steps: Sequence[EnsembleStep]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(tensor -> the step writing it, tensor -> the steps reading it), with Triton's structural checks."""
    writers: dict[str, int] = {}
    readers: dict[str, list[int]] = {}
    for i, step in enumerate(steps):
        for field, value in (("model_name", step.model_name), ("input_map", step.input_map),
                             ("output_map", step.output_map)):
            if not value:
                raise _fail(f"must specify '{field}' in step {i} of ensemble '{name}'")
        for tensor in step.output_map.values():
            if tensor in writers:
                raise _fail(f"ensemble tensor '{tensor}' can appear in an output map only once for ensemble "
                            f"'{name}' step {i}")
            writers[tensor] = i
        for tensor in step.input_map.values():
            readers.setdefault(tensor, []).append(i)
    return writers, readers


def _reachable(config: ModelConfig, steps: Sequence[EnsembleStep]) -> set[str]:
    """The tensors that exist once the ensemble inputs do (a step runs when all its inputs exist)."""
    ready = {i.name for i in config.input}
    done: set[int] = set()
    progress = True
    while progress:
        progress = False
        for i, step in enumerate(steps):
            if i not in done and set(step.input_map.values()) <= ready:
                ready |= set(step.output_map.values())
                done.add(i)
                progress = True
    return ready


def _step_order(config: ModelConfig, steps: Sequence[EnsembleStep]) -> list[int]:
    """Step indices in an order where each step's inputs exist before it runs (config order among the
    steps that could run; a step that never can is left out: the config validation rejects that)."""
    ready = {i.name for i in config.input}
    order: list[int] = []
    progress = True
    while progress:
        progress = False
        for i, step in enumerate(steps):
            if i not in order and set(step.input_map.values()) <= ready:
                ready |= set(step.output_map.values())
                order.append(i)
                progress = True
                break
    return order


def _not_written(name: str, output: str, writers: Mapping[str, int], steps: Sequence[EnsembleStep],
                 ready: set[str]) -> str:
    message = f"output '{output}' for ensemble '{name}' is not written"
    seen, current, source = set(), output, output
    while current in writers:     # follow unready inputs upstream to the tensor nothing connects
        step = steps[writers[current]]
        nxt = next((t for t in step.input_map.values() if t not in ready and t not in seen), None)
        if nxt is None:
            break
        seen.add(nxt)
        current = source = nxt
    if source != output:
        message += f": at least one of its depending tensors, '{source}', is not connected"
    return message


# ---------------------------------------------------------------------------- against composing models

Lookup = Callable[[str], "tuple[Mapping[int, ModelConfig], str | None] | None"]


def validate_dependencies(config: ModelConfig, lookup: Lookup) -> None:
    """Raise ModelConfigError unless every composing model fits (see the module contract)."""
    name, steps = config.name, ensemble_steps(config)
    missing = sorted({s.model_name for s in steps if lookup(s.model_name) is None})
    if missing:
        raise _fail(f"ensemble {name} contains models that are not available or ambiguous: {', '.join(missing)}")
    tensors = {}
    for io in (*config.input, *config.output):
        dims = tuple(io.reshape.shape) if io.HasField("reshape") else tuple(io.dims)
        tensors[io.name] = _Node(name, config.max_batch_size > 0, io.data_type, dims)
    for step in steps:
        composing = _composing_config(name, step, lookup)
        if 0 < composing.max_batch_size < config.max_batch_size:
            raise _fail(f"ensemble {name} allows maximum batch size {config.max_batch_size}, but it contains "
                        f"model {step.model_name} which only allows maximum batch size to be "
                        f"{composing.max_batch_size}")
        _check_mapping(name, step, composing, tensors)


def _composing_config(name: str, step: EnsembleStep, lookup: Lookup) -> ModelConfig:
    loaded, error = lookup(step.model_name)
    if not loaded:
        message = f"ensemble '{name}' depends on '{step.model_name}' which has no loaded version."
        if error:
            message += f" Model '{step.model_name}' loading failed with error: {error}"
        raise _fail(message)
    if step.model_version != LATEST:
        if step.model_version not in loaded:
            raise _fail(f"ensemble '{name}' depends on '{step.model_name}' whose required version "
                        f"{step.model_version} is not loaded.")
        return loaded[step.model_version]
    return loaded[max(loaded)]


@dataclass(frozen=True)
class _Node:
    model: str
    batching: bool
    data_type: int
    dims: tuple[int, ...]

    @property
    def full_dims(self) -> tuple[int, ...]:
        return ((WILDCARD_DIM,) if self.batching else ()) + self.dims


def _dims_match(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(x == y or WILDCARD_DIM in (x, y) for x, y in zip(a, b))


def _consistent(ensemble: str, tensor: str, known: _Node, new: _Node) -> None:
    prefix = f"in ensemble {ensemble}, ensemble tensor {tensor}: "
    if known.data_type != new.data_type:
        raise _fail(prefix + f"inconsistent data type: {mc.DataType.Name(known.data_type)} is inferred from model "
                    f"{known.model} while {mc.DataType.Name(new.data_type)} is inferred from model {new.model}")
    if not _dims_match(known.dims, new.dims) and not _dims_match(known.full_dims, new.full_dims):
        raise _fail(prefix + f"inconsistent shape: {dims_str(known.full_dims)} is inferred from model "
                    f"{known.model} while {dims_str(new.full_dims)} is inferred from model {new.model}")


def _check_mapping(ensemble: str, step: EnsembleStep, config: ModelConfig, tensors: dict[str, _Node]) -> None:
    """Triton's ValidateTensorMapping for one step."""
    model, batching = step.model_name, config.max_batch_size > 0
    inputs = {i.name: i for i in config.input}
    for model_input, tensor in step.input_map.items():
        if model_input not in inputs:
            raise _fail(f"in ensemble {ensemble}, ensemble tensor {tensor} is mapping to non-existing input "
                        f"{model_input} in model {model}")
    for model_input in config.input:
        tensor = step.input_map.get(model_input.name)
        if tensor is None:
            if model_input.optional:
                continue
            raise _fail(f"in ensemble {ensemble}, input {model_input.name} in model {model} is not mapped to any "
                        f"ensemble tensors")
        node = _Node(model, batching, model_input.data_type, tuple(model_input.dims))
        _consistent(ensemble, tensor, tensors.setdefault(tensor, node), node)
    outputs = {o.name: o for o in config.output}
    for model_output, tensor in step.output_map.items():
        if model_output not in outputs:
            raise _fail(f"in ensemble {ensemble}, ensemble tensor {tensor} is mapped from non-existing output "
                        f"{model_output} in model {model}")
        out = outputs[model_output]
        node = _Node(model, batching, out.data_type, tuple(out.dims))
        _consistent(ensemble, tensor, tensors.setdefault(tensor, node), node)


def ensemble_cycle(name: str, steps_of: Callable[[str], Sequence[str] | None]) -> str | None:
    """Triton's message when ``name`` reaches itself through ensembles' steps (``steps_of(model)``: the
    composing model names of an ensemble, None for other models), else None."""
    def visit(current: str, seen: set[str]) -> str | None:
        for upstream in steps_of(current) or ():
            if upstream == name:
                return f"circular dependency between ensembles: {name} -> ... -> {current} -> {name}"
            if upstream not in seen:
                seen.add(upstream)
                found = visit(upstream, seen)
                if found:
                    return found
        return None
    return visit(name, set())


# --------------------------------------------------------------------------------------------- serving

Resolve = Callable[[str, int], Any]   # (model name, version or -1) -> a served model with ``infer_timed``


class EnsembleModel:
    """One version of an ensemble (see the module contract). Event-loop thread only."""

    def __init__(self, config: ModelConfig, version: int, resolve: Resolve,
                 versions_of: Callable[[], Sequence[str]], decoupled_steps: frozenset[int] = frozenset()):
        self.name = config.name
        self.version = str(version)
        self._decoupled = frozenset(decoupled_steps)
        if self._decoupled:
            config = _copy(config)
            config.model_transaction_policy.decoupled = True
        self._config = config
        self._io = ModelIO.from_config(config)
        self._steps = ensemble_steps(config)
        self._order = _step_order(config, self._steps)    # a topological order (streamed requests)
        self._resolve = resolve
        self._versions_of = versions_of
        self._metadata = model_metadata(config, (self.version,))
        self._requests = RequestStats()
        self._times = StepTimes()
        self._inference_count = 0
        self._accepting = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ----------------------------------------------------------------------------------- ServedModel

    def metadata(self) -> ModelMetadata:
        m = self._metadata
        return ModelMetadata(m.name, tuple(self._versions_of()) or (self.version,), m.platform, m.inputs,
                             m.outputs)

    def config(self) -> ModelConfig:
        return self._config

    def ready(self) -> bool:
        return self._accepting

    async def start(self) -> None:
        self._accepting = True

    async def stop(self, drain: bool = True) -> None:
        """Stop admitting; with ``drain``, wait until the requests already running have finished (their steps
        run on the composing models, so unload those after the ensembles)."""
        self._accepting = False
        if drain:
            await self._idle.wait()

    async def infer(self, inputs: Mapping[str, np.ndarray], *, requested_outputs: Sequence[str] = (),
                    parameters: Mapping[str, Any] | None = None, priority: int = 0,
                    timeout_us: int = 0) -> InferOutcome:
        outcome, _ = await self.infer_timed(inputs, requested_outputs=requested_outputs, parameters=parameters,
                                            priority=priority, timeout_us=timeout_us)
        return outcome

    async def infer_timed(self, inputs: Mapping[str, np.ndarray], *, requested_outputs: Sequence[str] = (),
                          parameters: Mapping[str, Any] | None = None, priority: int = 0,
                          timeout_us: int = 0) -> tuple[InferOutcome, StepTimes]:
        self._admit()
        start, ok = time.perf_counter(), False
        try:
            names = self._io.select_outputs(requested_outputs)
            batch_size, _, checked = self._io.check_request(inputs)
            checked = self._with_absent(checked)
            run = dict(parameters or {}), priority, timeout_us
            tensors, times = await self._run_steps(checked, run)
            outcome = self._outcome(names, tensors)
            ok = True
        finally:
            self._settle(ok, start)
        self._inference_count += batch_size
        self._times = self._times + times
        return outcome, times

    async def infer_stream(self, inputs: Mapping[str, np.ndarray], *, requested_outputs: Sequence[str] = (),
                           parameters: Mapping[str, Any] | None = None, priority: int = 0,
                           timeout_us: int = 0) -> AsyncIterator[InferOutcome]:
        """One response per response of the decoupled steps (see the module contract)."""
        self._admit()
        start, ok = time.perf_counter(), False
        times = StepTimes()
        try:
            names = self._io.select_outputs(requested_outputs)
            batch_size, _, checked = self._io.check_request(inputs)
            checked = self._with_absent(checked)
            run = dict(parameters or {}), priority, timeout_us
            async for tensors, step_times in self._flow(checked, 0, run):
                times = times + step_times
                yield self._outcome(names, tensors)
            ok = True
        finally:
            self._settle(ok, start)
            self._times = self._times + times
        self._inference_count += batch_size

    def _with_absent(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | None]:
        """The request's tensors plus ``None`` for each optional ensemble input it left out: a step mapping
        one runs without that input (as in Triton)."""
        absent = {name: None for name, spec in self._io.inputs.items() if spec.optional and name not in tensors}
        return {**tensors, **absent}

    def _admit(self) -> None:
        """Count a request in (``_settle`` counts it out); InferError UNAVAILABLE once this version stopped."""
        if not self._accepting:
            raise InferError("UNAVAILABLE", f"ensemble '{self.name}' version {self.version} is not at ready state")
        self._in_flight += 1
        self._idle.clear()

    def _settle(self, ok: bool, start: float) -> None:
        self._requests.record(ok, time.perf_counter() - start)
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    def _outcome(self, names: Sequence[str], tensors: Mapping[str, np.ndarray]) -> InferOutcome:
        outputs = {}
        for name in names:
            if name not in tensors:
                raise InferError("INTERNAL", f"ensemble '{self.name}' did not produce output '{name}'")
            outputs[name] = tensors[name]
        return InferOutcome(outputs)

    async def _flow(self, tensors: dict[str, np.ndarray], first: int, run: tuple):
        """The streamed DAG from position ``first`` of the step order on: yields (tensors, StepTimes) once per
        response that reached the end; a decoupled step forks the flow once per response it sends."""
        times = StepTimes()
        for position in range(first, len(self._order)):
            i = self._order[position]
            step = self._steps[i]
            if not set(step.input_map.values()) <= tensors.keys():
                raise InferError("INTERNAL", f"ensemble '{self.name}': step {i} ('{step.model_name}') can never "
                                             f"run (inputs not produced)")
            if i in self._decoupled:
                async for outcome, step_times in self._stream_step(step, tensors, run):
                    branch = dict(tensors)
                    self._store(step, outcome, branch)
                    async for done, rest in self._flow(branch, position + 1, run):
                        yield done, times + step_times + rest
                        times = StepTimes()            # counted once
                return
            outcome, step_times = await self._step(step, tensors, run)
            times = times + step_times
            self._store(step, outcome, tensors)
        yield tensors, times

    async def _stream_step(self, step: EnsembleStep, tensors: Mapping[str, np.ndarray], run: tuple):
        parameters, priority, timeout_us = run
        model = self._resolve(step.model_name, step.model_version)
        inputs = _step_inputs(step, tensors)
        stream = getattr(model, "infer_stream", None)
        if stream is None:
            yield await self._step(step, tensors, run)
            return
        start = time.perf_counter()
        async for outcome in stream(inputs, requested_outputs=list(step.output_map), parameters=parameters,
                                    priority=priority, timeout_us=timeout_us):
            now = time.perf_counter()
            yield outcome, StepTimes(compute_infer_s=now - start)
            start = time.perf_counter()

    def _store(self, step: EnsembleStep, outcome: InferOutcome, tensors: dict[str, np.ndarray]) -> None:
        for model_output, tensor in step.output_map.items():
            if model_output not in outcome.outputs:
                raise InferError("INTERNAL", f"model '{step.model_name}' did not produce output "
                                             f"'{model_output}' for ensemble '{self.name}'")
            tensors[tensor] = outcome.outputs[model_output]

    async def _run_steps(self, tensors: dict[str, np.ndarray], run: tuple) -> tuple[dict[str, np.ndarray], StepTimes]:
        """Run the DAG: a step starts once every tensor its input_map names exists."""
        pending = set(range(len(self._steps)))
        running: dict[asyncio.Task, int] = {}
        times = StepTimes()
        try:
            while pending or running:
                for i in sorted(pending):
                    step = self._steps[i]
                    if set(step.input_map.values()) <= tensors.keys():
                        pending.discard(i)
                        running[asyncio.ensure_future(self._step(step, tensors, run))] = i
                if not running:
                    raise InferError("INTERNAL", f"ensemble '{self.name}': steps "
                                                 f"{sorted(pending)} can never run (inputs not produced)")
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    step = self._steps[running.pop(task)]
                    outcome, step_times = task.result()      # a step's InferError fails the request
                    times = times + step_times
                    self._store(step, outcome, tensors)
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        return tensors, times

    async def _step(self, step: EnsembleStep, tensors: Mapping[str, np.ndarray], run: tuple):
        parameters, priority, timeout_us = run
        model = self._resolve(step.model_name, step.model_version)
        inputs = _step_inputs(step, tensors)
        return await model.infer_timed(inputs, requested_outputs=list(step.output_map), parameters=parameters,
                                       priority=priority, timeout_us=timeout_us)

    def statistics(self) -> dict[str, Any]:
        r, t = self._requests, self._times
        return statistics_json(self.name, self.version, r, inference_count=self._inference_count,
                               execution_count=r.success_count, queue=(r.success_count, t.queue_s),
                               compute=(r.success_count, t.compute_input_s, t.compute_infer_s,
                                        t.compute_output_s))

    async def generate(self, text_input: str | None, parameters: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Triton's generate extension (see the module contract)."""
        inputs, request_parameters = self._generate_inputs(text_input, parameters)
        if self._decoupled:
            async for outcome in self.infer_stream(inputs, parameters=request_parameters):
                yield _as_values(outcome.outputs)
            return
        outcome = await self.infer(inputs, parameters=request_parameters)
        yield _as_values(outcome.outputs)

    def _generate_inputs(self, text_input: str, parameters: Mapping[str, Any]):
        values = dict(parameters) if text_input is None else {"text_input": text_input, **parameters}
        inputs, rest = {}, {}
        for key, value in values.items():
            spec = self._io.inputs.get(key)
            if spec is None:
                if key == "text_input":
                    raise InferError("INVALID_ARG", f"ensemble '{self.name}' has no input 'text_input'")
                rest[key] = value
                continue
            rank = len(spec.dims) + (1 if self._io.batching else 0)
            try:
                array = (dtypes.as_bytes_array(np.array(value, dtype=np.object_)) if spec.type.is_bytes
                         else np.array(value, dtype=spec.type.numpy))
            except (TypeError, ValueError) as e:
                raise InferError("INVALID_ARG", f"generate parameter '{key}' is not a valid {spec.datatype} "
                                                f"value for input '{key}' of ensemble '{self.name}': {e}") from None
            inputs[key] = array.reshape((1,) * max(rank - array.ndim, 0) + array.shape)
        return inputs, rest


def _step_inputs(step: EnsembleStep, tensors: Mapping[str, np.ndarray | None]) -> dict[str, np.ndarray]:
    """A step's inputs from the ensemble tensors (an absent optional ensemble input is left out)."""
    return {model_input: tensors[tensor] for model_input, tensor in step.input_map.items()
            if tensors[tensor] is not None}


def _copy(config: ModelConfig) -> ModelConfig:
    out = mc.ModelConfig()
    out.CopyFrom(config)
    return out


def _as_values(outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A generate response: a one-element tensor as its element (BYTES as UTF-8 text), others as lists."""
    values: dict[str, Any] = {}
    for name, array in outputs.items():
        if array.dtype == np.object_:
            array = np.vectorize(lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b,
                                 otypes=[object])(array)
        values[name] = array.reshape(-1)[0].item() if array.size == 1 and array.dtype != np.object_ else (
            array.reshape(-1)[0] if array.size == 1 else array.tolist())
    return values
