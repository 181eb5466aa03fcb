"""Request models of the OpenAI API (plus vLLM's sampling extras) and their translation to SamplingParams.

Contract: the models are strict (``max_tokens: "10"`` or ``temperature: true`` are type errors, as in
OpenAI's API) and reject unknown fields, nested ones included (a 400 naming the field); the fields listed in
``request_fields`` (not supported yet, not implemented, or harmless extras) are checked there first, so a
listed field is a 400 unless its value changes nothing. Range checks are left to ``SamplingParams.validate``
and the engine's input processor, which name the field; the few checks that only make sense at the API level
(``max_tokens: 0`` without ``echo``, ``prompt_logprobs`` with ``stream``, ``top_logprobs`` without
``logprobs``, non-text chat content, ``logit_bias`` keys that are not token ids, ``best_of`` below ``n`` or
above it with ``stream``) raise ``InvalidRequestError``. Chat-template fields: ``chat_templates``.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator, with_config
from typing_extensions import NotRequired, TypedDict

from flotilla.entrypoints.openai.chat_templates import ChatTemplateFields
from flotilla.entrypoints.openai.request_fields import check_fields
from flotilla.entrypoints.openai.structured import StructuredFields
from flotilla.entrypoints.openai.tool_calling import ChatTool, ToolFields
from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams

MAX_PROMPTS_PER_REQUEST = 1024
MAX_CHOICES_PER_REQUEST = 1024

# Integers that reach the engine must fit in int64 (msgpack, torch): a larger top_k or seed would otherwise
# fail deep in the engine core instead of as a 400 here.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Request(_Strict):
    """A request body: its listed extra fields are checked (and no-op ones dropped) before validation."""

    @model_validator(mode="before")
    @classmethod
    def _check_listed_fields(cls, data):
        return check_fields(data, frozenset(cls.model_fields))


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _SamplingFields(StructuredFields, _Request):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: Int64 | None = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    min_tokens: Int64 | None = 0
    stop_token_ids: list[Int64] | None = None
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    cache_salt: Annotated[str, Field(min_length=1)] | None = None  # separates tenants' prefix caches
    prompt_logprobs: Int64 | None = None  # vLLM: the prompt tokens' logprobs + top-K in the response
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (a string key) -> bias in [-100, 100]
    allowed_token_ids: list[Int64] | None = None  # vLLM: only these tokens may be sampled
    bad_words: list[str] | None = None  # vLLM: words never generated
    best_of: Int64 | None = None  # vLLM: sample best_of, return the n with the highest cumulative logprob
    # vLLM: the scheduling priority (lower is served earlier); nonzero needs --scheduling-policy priority
    # (checked by ``generation.request_priority``, which knows the engine's policy)
    priority: Int64 | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams with OpenAI's defaults for the fields left out (not yet validated);
        ``prompt_logprobs`` defaults to the request's own."""
        def pick(value, default):
            return default if value is None else value
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequestError("prompt_logprobs is not available with stream=true", "prompt_logprobs")
        samples = self.num_samples
        if samples != pick(self.n, 1):  # best_of: the engine samples them all, with their logprobs
            logprobs = 0 if logprobs is None else logprobs
        return SamplingParams(
            n=samples, temperature=pick(self.temperature, 1.0), top_p=pick(self.top_p, 1.0),
            top_k=pick(self.top_k, -1), min_p=pick(self.min_p, 0.0),
            presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            repetition_penalty=pick(self.repetition_penalty, 1.0), seed=self.seed, max_tokens=max_tokens,
            min_tokens=pick(self.min_tokens, 0), stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=bool(self.ignore_eos), include_stop_str_in_output=bool(self.include_stop_str_in_output),
            logprobs=logprobs, prompt_logprobs=pick(prompt_logprobs, self.prompt_logprobs),
            skip_special_tokens=pick(self.skip_special_tokens, True), structured_outputs=self.structured_params(),
            logit_bias=self.logit_bias_ids(), allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words or None)

    @property
    def num_samples(self) -> int:
        """The samples the engine generates per prompt: ``best_of`` (vLLM: default ``n``; at least ``n``; not
        with ``stream`` unless equal to ``n``), of which the response returns the ``n`` most likely."""
        n = 1 if self.n is None else self.n
        if self.best_of is None or self.best_of == n:
            return n
        if self.best_of < n or self.best_of < 1:
            raise InvalidRequestError(f"best_of ({self.best_of}) must be at least n ({n})", "best_of")
        if self.best_of > MAX_N:
            raise InvalidRequestError(f"best_of must be at most {MAX_N}, got {self.best_of}", "best_of")
        if self.stream:
            raise InvalidRequestError("best_of > n is not available with stream=true", "best_of")
        return self.best_of

    def logit_bias_ids(self) -> dict[int, float] | None:
        """``logit_bias`` with integer keys (JSON keys are strings); InvalidRequestError naming it for a key
        that is not a token id. Ranges are checked by ``SamplingParams.validate`` and the input processor."""
        if not self.logit_bias:
            return None
        out = {}
        for key, bias in self.logit_bias.items():
            if not (key.isascii() and key.isdigit()):
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
            out[int(key)] = bias
        return out


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. ``prompt``: text, list of texts, token ids, or list of token-id lists."""

    prompt: str | list[str] | list[Int64] | list[list[Int64]]
    max_tokens: Int64 | None = 16
    logprobs: Int64 | None = None
    echo: bool | None = False

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per engine request; InvalidRequestError for an empty or too long list."""
        p = self.prompt
        if isinstance(p, str):
            prompts = [p]
        elif not p:
            raise InvalidRequestError("the prompt is empty", "prompt")
        elif isinstance(p[0], int):
            prompts = [p]
        else:
            prompts = list(p)
        if len(prompts) > MAX_PROMPTS_PER_REQUEST:
            raise InvalidRequestError(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request", "prompt")
        check_num_choices(len(prompts), self.n)
        check_num_choices(len(prompts), self.best_of, "best_of")
        return prompts

    def to_sampling_params(self) -> SamplingParams:
        """``echo`` with ``logprobs: k`` scores the prompt too (the engine's prompt logprobs, top-k); only then
        may ``max_tokens`` be 0 (score the prompt, generate nothing), as in OpenAI's legacy API and vLLM."""
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError("max_tokens must be at least 1 (0 is allowed only with echo)", "max_tokens")
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(self.logprobs, prompt_logprobs or 0)
        return self.sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)


# OpenAI's message roles; anything else is a 400 naming ``messages`` (as OpenAI answers).
ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]


@with_config(ConfigDict(strict=True, extra="forbid"))
class ContentPart(TypedDict):
    """A content part. Only text parts are supported; the other OpenAI part types are declared so that
    ``template_messages`` can name the type it rejects."""

    type: str
    text: NotRequired[str | None]
    image_url: NotRequired[object]
    input_audio: NotRequired[object]
    file: NotRequired[object]
    refusal: NotRequired[object]


@with_config(ConfigDict(strict=True, extra="forbid"))
class FunctionCallParam(TypedDict):
    name: str
    arguments: str


@with_config(ConfigDict(strict=True, extra="forbid"))
class ToolCallParam(TypedDict):
    """A tool call of an earlier assistant message (as the SDKs send a previous response back)."""

    id: str
    type: Literal["function"]
    function: FunctionCallParam


@with_config(ConfigDict(strict=True, extra="forbid"))
class ChatMessage(TypedDict):
    """A chat message, validated into a plain dict (a TypedDict validates ~20x faster than a model, which
    matters for a body with hundreds of thousands of messages)."""

    role: ChatRole
    content: NotRequired[str | list[ContentPart] | None]
    name: NotRequired[str | None]
    tool_calls: NotRequired[list[ToolCallParam] | None]  # assistant messages
    tool_call_id: NotRequired[str | None]  # tool messages


def template_messages(messages: list[ChatMessage], max_model_len: int) -> list[dict]:
    """The messages as the chat template takes them ({"role", "content"[, "name"]}, text parts joined by
    newlines); InvalidRequestError for no messages, parts that are not text, or more messages than
    ``max_model_len`` (every message takes at least one token of the context, its role marker)."""
    if not messages:
        raise InvalidRequestError("messages must not be empty", "messages")
    if len(messages) > max_model_len:
        raise InvalidRequestError(f"{len(messages)} messages cannot fit this model's maximum context length of "
                                  f"{max_model_len} tokens (each message takes at least one token)", "messages")
    return [_template_dict(m) for m in messages]


def _template_dict(message: ChatMessage) -> dict:
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if part["type"] != "text" or part.get("text") is None:
                raise InvalidRequestError(f"content part type {part['type']!r} is not supported "
                                          "(only 'text')", "messages")
            if len(part) > 2:
                extra = sorted(set(part) - {"type", "text"})
                raise InvalidRequestError(f"a text content part takes only 'type' and 'text', not {extra}",
                                          "messages")
            texts.append(part["text"])
        content = "\n".join(texts)
    out = {"role": message["role"], "content": content if content is not None else ""}
    if message.get("name") is not None:
        out["name"] = message["name"]
    if message.get("tool_call_id") is not None:
        out["tool_call_id"] = message["tool_call_id"]
    if message.get("tool_calls"):
        out["tool_calls"] = [_template_tool_call(c) for c in message["tool_calls"]]
    return out


def _template_tool_call(call: dict) -> dict:
    """A tool call as chat templates take it: ``arguments`` a dict, not JSON text (transformers' convention;
    vLLM converts the same way)."""
    fn = call["function"]
    try:
        arguments = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
    except ValueError as e:
        raise InvalidRequestError(f"tool call {call['id']!r}: function.arguments is not JSON: {e}", "messages") from e
    return {"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": arguments}}


class ChatCompletionRequest(ChatTemplateFields, ToolFields, _SamplingFields):
    """POST /v1/chat/completions. ``max_completion_tokens`` wins over ``max_tokens``; neither means the
    rest of the context."""

    messages: list[ChatMessage]
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = False
    top_logprobs: Int64 | None = None
    add_generation_prompt: bool | None = True

    def to_sampling_params(self) -> SamplingParams:
        check_num_choices(1, self.n)
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
            if isinstance(self.top_logprobs, bool) or not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                          "top_logprobs")
        if max_tokens == 0:
            param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise InvalidRequestError(f"{param} must be at least 1", param)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs)


def check_num_choices(num_prompts: int, n: int | None, param: str = "n") -> None:
    """Bound the choices of one response (the engine bounds ``n`` itself)."""
    if n is not None and n > 0 and num_prompts * n > MAX_CHOICES_PER_REQUEST:
        raise InvalidRequestError(f"{num_prompts} prompts x {param}={n} exceeds {MAX_CHOICES_PER_REQUEST} choices",
                                  param)


class TokenizeRequest(ChatTemplateFields, _Request):
    """POST /tokenize: ``prompt`` text, or chat ``messages`` (and ``tools``) rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Request):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[Int64]


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the inputs of one embeddings request


class EmbeddingRequest(_Request):
    """POST /v1/embeddings. ``input``: a text, a list of texts, a token-id list or a list of them (OpenAI's
    four forms); ``encoding_format``: float (JSON numbers) or base64 (little-endian float32 bytes);
    ``dimensions``: Matryoshka truncation (checked against the model); ``user``: routes sticky per user."""

    model: str | None = None
    input: str | list
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Int64 | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """The inputs, one text or one token-id list each (1 to ``MAX_EMBEDDING_INPUTS`` of them);
        ``InvalidRequestError`` naming ``input`` for any other shape."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if not value:
            raise InvalidRequestError("input must not be empty", "input")
        if all(_is_token_id(t) for t in value):
            return [value]
        for i, item in enumerate(value):
            if not isinstance(item, str) and not (isinstance(item, list) and all(_is_token_id(t) for t in item)):
                raise InvalidRequestError(f"input[{i}] must be a string or a list of token ids (input is a string, "
                                          f"a list of strings, a list of token ids or a list of token-id lists)",
                                          "input")
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequestError(f"input has {len(value)} items; at most {MAX_EMBEDDING_INPUTS} are allowed per "
                                      f"request", "input")
        return list(value)


def _is_token_id(value) -> bool:
    return type(value) is int  # not bool, not float
