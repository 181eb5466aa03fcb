"""An embedding model of ``flotilla serve`` (``AsyncEmbedder``) as a KServe v2 model.

Contract: ``max_batch_size`` is the OpenAI side's limit of inputs per request; input ``text_input`` (BYTES,
dims [1]: one text per row, UTF-8), output ``embedding`` (FP32, dims [D]: one row per text, as
``/v1/embeddings`` computes it: truncated to the model's context as sentence-transformers does, pooled and
normalised per the model's config). Request parameters ``dimensions`` (Matryoshka models) and ``normalize``
are ``PoolingParams``; any other is INVALID_ARG naming it. Rows are tokenized on the app's tokenizer lane and
each joins the model's batcher (concurrent requests share forward passes); admission is the OpenAI side's
(a full queue or a draining server: UNAVAILABLE).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from flotilla.entrypoints.kserve.infer_call import TEXT_INPUT
from flotilla.entrypoints.openai.errors import APIError
from flotilla.entrypoints.openai.protocol import MAX_EMBEDDING_INPUTS
from flotilla.entrypoints.openai.serving_embedding import embed_all
from flotilla.errors import InvalidRequestError
from flotilla.pooling_params import PoolingParams
from flotilla.repository.errors import InferError, invalid_arg
from flotilla.repository.service import InferOutcome, ModelMetadata, TensorMetadata

VERSION = "1"
EMBEDDING = "embedding"
POOLING_KEYS = ("dimensions", "normalize")


class EmbeddingModel:
    """One served embedding model as a KServe v2 model (see the module contract). ``ctx``: its context."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.name, self.version = ctx.model_name, VERSION
        self.dim = int(getattr(ctx.engine, "output_dim", -1) or -1)
        self._success = self._fail = self._success_ns = self._rows = self._last_ms = 0

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(self.name, (VERSION,), "flotilla", (TensorMetadata(TEXT_INPUT, "BYTES", (-1, 1)),),
                             (TensorMetadata(EMBEDDING, "FP32", (-1, self.dim)),))

    def config(self) -> mc.ModelConfig:
        config = mc.ModelConfig(name=self.name, backend="flotilla", max_batch_size=MAX_EMBEDDING_INPUTS)
        config.input.add(name=TEXT_INPUT, data_type=mc.TYPE_STRING, dims=[1])
        config.output.add(name=EMBEDDING, data_type=mc.TYPE_FP32, dims=[self.dim])
        return config

    def ready(self) -> bool:
        return not self.ctx.engine.is_dead

    def _texts(self, inputs) -> list[str]:
        unknown = sorted(set(inputs) - {TEXT_INPUT})
        if unknown:
            raise invalid_arg(f"unexpected inference input '{unknown[0]}' for model '{self.name}'")
        array = inputs.get(TEXT_INPUT)
        if array is None:
            raise invalid_arg(f"expected 1 inputs but got 0 inputs for model '{self.name}'. Got input(s) [], but "
                              f"missing required input(s) ['{TEXT_INPUT}']. Please provide all required input(s).")
        if array.dtype != np.object_:
            raise invalid_arg(f"inference input '{TEXT_INPUT}' data-type is not 'BYTES', but model '{self.name}' "
                              f"expects 'BYTES'")
        if array.ndim != 2 or array.shape[1] != 1 or not 1 <= array.shape[0] <= MAX_EMBEDDING_INPUTS:
            raise invalid_arg(f"unexpected shape for input '{TEXT_INPUT}' for model '{self.name}'. Expected "
                              f"[-1,1] with 1 to {MAX_EMBEDDING_INPUTS} rows, got {list(array.shape)}")
        try:
            return [bytes(t).decode("utf-8") for t in array[:, 0]]
        except UnicodeDecodeError:
            raise invalid_arg(f"input '{TEXT_INPUT}' of model '{self.name}' must be UTF-8 text") from None

    def _params(self, parameters) -> PoolingParams:
        unknown = sorted(k for k in (parameters or {}) if k not in POOLING_KEYS)
        if unknown:
            raise invalid_arg(f"unsupported parameter '{unknown[0]}' for embedding model '{self.name}'; supported: "
                              f"{', '.join(POOLING_KEYS)}")
        return self.ctx.engine.check_params(PoolingParams(**{k: v for k, v in (parameters or {}).items()}))

    async def infer(self, inputs, *, requested_outputs: Sequence[str] = (), parameters=None, priority: int = 0,
                    timeout_us: int = 0) -> InferOutcome:
        for name in requested_outputs:
            if name != EMBEDDING:
                raise invalid_arg(f"unexpected inference output '{name}' for model '{self.name}'")
        start, ok = time.monotonic_ns(), False
        try:
            texts = self._texts(inputs)
            params = self._params(parameters)
            token_ids = await self.ctx.on_lane(sum(map(len, texts)),
                                               lambda processor: [processor.process(t, "input") for t in texts])
            try:
                self.ctx.admit(len(token_ids))
            except APIError as e:
                raise InferError("UNAVAILABLE" if e.status in (429, 503) else "INVALID_ARG", e.message) from None
            try:
                rows = await embed_all(self.ctx.engine, token_ids, params)
            finally:
                self.ctx.waiting.done_waiting(len(token_ids))
            embedding = np.stack([np.asarray(row.float().numpy() if hasattr(row, "numpy") else row, np.float32)
                                  for row in rows])                 # (rows, D)
            ok = True
            self._rows += len(rows)
            return InferOutcome({EMBEDDING: embedding})
        except InvalidRequestError as e:
            raise invalid_arg(e.message) from None
        finally:
            if ok:
                self._success += 1
                self._success_ns += time.monotonic_ns() - start
                self._last_ms = int(time.time() * 1000)
            else:
                self._fail += 1

    def pending_request_count(self) -> int:
        """Inputs waiting for the model's dynamic batcher now."""
        return int(getattr(getattr(self.ctx.engine, "batcher", None), "num_waiting", 0) or 0)

    def statistics(self) -> dict[str, Any]:
        return {"name": self.name, "version": VERSION, "last_inference": self._last_ms,
                "inference_count": self._rows, "execution_count": self._success,
                "inference_stats": {"success": {"count": self._success, "ns": self._success_ns},
                                    "fail": {"count": self._fail, "ns": 0}}}

    def generate(self, text_input: str, parameters):
        raise InferError("UNSUPPORTED", f"model '{self.name}' is an embedding model; it does not generate text")
