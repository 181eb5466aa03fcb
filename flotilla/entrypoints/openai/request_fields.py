"""Which request fields flotilla accepts beyond those its request models implement, and which it rejects.

Contract (``check_fields``, run on the raw JSON body before the strict request model validates it): a field
the request model declares is validated there; a field listed below is a 400 naming it unless its value is
the OpenAI / vLLM default that changes nothing (then it is dropped); anything else is left to the model,
whose ``extra="forbid"`` rejects it as an unknown field (400 naming it). No field is ever silently dropped
unless this module says why that is harmless. The README's "Request fields" section mirrors these tables.

- ``UNSUPPORTED_FIELDS``: features being implemented (issue 13); answer "... is not supported yet". Delete a
  field's entry when its implementation (and its request-model field) lands.
- ``UNIMPLEMENTED_FIELDS``: OpenAI / vLLM features flotilla does not implement; answer "... is not supported".
- ``ACCEPTED_EXTRAS``: fields real clients send whose meaning cannot change a response from this server.

Each entry maps a field to ``is_noop(value, body) -> bool``: whether this value asks for nothing (e.g.
``tool_choice: "none"``, ``logit_bias: {}``). Chat-message fields are keyed ``messages[].<field>``.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic_core import PydanticCustomError

NoOp = Callable[[object, dict], bool]


def _absent(value, body) -> bool:
    return value is None


def _empty(value, body) -> bool:
    return value is None or value == [] or value == {}


def _false(value, body) -> bool:
    return value is None or value is False


def _true(value, body) -> bool:
    return value is None or value is True


def _one_of(*values) -> NoOp:
    return lambda value, body: value is None or any(type(value) is type(v) and value == v for v in values)


UNSUPPORTED_FIELDS: dict[str, NoOp] = {}  # none left: structured output, tools, prompt logprobs and the
# sampling extras have landed

UNIMPLEMENTED_FIELDS: dict[str, NoOp] = {
    # OpenAI
    "suffix": _absent,
    "store": _false,
    "service_tier": _one_of("auto", "default"),  # one tier here; flex/priority would promise another
    "modalities": lambda v, b: v is None or v == ["text"],
    "audio": _absent,
    "prediction": _absent,
    "reasoning_effort": _absent,
    "verbosity": _absent,
    "web_search_options": _absent,
    "functions": _empty,
    "function_call": lambda v, b: v is None or v == "none",
    "messages[].function_call": _absent,
    "messages[].refusal": _absent,
    "messages[].audio": _absent,
    "messages[].annotations": _empty,
    # vLLM
    "use_beam_search": _false,
    "length_penalty": _one_of(1.0, 1),
    "truncate_prompt_tokens": _absent,
    "spaces_between_special_tokens": _true,
    "add_special_tokens": _absent,
    "return_tokens_as_token_ids": _false,
    "return_token_ids": _false,
    "logits_processors": _empty,
    "documents": _absent,
    "mm_processor_kwargs": _absent,
    "request_id": _absent,
    "kv_transfer_params": _absent,
    "vllm_xargs": _absent,
    "echo": _false,  # chat's vLLM ``echo`` (completions declare their own)
    "messages[].reasoning_content": _absent,
}


def _always(value, body) -> bool:
    return True


ACCEPTED_EXTRAS: dict[str, NoOp] = {
    # OpenAI: labels for stored completions (flotilla stores nothing; ``store: true`` is rejected)
    "metadata": _always,
    # OpenAI: a hint for routing to a warm prompt cache; flotilla's prefix cache is automatic (``cache_salt``
    # is what separates tenants)
    "prompt_cache_key": _always,
    # OpenAI: an end-user id for abuse monitoring; it does not change the output
    "safety_identifier": _always,
}

_TABLES = ((UNSUPPORTED_FIELDS, "is not supported yet"), (UNIMPLEMENTED_FIELDS, "is not supported"),
           (ACCEPTED_EXTRAS, ""))
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


def _lookup(field: str) -> tuple[NoOp, str] | None:
    for table, verdict in _TABLES:
        if field in table:
            return table[field], verdict
    return None


def _reject(path: str, param: str, value, verdict: str) -> PydanticCustomError:
    shown = repr(value) if len(repr(value)) <= 80 else f"{type(value).__name__} value"
    return PydanticCustomError("unsupported_field", "{path} {verdict} (got {shown}); leave it out",
                               {"path": path, "param": param, "verdict": verdict, "shown": shown})


def _strip(data: dict, declared, key_of, path_of, param_of, body: dict) -> dict:
    """``data`` without its listed no-op fields; raises for a listed field with a meaningful value."""
    drop = []
    for field in data.keys() - declared:
        entry = _lookup(key_of(field))
        if entry is None:
            continue  # unknown: the request model's extra="forbid" names it
        is_noop, verdict = entry
        if not is_noop(data[field], body):
            raise _reject(path_of(field), param_of(field), data[field], verdict)
        drop.append(field)
    return {k: v for k, v in data.items() if k not in drop} if drop else data


def check_fields(body, declared) -> object:
    """The body without its harmless listed fields (see the module contract); ``declared`` are the request
    model's own field names. Raises ``PydanticCustomError("unsupported_field")`` whose context carries the
    field's ``path`` and top-level ``param``."""
    if not isinstance(body, dict):
        return body  # the model reports the type error
    body = _strip(body, declared, str, str, str, body) if not body.keys() <= declared else body
    messages = body.get("messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and not m.keys() <= MESSAGE_KEYS for m in messages):
        body = dict(body, messages=[_strip(m, MESSAGE_KEYS, lambda f: f"messages[].{f}",
                                           lambda f, i=i: f"messages.{i}.{f}", lambda f: "messages", body)
                                    if isinstance(m, dict) else m for i, m in enumerate(messages)])
    return body
