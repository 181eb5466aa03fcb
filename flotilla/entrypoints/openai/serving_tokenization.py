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

``GET /tokenizer_info`` (vLLM's endpoint, served only with ``--enable-tokenizer-info-endpoint``; query
parameter ``model``, optional when one model is served) answers the tokenizer's configuration as vLLM does:
transformers' ``init_kwargs`` made JSON (special tokens as their text), without file paths, with
``tokenizer_class``, the special tokens (``bos_token``, ``eos_token``, ...) and the chat template the server
uses (``--chat-template``'s, else the tokenizer's; absent when there is none). lm-evaluation-harness probes it
(and ``/tokenize``) to tokenize through the server (``tokenizer_backend=remote``, its default when both answer).
"""

from __future__ import annotations

import math

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from flotilla.entrypoints.openai.body import parse_body
from flotilla.entrypoints.openai.errors import APIError
from flotilla.entrypoints.openai.models import ServedModels
from flotilla.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest, template_messages
from flotilla.entrypoints.openai.serving_chat import chat_size
from flotilla.entrypoints.openai.tool_calling import template_tools

# init_kwargs that locate files on the server, not describe the tokenizer: never sent
_LOCAL_KEYS = frozenset({"name_or_path", "is_local", "local_files_only", "cache_dir"})


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


async def tokenizer_info(served: ServedModels, request: Request) -> Response:
    unknown = sorted(set(request.query_params) - {"model"})
    if unknown:
        raise APIError(400, f"{unknown[0]}: unknown query parameter", unknown[0])
    ctx = served.resolve(request.query_params.get("model"))
    return JSONResponse(tokenizer_info_body(ctx.engine.tokenizer.hf_tokenizer, ctx.config.chat_template))


def tokenizer_info_body(hf_tokenizer, chat_template: str | None) -> dict:
    """``/tokenizer_info``'s answer for a transformers tokenizer (see the module contract); ``chat_template``
    is the server's own (None: the tokenizer's)."""
    info = {key: _jsonable(value) for key, value in (getattr(hf_tokenizer, "init_kwargs", None) or {}).items()
            if key not in _LOCAL_KEYS and not key.endswith("_file")}
    for key, value in hf_tokenizer.special_tokens_map.items():
        info.setdefault(key, _jsonable(value))
    info["tokenizer_class"] = type(hf_tokenizer).__name__
    template = chat_template or getattr(hf_tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        info["chat_template"] = template
    else:
        info.pop("chat_template", None)
    return info


def _jsonable(value):
    """``value`` as JSON data: special tokens (``AddedToken``) as their text, other objects (and infinite or NaN
    floats, which JSON cannot carry) as ``str``."""
    if value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    content = getattr(value, "content", None)
    return content if isinstance(content, str) else str(value)
