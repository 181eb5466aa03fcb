"""The LLMs of ``flotilla serve`` as KServe v2 models.

``LLMModel`` adapts one served engine (its OpenAI-side ``ServingContext``: tokenizer lanes, admission,
metrics, abort on close) to ``ServedModel`` with the conventions of Triton's vLLM backend, so Triton clients
work unchanged:
- inputs ``text_input`` (BYTES, the prompt), optional ``stream`` (BOOL), ``sampling_parameters`` (BYTES, a
  JSON object) and ``exclude_input_in_output`` (BOOL); output ``text_output`` (BYTES); the config says
  ``model_transaction_policy { decoupled: true }`` (gRPC ModelStreamInfer streams its responses).
- Generation parameters (request parameters, single-value inputs, ``sampling_parameters``) are vLLM's
  ``SamplingParams`` names (temperature, top_p, top_k, min_p, max_tokens, min_tokens, seed, stop,
  stop_token_ids, penalties, ignore_eos, ...): an unknown name or a bad value is INVALID_ARG naming it.
- ``generate`` with ``stream`` true yields the new text of each step; otherwise (the backend's default) one
  chunk with the whole text, the prompt first unless ``exclude_input_in_output``. ``infer`` is the latter
  as a tensor. Admission is the OpenAI side's (a full queue or a draining server: UNAVAILABLE); a client that
  goes away aborts the engine request.

"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, AsyncIterator, Mapping, Sequence

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from flotilla.entrypoints.kserve.infer_call import TEXT_INPUT, generation_arguments
from flotilla.entrypoints.openai.errors import APIError
from flotilla.repository.errors import InferError, invalid_arg
from flotilla.repository.service import InferOutcome, ModelMetadata, TensorMetadata
from flotilla.sampling_params import SamplingParams

VERSION = "1"
TEXT_OUTPUT = "text_output"
CONTROL_KEYS = ("stream", "exclude_input_in_output")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
                 "include_stop_str_in_output", "skip_special_tokens", "allowed_token_ids", "bad_words")


def sampling_params(params: Mapping[str, Any]) -> tuple[SamplingParams, bool, bool]:
    """(SamplingParams, stream, exclude_input_in_output) from generation parameters (see the module contract)."""
    unknown = sorted(k for k in params if k not in SAMPLING_KEYS and k not in CONTROL_KEYS)
    if unknown:
        raise invalid_arg(f"unsupported generation parameter '{unknown[0]}'; supported: "
                          f"{', '.join(CONTROL_KEYS + SAMPLING_KEYS)}")
    flags = []
    for key in CONTROL_KEYS:
        value = params.get(key, False)
        if not isinstance(value, bool):
            raise invalid_arg(f"parameter '{key}' must be a boolean, got {value!r}")
        flags.append(value)
    try:
        sp = SamplingParams(**{k: v for k, v in params.items() if k in SAMPLING_KEYS})
        sp.validate()
    except (TypeError, ValueError) as e:
        raise invalid_arg(f"invalid generation parameters: {e}") from None
    return sp, flags[0], flags[1]


@dataclasses.dataclass
class _Counters:
    success: int = 0
    fail: int = 0
    success_ns: int = 0
    last_inference_ms: int = 0


class LLMModel:
    """One served LLM as a KServe v2 model (see the module contract). ``ctx``: its ``ServingContext``."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.name, self.version = ctx.model_name, VERSION
        self._counters = _Counters()

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(self.name, (VERSION,), "flotilla",
                             (TensorMetadata(TEXT_INPUT, "BYTES", (1,)), TensorMetadata("stream", "BOOL", (1,)),
                              TensorMetadata("sampling_parameters", "BYTES", (1,)),
                              TensorMetadata("exclude_input_in_output", "BOOL", (1,))),
                             (TensorMetadata(TEXT_OUTPUT, "BYTES", (-1,)),))

    def config(self) -> mc.ModelConfig:
        config = mc.ModelConfig(name=self.name, backend="flotilla", max_batch_size=0)
        config.input.add(name=TEXT_INPUT, data_type=mc.TYPE_STRING, dims=[1])
        for name, dtype in (("stream", mc.TYPE_BOOL), ("sampling_parameters", mc.TYPE_STRING),
                            ("exclude_input_in_output", mc.TYPE_BOOL)):
            config.input.add(name=name, data_type=dtype, dims=[1], optional=True)
        config.output.add(name=TEXT_OUTPUT, data_type=mc.TYPE_STRING, dims=[-1])
        config.model_transaction_policy.decoupled = True
        config.parameters["max_model_len"].string_value = str(self.ctx.max_model_len)
        return config

    def ready(self) -> bool:
        engine = self.ctx.engine
        return not engine.is_dead and bool(getattr(engine, "is_ready", True))

    async def infer(self, inputs, *, requested_outputs: Sequence[str] = (), parameters=None, priority: int = 0,
                    timeout_us: int = 0) -> InferOutcome:
        for name in requested_outputs:
            if name != TEXT_OUTPUT:
                raise invalid_arg(f"unexpected inference output '{name}' for model '{self.name}'")
        text, params = generation_arguments(inputs, parameters or {})
        if params.get("stream"):
            raise invalid_arg(f"'stream' needs a streaming call (gRPC ModelStreamInfer) for model '{self.name}'")
        chunks = [chunk async for chunk in self.generate(text, params)]
        whole = "".join(c[TEXT_OUTPUT] for c in chunks)
        return InferOutcome({TEXT_OUTPUT: np.array([whole.encode("utf-8")], dtype=np.object_)})

    async def infer_stream(self, inputs, *, requested_outputs: Sequence[str] = (), parameters=None,
                           priority: int = 0, timeout_us: int = 0) -> AsyncIterator[InferOutcome]:
        """``generate`` as tensors: one ``text_output`` response per chunk (a step of an ensemble that streams)."""
        for name in requested_outputs:
            if name != TEXT_OUTPUT:
                raise invalid_arg(f"unexpected inference output '{name}' for model '{self.name}'")
        text, params = generation_arguments(inputs, parameters or {})
        async for chunk in self.generate(text, params):
            yield InferOutcome({TEXT_OUTPUT: np.array([chunk[TEXT_OUTPUT].encode("utf-8")], dtype=np.object_)})

    async def generate(self, text_input: str, parameters: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if not isinstance(text_input, str):
            raise invalid_arg(f"a generate request needs '{TEXT_INPUT}': a string (the prompt)")
        sp, stream, exclude_input = sampling_params(parameters)
        start = time.monotonic_ns()
        counters, ok = self._counters, False
        try:
            prepared = await self.ctx.prepare([text_input], sp)
            try:
                run = self.ctx.start(f"kserve-{uuid.uuid4().hex}", prepared, sp, stream=stream)
            except APIError as e:      # admission: a full queue (429) or a draining / dead server (503)
                raise InferError("UNAVAILABLE" if e.status in (429, 503) else "INVALID_ARG", e.message) from None
            try:
                whole = []
                async for _, out in run.outputs():
                    delta = out.outputs[0].text
                    if stream:
                        if delta:
                            yield {"model_name": self.name, "model_version": VERSION, TEXT_OUTPUT: delta}
                    else:
                        whole.append(delta)
                if not stream:
                    prefix = "" if exclude_input else text_input
                    yield {"model_name": self.name, "model_version": VERSION, TEXT_OUTPUT: prefix + "".join(whole)}
                ok = True
            finally:
                await run.close()
        finally:
            if ok:
                counters.success += 1
                counters.success_ns += time.monotonic_ns() - start
                counters.last_inference_ms = int(time.time() * 1000)
            else:
                counters.fail += 1

    def pending_request_count(self) -> int:
        """Admitted requests of this model without output yet (the OpenAI side's count, shared)."""
        return self.ctx.waiting.num_waiting

    def statistics(self) -> dict[str, Any]:
        c = self._counters
        return {"name": self.name, "version": VERSION, "last_inference": c.last_inference_ms,
                "inference_count": c.success, "execution_count": c.success,
                "inference_stats": {"success": {"count": c.success, "ns": c.success_ns},
                                    "fail": {"count": c.fail, "ns": 0}}}
