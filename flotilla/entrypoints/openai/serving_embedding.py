"""POST /v1/embeddings (OpenAI's Embeddings API, as vLLM serves it).

Contract: ``model`` picks an embedding model (a generative model is a 400 naming ``model``, as the
generation routes are for an embedding model). ``input`` is a text, a list of texts, a token-id list or a
list of token-id lists (1 to 2048 inputs; an empty text or list is a 400). Texts are truncated to the
model's ``max_model_len`` tokens as sentence-transformers does; token ids are taken as given and must fit
it (else 400). ``dimensions`` is allowed on Matryoshka models only (400 otherwise). Every input is
tokenized and validated before any is embedded; each one then joins the model's batcher, so concurrent
requests share forward passes. The response lists one ``{"object": "embedding", "index", "embedding"}`` per
input in input order, the embedding as JSON floats or, with ``encoding_format: "base64"``, the base64 of its
little-endian float32 bytes (what the openai client asks for by default), and ``usage`` counts the input
tokens. A client that disconnects gets nothing; its inputs still waiting are dropped from the queue.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from flotilla.entrypoints.openai.body import parse_body
from flotilla.entrypoints.openai.cancellation import Disconnected, run_unless_disconnected
from flotilla.entrypoints.openai.generation import ServingContext
from flotilla.entrypoints.openai.models import ServedModels
from flotilla.entrypoints.openai.protocol import EmbeddingRequest
from flotilla.errors import InvalidRequestError
from flotilla.pooling_params import PoolingParams

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it


async def create_embedding(served: ServedModels, request: Request) -> Response:
    req = await parse_body(request, EmbeddingRequest)
    ctx = served.resolve(req.model, req.user, runner="pooling")
    params = ctx.engine.check_params(PoolingParams(dimensions=req.dimensions))
    inputs = req.inputs()
    token_ids = await ctx.on_lane(sum(len(x) for x in inputs), lambda processor: _tokenize_all(processor, inputs))
    start = time.monotonic()
    ctx.admit(len(token_ids))
    try:
        rows = await run_unless_disconnected(request.receive, embed_all(ctx.engine, token_ids, params))
    finally:
        ctx.waiting.done_waiting(len(token_ids))
    if rows is Disconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    _record(ctx, token_ids, time.monotonic() - start)
    num_tokens = sum(len(ids) for ids in token_ids)
    encode = _base64 if req.encoding_format == "base64" else _floats

    def render() -> bytes:  # up to 2048 x D floats: 0.4 s of JSON for 384 dimensions, off the event loop
        return json.dumps({
            "id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": ctx.model_name,
            "data": [{"object": "embedding", "index": i, "embedding": encode(row)} for i, row in enumerate(rows)],
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}},
            ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    body = await asyncio.get_running_loop().run_in_executor(None, render)
    return Response(body, media_type="application/json")


def _tokenize_all(processor, inputs: list) -> list[list[int]]:
    """Every input's token ids (on a tokenizer lane); a bad input is a 400 naming its index."""
    out = []
    for i, item in enumerate(inputs):
        try:
            out.append(processor.process(item, "input"))
        except InvalidRequestError as e:
            if len(inputs) == 1:
                raise
            raise InvalidRequestError(f"input[{i}]: {e.message}", "input") from None
    return out


async def embed_all(engine, token_ids: list[list[int]], params: PoolingParams) -> list:
    """Every input's embedding, in order, submitted together (``AsyncEmbedder.embed_many``: the same request
    alone gets the same batch, so the same bits); if one fails (or this is cancelled) the others are cancelled."""
    return await engine.embed_many(token_ids, params)


def _floats(row) -> list[float]:
    return row.tolist()


def _base64(row) -> str:
    return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii")


def _record(ctx: ServingContext, token_ids: list[list[int]], seconds: float) -> None:
    metrics = ctx.metrics
    metrics.prompt_tokens.inc(sum(len(ids) for ids in token_ids))
    metrics.e2e.observe(seconds)
    for ids in token_ids:
        metrics.request_prompt_tokens.observe(len(ids))
        metrics.count_finished("stop")
