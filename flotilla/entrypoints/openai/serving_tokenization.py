"""POST /tokenize and POST /detokenize.

Contract: ``/tokenize`` takes exactly one of ``prompt`` (text, ``add_special_tokens`` default true) or chat
``messages`` (rendered with the chat template as chat completions render it, ``tools`` included (vLLM's chat
tokenize request), ``add_generation_prompt`` default true, ``chat_template``, ``chat_template_kwargs``,
``continue_final_message``; tokenized without adding special tokens, so the count is a chat completion's
``usage.prompt_tokens`` for the same messages and tools) and answers ``{tokens, count, max_model_len}``;
``tools`` with ``prompt`` is a 400. It answers for prompts of at
most ``max_model_len`` tokens; a longer one is a 400 naming the field and the limit, and a text that
provably cannot fit is rejected before it is tokenized (so one request's work stays bounded).
``/detokenize`` takes ``tokens`` (each in the vocabulary, else 400) and answers ``{prompt}``. Both take
``model`` and run on the model's tokenizer lanes.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from flotilla.entrypoints.openai.body import parse_body
from flotilla.entrypoints.openai.errors import APIError
from flotilla.entrypoints.openai.models import ServedModels
from flotilla.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest, template_messages
from flotilla.entrypoints.openai.serving_chat import chat_size
from flotilla.entrypoints.openai.tool_calling import template_tools


async def tokenize(served: ServedModels, request: Request) -> Response:
    req = await parse_body(request, TokenizeRequest)
    ctx = served.resolve(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", "prompt")
    if req.prompt is not None and req.tools is not None:
        raise APIError(400, "tools go with messages (the chat template renders them), not with prompt", "tools")
    limit = ctx.max_model_len
    if req.prompt is not None:
        text, param, size = req.prompt, "prompt", len(req.prompt)
    else:
        messages = template_messages(req.messages, limit)
        text, param, size = None, "messages", chat_size(messages)
        options = req.template_options(req.add_generation_prompt, ctx.config.chat_template,
                                       ctx.config.trust_request_chat_template)
        tools = template_tools(req.tools)
        if tools:
            options["tools"] = tools
    special = req.prompt is not None and req.add_special_tokens is not False

    def build(processor) -> list[int]:
        tokenizer = processor.tokenizer
        rendered = text
        if rendered is None:
            rendered = tokenizer.render_chat_template(messages, **options)
        _check_count(tokenizer.min_num_tokens(rendered), limit, param, at_least=True)
        tokens = tokenizer.encode(rendered, add_special_tokens=special)
        _check_count(len(tokens), limit, param)
        return tokens
    tokens = await ctx.on_lane(size, build)
    return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": limit})


def _check_count(n: int, limit: int, param: str, at_least: bool = False) -> None:
    if n > limit:
        some = "at least " if at_least else ""
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {param} "
                            f"has {some}{n} tokens.", param)


async def detokenize(served: ServedModels, request: Request) -> Response:
    req = await parse_body(request, DetokenizeRequest)
    ctx = served.resolve(req.model)
    vocab = ctx.engine.model_config.vocab_size
    limit = min(vocab, ctx.engine.tokenizer.vocab_size)
    for t in req.tokens:
        if not 0 <= t < limit:
            raise APIError(400, f"token id {t} is outside the vocabulary [0, {vocab})", "tokens")
    text = await ctx.on_lane(len(req.tokens), lambda processor: processor.tokenizer.decode(req.tokens))
    return JSONResponse({"prompt": text})
