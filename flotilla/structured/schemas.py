"""JSON-schema walks the two backends need, by keyword (never by property name).

Contract: ``strict_schema(schema)`` is a copy with xgrammar's strict mode spelled out for llguidance: an
object schema that lists properties (``properties`` or ``patternProperties``) and leaves the rest open gets
``additionalProperties: false``; a tuple (``prefixItems``, or a draft-07 ``items`` list) that leaves further
items open gets none (vLLM's ``disable_additional_properties``, plus tuples). The branches of an ``allOf``
are left open (closing each branch would make their intersection unsatisfiable). ``xgrammar_gap(schema)``
names the first keyword xgrammar (0.2.9) accepts without enforcing it, so its output could break the schema
(found by feeding it violating documents, tests/test_structured_backends.py): ``not``, ``contains``, an
``allOf`` of several schemas, ``multipleOf`` on a non-integer, ``minLength``/``maxLength`` next to a
``format`` or ``pattern``, a ``$ref`` outside the schema; None when there is none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

_ONE = ("additionalProperties", "additionalItems", "items", "contains", "not", "if", "then", "else",
        "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _map_children(schema: dict, fn: Callable[[str, Any], Any]) -> dict:
    """A copy of ``schema`` with ``fn(keyword, subschema)`` applied to each direct subschema."""
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = fn(key, out[key])
    for key in _LISTS:
        if isinstance(out.get(key), list):
            out[key] = [fn(key, s) for s in out[key]]
    for key in _MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: fn(key, s) for name, s in out[key].items()}
    return out


def _walk(schema: Any) -> Iterator[dict]:
    """``schema`` and every subschema in it (depth first)."""
    if not isinstance(schema, dict):
        return
    yield schema
    found: list[dict] = []
    _map_children(schema, lambda key, s: found.append(s))
    for child in found:
        yield from _walk(child)


def strict_schema(schema: Any, close: bool = True) -> Any:
    if not isinstance(schema, dict):
        return schema
    out = _map_children(schema, lambda key, s: strict_schema(s, close=key != "allOf"))
    if not close or "allOf" in out:
        return out
    if ("properties" in out or "patternProperties" in out) and not (
            "additionalProperties" in out or "unevaluatedProperties" in out):
        out["additionalProperties"] = False
    if "prefixItems" in out and "items" not in out and "unevaluatedItems" not in out:
        out["items"] = False
    if isinstance(out.get("items"), list) and "additionalItems" not in out:
        out["additionalItems"] = False
    return out


def xgrammar_gap(schema: Any) -> str | None:
    for s in _walk(schema):
        for key in ("not", "contains"):
            if key in s:
                return f"'{key}'"
        if isinstance(s.get("allOf"), list) and len(s["allOf"]) > 1:
            return "'allOf' of several schemas"
        step = s.get("multipleOf")
        if step is not None and not (s.get("type") == "integer" and isinstance(step, (int, float))
                                     and float(step).is_integer()):
            return "'multipleOf' on a non-integer"
        if ("minLength" in s or "maxLength" in s) and ("format" in s or "pattern" in s):
            return "'minLength'/'maxLength' next to 'format' or 'pattern'"
        ref = s.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return f"'$ref' {ref!r} outside the schema"
    return None
