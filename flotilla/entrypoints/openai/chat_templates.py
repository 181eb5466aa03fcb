"""Chat templates: ``--chat-template`` and the request fields ``chat_template``, ``chat_template_kwargs`` and
``continue_final_message`` (vLLM's names and rules).

Contract: ``load_chat_template(value)`` is the template text of ``--chat-template``: the file at ``value``,
or ``value`` itself when it is not a readable file but looks like a template (has one of ``{``, ``}`` or a
newline, as vLLM decides); otherwise ValueError. ``ChatTemplateFields.template_options`` turns a request's
fields into the keyword arguments of ``Tokenizer.render_chat_template`` (transformers' ``apply_chat_template``,
which renders in jinja2's sandbox): the request's template wins over the server's, which wins over the
tokenizer's own; a request's template is accepted only with ``--trust-request-chat-template`` (as in vLLM: a
template is code the server runs); ``chat_template_kwargs`` become template variables (e.g.
``enable_thinking``), except the names of ``apply_chat_template``'s own parameters; ``continue_final_message``
continues the last message (no generation prompt; exclusive with ``add_generation_prompt: true``). Every
violation is an ``InvalidRequestError`` naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from flotilla.errors import InvalidRequestError

_JINJA_CHARS = "{}\n"
# apply_chat_template's own parameters: chat_template_kwargs may not set them (vLLM refuses them too).
RESERVED_KWARGS = frozenset({
    "conversation", "messages", "chat_template", "tokenize", "return_dict", "return_tensors", "padding",
    "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask", "add_generation_prompt",
    "continue_final_message", "tools", "documents", "return_attention_mask"})


def load_chat_template(value: str | None) -> str | None:
    """The text of ``--chat-template`` (see the module contract); None stays None."""
    if value is None:
        return None
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        if any(c in value for c in _JINJA_CHARS):
            return value  # an inline template
        raise ValueError(f"--chat-template {value!r} looks like a file path, but it cannot be read: "
                         f"{e.strerror or e}") from e


class ChatTemplateFields(BaseModel):
    """vLLM's chat-template request fields (mixed into chat completions and /tokenize)."""

    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool | None = False

    def template_options(self, add_generation_prompt: bool | None, server_template: str | None,
                         trust_request_template: bool) -> dict:
        """The keyword arguments of ``render_chat_template`` for this request (see the module contract)."""
        template = server_template
        if self.chat_template is not None:
            if not trust_request_template:
                raise InvalidRequestError("a request's chat_template is not accepted by this server (start it "
                                          "with --trust-request-chat-template to allow it)", "chat_template")
            if not self.chat_template.strip():
                raise InvalidRequestError("chat_template must not be empty", "chat_template")
            template = self.chat_template
        extra = dict(self.chat_template_kwargs or {})
        reserved = sorted(RESERVED_KWARGS & extra.keys())
        if reserved:
            raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(reserved)} (use the request "
                                      "fields)", "chat_template_kwargs")
        continue_final = bool(self.continue_final_message)
        if continue_final and add_generation_prompt is not False:
            raise InvalidRequestError("continue_final_message needs add_generation_prompt set to false (the "
                                      "final message is continued, no new one is started)",
                                      "continue_final_message")
        options = {**extra, "add_generation_prompt": add_generation_prompt is not False and not continue_final,
                   "chat_template": template}
        if continue_final:
            options["continue_final_message"] = True
        return options
