"""The JSON schemas the structured-output tests run (offline with SmolLM2, over HTTP with a real server).

Every string has a ``maxLength``, a ``pattern`` or a ``format`` of bounded length, every array a ``maxItems``
and every number bounds (and a ``multipleOf`` when fractional), so each document the schema admits is short: a completion cut by ``max_tokens``
fails its test instead of passing as a prefix. ``validate(doc, schema)`` checks ``format`` too.
"""

from __future__ import annotations

import jsonschema

_XY = {"type": "integer", "minimum": -100, "maximum": 100}
_DEFS = {"point": {"type": "object", "properties": {"x": _XY, "y": _XY}, "required": ["x", "y"]}}
_ADDRESS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                             "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False}
_SMALL = {"type": "integer", "minimum": 1, "maximum": 50}

SCHEMAS = [
    # 1-10: objects, enums, arrays, nesting, bounded numbers, optional fields, $defs/$ref, arrays of objects
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "active": {"type": "boolean"}},
        "required": ["id", "active"]}}, "required": ["user"]},
    # a bounded number with two decimals: xgrammar ignores a fractional multipleOf, so llguidance serves it
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}},
     "required": ["score"]},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 16},
                                      "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                      "subtitle": {"type": "string", "maxLength": 10}},
     "required": ["title", "year"]},
    {"$defs": _DEFS, "type": "object", "properties": {"a": {"$ref": "#/$defs/point"},
                                                      "b": {"$ref": "#/$defs/point"}}, "required": ["a", "b"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                      "confidence": {"type": "integer", "minimum": 1, "maximum": 5}},
     "required": ["answer", "confidence"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
    # 11. one $defs entry used by two properties, one of them optional; no extra properties anywhere
    {"$defs": {"address": _ADDRESS}, "type": "object", "additionalProperties": False,
     "properties": {"home": {"$ref": "#/$defs/address"}, "work": {"$ref": "#/$defs/address"}},
     "required": ["home"]},
    # 12. anyOf: a numeric id or a hex string id
    {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 999},
                                                       {"type": "string", "pattern": "^[a-f0-9]{8}$"}]}},
     "required": ["id"]},
    # 13. oneOf: a tagged union told apart by a const discriminator
    {"type": "object", "required": ["shape"], "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": _SMALL},
         "required": ["kind", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "rect"}, "w": _SMALL, "h": _SMALL},
         "required": ["kind", "w", "h"], "additionalProperties": False}]}}},
    # 14. an array of enum values with minItems and maxItems
    {"type": "object", "properties": {"days": {"type": "array", "minItems": 2, "maxItems": 3,
                                               "items": {"enum": ["mon", "tue", "wed", "thu", "fri"]}}},
     "required": ["days"]},
    # 15. string patterns: a phone number and a two-letter country code
    {"type": "object", "properties": {"phone": {"type": "string", "pattern": "^\\+1-[0-9]{3}-[0-9]{3}-[0-9]{4}$"},
                                      "country": {"type": "string", "pattern": "^[A-Z]{2}$"}},
     "required": ["phone", "country"], "additionalProperties": False},
    # 16. formats: a date and a UUID (xgrammar drops maxLength next to a format, so no unbounded email here)
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"},
                                      "event_id": {"type": "string", "format": "uuid"}},
     "required": ["day", "event_id"], "additionalProperties": False},
    # 17. integer minimum / exclusiveMaximum, exclusiveMinimum / maximum
    {"type": "object", "properties": {"percent": {"type": "integer", "minimum": 0, "exclusiveMaximum": 100},
                                      "celsius": {"type": "integer", "exclusiveMinimum": -40, "maximum": 60}},
     "required": ["percent", "celsius"]},
    # 18. const and nullable types (a type list and an anyOf with null)
    {"type": "object", "properties": {"version": {"const": 2},
                                      "nickname": {"type": ["string", "null"], "maxLength": 10},
                                      "parent": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 100},
                                                           {"type": "null"}]}},
     "required": ["version", "nickname", "parent"], "additionalProperties": False},
    # 19. nested arrays of objects: a team whose members each list skills
    {"type": "object", "additionalProperties": False, "required": ["team"], "properties": {"team": {
        "type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "skills"],
            "properties": {"name": {"type": "string", "maxLength": 10},
                           "skills": {"type": "array", "maxItems": 2, "items": {"enum": ["python", "rust", "go"]}}}}}}},
    # 20. a fixed-length tuple (prefixItems, no further items) of a label, a count and a flag
    {"type": "array", "prefixItems": [{"type": "string", "maxLength": 8},
                                      {"type": "integer", "minimum": 0, "maximum": 150}, {"type": "boolean"}],
     "items": False, "minItems": 3},
]

# A draft-07 schema xgrammar rejects (a tuple as an ``items`` list, a scoped regex flag) and llguidance serves.
GUIDANCE_ONLY = {
    "$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": False,
    "properties": {"answer": {"type": "string", "pattern": "^(?i:yes|no)$"},
                   "pair": {"type": "array", "minItems": 2, "additionalItems": False,
                            "items": [{"type": "string", "maxLength": 6}, {"type": "integer", "minimum": 0,
                                                                            "maximum": 99}]}},
    "required": ["answer", "pair"]}
LARK = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'


def validate(doc, schema) -> None:
    """jsonschema validation, ``format`` included (jsonschema checks formats only when asked)."""
    cls = jsonschema.validators.validator_for(schema)
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(doc)
