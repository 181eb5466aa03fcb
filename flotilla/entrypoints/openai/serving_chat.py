"""POST /v1/chat/completions.

Contract: ``model`` (a model name or route alias; optional when one model is served) picks the model through
``ServedModels.resolve``; the response's ``model`` is the model that served it. ``messages`` go through the
chat template (the request's ``chat_template``, else ``--chat-template``'s, else the tokenizer's; see
``chat_templates``), rendered, then tokenized without adding special tokens. ``best_of`` > ``n``: the engine
samples ``best_of``, the response holds the ``n`` most likely (usage counts them all). Streaming sends one
``chat.completion.chunk`` per generated token per choice; the first chunk of each choice carries ``delta.role
= "assistant"`` together with that token's text (``content`` may be ""), the last carries ``finish_reason``;
then a usage chunk when ``stream_options.include_usage``, then ``[DONE]``. Errors after the stream started are
an ``{"error": ...}`` event then ``[DONE]``. ``logprobs`` + ``top_logprobs`` use OpenAI's chat format; vLLM's
``prompt_logprobs: k`` adds a top-level ``prompt_logprobs`` (non-streaming only). A client that disconnects
aborts the engine request. ``tools`` / ``tool_choice`` (``tool_calling``): the plan constrains the sampling
(required, named) and each choice's text becomes ``tool_calls``; streamed, a choice's deltas are what its
``ChoiceTools`` makes of the generated text (a chunk with nothing to say yet is skipped). vLLM's ``priority``
and the in-process ``"flotilla.priority"`` ASGI scope key set the engine request's priority
(``generation.request_priority``).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from flotilla.entrypoints.openai.body import parse_body
from flotilla.entrypoints.openai.errors import error_body, to_api_error
from flotilla.entrypoints.openai.generation import EngineRun, ServingContext, wants_final_only
from flotilla.entrypoints.openai.models import ServedModels
from flotilla.entrypoints.openai.protocol import ChatCompletionRequest, template_messages
from flotilla.entrypoints.openai.responses import (ChoiceAccumulator, best_of, chat_logprobs, prompt_logprobs_json,
                                                   usage)
from flotilla.entrypoints.openai.serving_completion import respond
from flotilla.entrypoints.openai.sse import SSE_DONE, sse_data
from flotilla.entrypoints.openai.tool_calling import ToolPlan
from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import SamplingParams


class _ChatJob:
    def __init__(self, ctx: ServingContext, req: ChatCompletionRequest, prepared, run: EngineRun,
                 tools: ToolPlan):
        self.ctx, self.req, self.prepared, self.run, self.tools = ctx, req, prepared, run, tools
        self.id = run.base_id
        self.created = int(time.time())
        self.n = req.n or 1
        self.top_n = req.top_logprobs or 0

    def envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.ctx.model_name,
                "choices": choices, **extra}

    def logprobs(self, token_ids, logprobs) -> dict | None:
        if logprobs is None:
            return None
        return chat_logprobs(token_ids, logprobs, self.ctx.engine.tokenizer, self.top_n)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prepared[0].prompt_token_ids)


async def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest, params: SamplingParams,
                       tools: list[dict] | None = None) -> list:
    """The chat prompt (with ``tools`` for the template) rendered, tokenized and validated on a tokenizer
    lane; a rendered prompt that provably cannot fit is rejected before it is tokenized (errors name
    ``messages``)."""
    messages = template_messages(req.messages, ctx.max_model_len)
    options = req.template_options(req.add_generation_prompt, ctx.config.chat_template,
                                   ctx.config.trust_request_chat_template)
    if tools:
        options["tools"] = tools

    def build(processor):
        tokenizer = processor.tokenizer
        text = tokenizer.render_chat_template(messages, **options)
        processor.precheck(text, params, "messages")
        ids = tokenizer.encode(text, add_special_tokens=False)
        prompt = {"prompt": text, "prompt_token_ids": ids, "cache_salt": req.cache_salt}
        return [processor.process(prompt, params, "messages")]
    return await ctx.on_lane(chat_size(messages), build)


def chat_size(messages: list[dict]) -> int:
    """The characters of text a conversation carries (what picks its tokenizer lane)."""
    return sum(len(m["content"]) + 16 for m in messages)


async def create_chat_completion(served: ServedModels, request: Request) -> Response:
    req = await parse_body(request, ChatCompletionRequest)
    ctx = served.resolve(req.model, req.user, runner="generate")
    priority = ctx.priority(req.priority, request.scope)
    tools = req.tool_plan(ctx.config.enable_auto_tool_choice, ctx.config.tool_call_parser)
    params = with_tool_constraint(req.to_sampling_params(), tools)
    prepared = await prepare_chat(ctx, req, params, tools.template_tools)
    run = ctx.start(f"chatcmpl-{uuid.uuid4().hex}", prepared, params, stream=bool(req.stream), priority=priority,
                    final_only=wants_final_only(request.scope))
    job = _ChatJob(ctx, req, prepared, run, tools)
    return await respond(request, run, req.stream, lambda: _stream(job), lambda: _collect(job))


def with_tool_constraint(params: SamplingParams, tools: ToolPlan) -> SamplingParams:
    """``params`` constrained to the tool calls ``tool_choice`` requires (required, named, auto with strict
    tools); a request that also asks for another structured output is a 400."""
    if tools.constraint is None:
        return params
    if params.structured_outputs is not None:
        what = "strict tools constrain" if tools.mode == "auto" else f"tool_choice {tools.mode!r} constrains"
        raise InvalidRequestError(f"{what} the output itself; leave out response_format and structured_outputs",
                                  "tool_choice")
    return dataclasses.replace(params, structured_outputs=tools.constraint)


async def _collect(job: _ChatJob) -> dict:
    samples = job.req.num_samples  # best_of (default n)
    choices = [ChoiceAccumulator(i) for i in range(samples)]
    prompt_logprobs = None
    try:
        async for _, out in job.run.outputs():
            prompt_logprobs = prompt_logprobs or out.prompt_logprobs
            for c in out.outputs:
                choices[c.index].add(c)
    finally:
        await job.run.close()
    completion_tokens = sum(len(ch.token_ids) for ch in choices)  # best_of: every sample generated
    choices = best_of(choices, samples, job.n, bool(job.req.logprobs))
    body = []
    for ch in choices:
        tools = job.tools.choice()
        message = tools.message(ch.text)
        body.append({"index": ch.index, "message": message, "logprobs": job.logprobs(ch.token_ids, ch.logprobs),
                     "finish_reason": tools.finish_reason(ch.finish_reason) or "abort",
                     "stop_reason": ch.stop_reason})
    extra = {}
    if job.req.prompt_logprobs is not None:
        extra["prompt_logprobs"] = None if prompt_logprobs is None else prompt_logprobs_json(
            job.prepared[0].prompt_token_ids, prompt_logprobs, job.req.prompt_logprobs)
    return job.envelope("chat.completion", body, usage=usage(job.num_prompt_tokens, completion_tokens), **extra)


def _merge_deltas(a: dict, b: dict) -> dict:
    """Two chat deltas of one choice as one (content concatenated, tool-call entries listed in order)."""
    out = dict(a)
    if b.get("content"):
        out["content"] = out.get("content", "") + b["content"]
    if b.get("tool_calls"):
        out["tool_calls"] = out.get("tool_calls", []) + b["tool_calls"]
    return out


async def _stream(job: _ChatJob) -> AsyncIterator[bytes]:
    started: set[int] = set()
    finished: set[int] = set()
    completion_tokens = 0
    chunk = "chat.completion.chunk"
    plain = job.tools.mode == "none"
    parsers = [job.tools.choice() for _ in range(job.n)]
    try:
        async for _, out in job.run.outputs():
            for c in out.outputs:
                tools = parsers[c.index]
                delta = {"content": c.text} if plain else tools.feed(c.text)
                if c.finish_reason is not None:
                    finished.add(c.index)
                    delta = _merge_deltas(delta, tools.finish())
                if c.index not in started:
                    started.add(c.index)
                    delta = {"role": "assistant", **({"content": c.text} if plain else delta)}
                completion_tokens += len(c.token_ids)
                logprobs = job.logprobs(c.token_ids, c.logprobs)
                if not delta and logprobs is None and c.finish_reason is None:
                    continue  # a parser holding text back: nothing to send yet
                choice = {"index": c.index, "delta": delta, "logprobs": logprobs,
                          "finish_reason": tools.finish_reason(c.finish_reason)}
                yield sse_data(job.envelope(chunk, [choice]))
        for index in sorted(set(range(job.n)) - finished):  # aborted (e.g. shutdown)
            delta = {} if index in started else {"role": "assistant", "content": ""}
            yield sse_data(job.envelope(chunk, [{"index": index, "delta": delta, "logprobs": None,
                                                 "finish_reason": "abort"}]))
        if job.req.include_usage:
            yield sse_data(job.envelope(chunk, [], usage=usage(job.num_prompt_tokens, completion_tokens)))
    except Exception as e:  # noqa: BLE001 - the status line is gone: report in-band
        err = to_api_error(e)
        yield sse_data(error_body(err.status, err.message, err.param))
    yield SSE_DONE
