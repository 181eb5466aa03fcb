"""POST /v1/completions.

Contract: ``model`` (a model name or route alias; optional when one model is served) picks the model
through ``ServedModels.resolve``; the response's ``model`` is the model that served it. Choices are
numbered ``prompt_index * n + sample_index``. Streaming sends one chunk per generated token per choice
(a chunk whose text is empty is still sent when a multi-token character is held back), the choice's last
chunk carries ``finish_reason``, then a usage chunk (``choices: []``) if
``stream_options.include_usage``, then ``data: [DONE]``; an error after the stream started is sent as an
``{"error": ...}`` event followed by ``[DONE]``. ``echo`` prepends the prompt text to the choice's text (to
its first chunk when streaming); with ``logprobs: k`` the legacy logprobs object then covers the prompt tokens
(the first one's logprob and top_logprobs null) before the generated ones, and ``max_tokens: 0`` returns the
prompt alone (finish_reason "length"), which is how lm-evaluation-harness scores text. vLLM's
``prompt_logprobs: k`` adds each choice's ``prompt_logprobs`` (non-streaming only). Non-streaming responses carry
``usage``. A client that disconnects aborts the engine requests. vLLM's ``priority`` and the in-process
``"flotilla.priority"`` ASGI scope key set the engine requests' priority (``generation.request_priority``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from flotilla.entrypoints.openai.body import parse_body
from flotilla.entrypoints.openai.cancellation import Disconnected, run_unless_disconnected
from flotilla.entrypoints.openai.errors import error_body, to_api_error
from flotilla.entrypoints.openai.generation import EngineRun, ServingContext, wants_final_only
from flotilla.entrypoints.openai.models import ServedModels
from flotilla.entrypoints.openai.protocol import CompletionRequest
from flotilla.entrypoints.openai.responses import (ChoiceAccumulator, best_of, completion_logprobs,
                                                   concat_logprobs, echo_logprobs, prompt_logprobs_json, usage)
from flotilla.outputs import RequestOutput
from flotilla.entrypoints.openai.sse import SSE_DONE, SSEResponse, sse_data

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it


class _Job:
    """What one completions request needs while it produces its response."""

    def __init__(self, ctx: ServingContext, req: CompletionRequest, prepared, run: EngineRun):
        self.ctx, self.req, self.prepared, self.run = ctx, req, prepared, run
        self.id = run.base_id
        self.created = int(time.time())
        self.n = req.n or 1
        self.echo_texts = [self._prompt_text(p) for p in prepared] if req.echo else None
        self.echo_logprobs = bool(req.echo) and req.logprobs is not None
        self.prompt_logprobs: dict[int, list] = {}  # prompt index -> the engine's PromptLogprobs

    def _prompt_text(self, p) -> str:
        return p.prompt if p.prompt is not None else self.ctx.engine.tokenizer.decode(p.prompt_token_ids)

    def seen(self, prompt_index: int, out: RequestOutput) -> None:
        """Keep a prompt's logprobs (they come with the first output of its engine request)."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs.setdefault(prompt_index, out.prompt_logprobs)

    def echo_part(self, prompt_index: int) -> tuple[dict | None, int]:
        """The legacy logprobs of the echoed prompt and the text offset after it; (None, 0) without echo
        and logprobs, or for a request aborted before its prompt was computed."""
        if not self.echo_logprobs or prompt_index not in self.prompt_logprobs:
            return None, 0
        ids = self.prepared[prompt_index].prompt_token_ids
        return echo_logprobs(ids, self.prompt_logprobs[prompt_index], self.ctx.engine.tokenizer, self.req.logprobs)

    def logprobs(self, prompt_index: int, first: bool, token_ids, logprobs, offset: int) -> tuple[dict | None, int]:
        """A choice's legacy logprobs for these generated tokens (after the echoed prompt's when ``first``)
        and the offset after them."""
        head = None
        if first:
            head, offset = self.echo_part(prompt_index)
        if logprobs is None:
            return head, offset
        body, offset = completion_logprobs(token_ids, logprobs, self.ctx.engine.tokenizer, offset)
        return (body if head is None else concat_logprobs(head, body)), offset

    def prompt_logprobs_field(self, prompt_index: int) -> dict:
        """``{"prompt_logprobs": [...]}`` when the request asked for vLLM's field, else {}."""
        if self.req.prompt_logprobs is None:
            return {}
        if prompt_index not in self.prompt_logprobs:  # aborted before its prompt was computed
            return {"prompt_logprobs": None}
        ids = self.prepared[prompt_index].prompt_token_ids
        return {"prompt_logprobs": prompt_logprobs_json(ids, self.prompt_logprobs[prompt_index],
                                                        self.req.prompt_logprobs)}

    def envelope(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.ctx.model_name, "choices": choices, **extra}

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.prompt_token_ids) for p in self.prepared)


async def create_completion(served: ServedModels, request: Request) -> Response:
    req = await parse_body(request, CompletionRequest)
    ctx = served.resolve(req.model, req.user, runner="generate")
    priority = ctx.priority(req.priority, request.scope)
    prompts = req.prompts()
    params = req.to_sampling_params()
    prepared = await ctx.prepare(prompts, params, req.cache_salt)
    run = ctx.start(f"cmpl-{uuid.uuid4().hex}", prepared, params, stream=bool(req.stream), priority=priority,
                    final_only=wants_final_only(request.scope))
    job = _Job(ctx, req, prepared, run)
    return await respond(request, run, req.stream, lambda: _stream(job), lambda: _collect(job))


async def respond(request: Request, run, stream: bool, make_stream, make_collect) -> Response:
    """A generation endpoint's response: SSE when streaming, else the collected JSON body (or 499 when the
    client left first; its request was aborted)."""
    if stream:
        return SSEResponse(make_stream(), run.close)
    result = await run_unless_disconnected(request.receive, make_collect())
    if result is Disconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(result)


async def _collect(job: _Job) -> dict:
    samples = job.req.num_samples  # best_of (default n)
    choices = [ChoiceAccumulator(i) for i in range(len(job.prepared) * samples)]
    try:
        async for prompt_index, out in job.run.outputs():
            job.seen(prompt_index, out)
            for c in out.outputs:
                choices[prompt_index * samples + c.index].add(c)
    finally:
        await job.run.close()
    completion_tokens = sum(len(ch.token_ids) for ch in choices)  # best_of: every sample generated
    choices = best_of(choices, samples, job.n, job.req.logprobs is not None)
    body = [_final_choice(job, ch) for ch in choices]
    return job.envelope(body, usage=usage(job.num_prompt_tokens, completion_tokens))


def _final_choice(job: _Job, ch: ChoiceAccumulator) -> dict:
    text = ch.text
    prompt_index = ch.index // job.n
    if job.echo_texts is not None:
        text = job.echo_texts[prompt_index] + text
    logprobs, _ = job.logprobs(prompt_index, True, ch.token_ids, ch.logprobs, 0)
    return {"index": ch.index, "text": text, "logprobs": logprobs, "finish_reason": ch.finish_reason or "abort",
            "stop_reason": ch.stop_reason, **job.prompt_logprobs_field(prompt_index)}


async def _stream(job: _Job) -> AsyncIterator[bytes]:
    started: set[int] = set()
    finished: set[int] = set()
    offsets: dict[int, int] = {}
    completion_tokens = 0
    try:
        async for prompt_index, out in job.run.outputs():
            job.seen(prompt_index, out)
            for c in out.outputs:
                index = prompt_index * job.n + c.index
                text = c.text
                first = index not in started
                if first:
                    started.add(index)
                    if job.echo_texts is not None:
                        text = job.echo_texts[prompt_index] + text
                logprobs, offsets[index] = job.logprobs(prompt_index, first, c.token_ids, c.logprobs,
                                                        offsets.get(index, 0))
                completion_tokens += len(c.token_ids)
                if c.finish_reason is not None:
                    finished.add(index)
                choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                          "stop_reason": c.stop_reason}
                yield sse_data(job.envelope([choice]))
        for index in sorted(set(range(len(job.prepared) * job.n)) - finished):  # aborted (e.g. shutdown)
            yield sse_data(job.envelope([{"index": index, "text": "", "logprobs": None, "finish_reason": "abort",
                                          "stop_reason": None}]))
        if job.req.include_usage:
            yield sse_data(job.envelope([], usage=usage(job.num_prompt_tokens, completion_tokens)))
    except Exception as e:  # noqa: BLE001 - the status line is gone: report in-band
        err = to_api_error(e)
        yield sse_data(error_body(err.status, err.message, err.param))
    yield SSE_DONE
