"""The OpenAI and vLLM request fields of structured output -> ``StructuredOutputsParams``.

Contract: ``response_format`` (OpenAI: ``{"type": "text" | "json_object" | "json_schema", "json_schema":
{"name", "schema", "strict", "description"}}``), vLLM's ``structured_outputs: {json, regex, choice, grammar,
json_object, disable_any_whitespace}`` and its older ``guided_json``, ``guided_regex``, ``guided_choice``,
``guided_grammar`` (with ``guided_decoding_backend``: None for the server's ``--structured-outputs-config``
backend, or "auto", "xgrammar", "guidance" for this request; and ``guided_whitespace_pattern``, the JSON
constraint's whitespace, which llguidance serves) become at most one ``StructuredOutputsParams``;
two constraints in one request, or a backend we do not run, are an ``InvalidRequestError`` naming the field.
A spec that no backend the request may use accepts is one too, naming the field it came in; the engine's input
processor then checks it against the server's backend.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flotilla.config import STRUCTURED_OUTPUTS_BACKENDS
from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import StructuredOutputsParams
from flotilla.structured.grammar import validate_structured

BACKENDS = (None, *STRUCTURED_OUTPUTS_BACKENDS)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(BaseModel):
    """vLLM's ``structured_outputs`` request field."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None


class StructuredFields(BaseModel):
    """The structured-output fields of completions and chat completions (mixed into both)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    def structured_params(self) -> StructuredOutputsParams | None:
        """The request's one constraint (None for none); InvalidRequestError naming the field otherwise."""
        found: list[tuple[str, StructuredOutputsParams]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise InvalidRequestError("response_format of type json_schema needs json_schema.schema",
                                          "response_format")
            found.append(("response_format", StructuredOutputsParams(json=rf.json_schema.json_schema)))
        so = self.structured_outputs
        if so is not None:
            found.append(("structured_outputs", StructuredOutputsParams(
                json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar, json_object=so.json_object,
                disable_any_whitespace=so.disable_any_whitespace, whitespace_pattern=so.whitespace_pattern)))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                found.append((name, StructuredOutputsParams(**{kind: value})))
        if self.guided_decoding_backend not in BACKENDS:
            raise InvalidRequestError(f"guided_decoding_backend {self.guided_decoding_backend!r} is not available "
                                      f"(use one of {', '.join(STRUCTURED_OUTPUTS_BACKENDS)})",
                                      "guided_decoding_backend")
        if len(found) > 1:
            raise InvalidRequestError(f"only one structured-output constraint per request, got "
                                      f"{', '.join(n for n, _ in found)}", found[1][0])
        if not found:
            return None
        name, params = found[0]
        params.backend = self.guided_decoding_backend
        if self.guided_whitespace_pattern is not None:
            if params.kind() not in ("json", "json_object") or params.whitespace_pattern is not None:
                raise InvalidRequestError("guided_whitespace_pattern applies to one JSON constraint (a schema or "
                                          "json_object) without a whitespace_pattern of its own",
                                          "guided_whitespace_pattern")
            params.whitespace_pattern = self.guided_whitespace_pattern
        validate_structured(params, name)  # a bad schema names the field the client sent
        return params
