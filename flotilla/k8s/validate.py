"""Offline validation of manifests as an API server with ``fieldValidation=Strict`` would check them on create.

- Core kinds (Deployment, Service, HPA, ...): the PyPI package ``kubernetes-validate`` (the Kubernetes OpenAPI
  schemas as JSON Schema, ``strict``: an unknown field is an error), for ``K8S_VERSION``.
- Custom resources (KServe, KubeRay): the ``openAPIV3Schema`` of the served version of their
  CustomResourceDefinition, turned into JSON Schema the way the API server reads a structural schema
  (``structural_to_json_schema``) and checked with ``jsonschema``:
  ``nullable`` admits null; ``x-kubernetes-int-or-string`` an integer or a string;
  ``x-kubernetes-preserve-unknown-fields`` keeps unknown fields below it; ``x-kubernetes-embedded-resource``
  requires apiVersion, kind and metadata; every other object rejects fields its schema does not name (what
  the API server prunes, and strict field validation reports as "unknown field"); ``format`` int32/int64 are
  range-checked; ``x-kubernetes-list-type`` set/map lists must not repeat items/keys. Validation rules
  (``x-kubernetes-validations``, CEL) are not evaluated: a manifest that sets a field carrying one is
  reported, so such a field is never assumed valid.
- Every object's metadata: name (DNS-1123 subdomain), label keys and values, annotation keys.

``validate_objects(objects, crd_dir)`` returns a list of problems (empty: valid); each names the object.
"""

from __future__ import annotations

import copy
import functools
import glob
import os
import re
from typing import Any, Iterable

import yaml

K8S_VERSION = "1.37.0"      # kubernetes-validate 1.37.0's newest bundled Kubernetes version
CORE_GROUPS = ("", "apps", "autoscaling", "policy", "networking.k8s.io", "batch", "rbac.authorization.k8s.io")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_INT_RANGES = {"int32": (-2 ** 31, 2 ** 31 - 1), "int64": (-2 ** 63, 2 ** 63 - 1)}
_KEEP = ("type", "required", "enum", "format", "pattern", "minimum", "maximum", "exclusiveMinimum",
         "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "uniqueItems", "minProperties",
         "maxProperties", "multipleOf")
OBJECT_META_FIELDS = ("name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences",
                      "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "managedFields", "selfLink")


def _group(api_version: str) -> tuple[str, str]:
    return tuple(api_version.split("/", 1)) if "/" in api_version else ("", api_version)


def is_core(obj: dict) -> bool:
    return _group(obj.get("apiVersion", ""))[0] in CORE_GROUPS


def describe(obj: dict) -> str:
    return f"{obj.get('kind', '?')} {obj.get('metadata', {}).get('name', '?')}"


# ---- metadata -------------------------------------------------------------------------------------------

def _qualified_name(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_NAME_PART.match(name))


def metadata_problems(obj: dict) -> list[str]:
    """The API server's ObjectMeta checks that neither schema covers."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata: required"]
    problems = []
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > 253 or not _SUBDOMAIN.match(name):
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    for field in ("labels", "annotations"):
        if not isinstance(meta.get(field) or {}, dict):
            problems.append(f"metadata.{field}: must be a map of strings")
            meta = {**meta, field: {}}
    for key, value in (meta.get("labels") or {}).items():
        if not _qualified_name(str(key)):
            problems.append(f"metadata.labels: invalid key {key!r}")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(f"metadata.labels[{key}]: invalid value {value!r}")
    for key, value in (meta.get("annotations") or {}).items():
        if not _qualified_name(str(key)):
            problems.append(f"metadata.annotations: invalid key {key!r}")
        if not isinstance(value, str):
            problems.append(f"metadata.annotations[{key}]: must be a string, got {type(value).__name__}")
    return problems


# ---- core kinds ---------------------------------------------------------------------------------------

def core_problems(obj: dict, k8s_version: str = K8S_VERSION) -> list[str]:
    """kubernetes-validate's strict verdict on a core object."""
    import kubernetes_validate
    try:
        kubernetes_validate.validate(copy.deepcopy(obj), k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in getattr(e, "path", ())) or "(root)"
        return [f"{where}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {k8s_version}"]
    return []


# ---- custom resources -----------------------------------------------------------------------------------

def structural_to_json_schema(node: dict, path: str = "", cel: list | None = None) -> dict:
    """One structural-schema node as JSON Schema (see the module docstring); the paths of nodes that carry
    CEL rules are appended to ``cel``."""
    out: dict[str, Any] = {k: node[k] for k in _KEEP if k in node}
    if node.get("x-kubernetes-validations") and cel is not None:
        cel.append(path or "(root)")
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("pattern", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string", **({"pattern": node["pattern"]}
                                                                   if "pattern" in node else {})}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    props = {k: structural_to_json_schema(v, f"{path}.{k}", cel) for k, v in (node.get("properties") or {}).items()}
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    if node.get("x-kubernetes-embedded-resource"):
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
        out["required"] = sorted(set(out.get("required", [])) | {"apiVersion", "kind"})
    if props:
        out["properties"] = props
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = structural_to_json_schema(extra, f"{path}.*", cel)
    elif node.get("type") == "object" and not preserve and extra is not True:
        out["additionalProperties"] = False      # strict: a field the schema does not name is unknown
    if "items" in node:
        out["items"] = structural_to_json_schema(node["items"], f"{path}[]", cel)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node and not node.get("x-kubernetes-int-or-string"):
            out[key] = [_value_constraints(n) for n in node[key]]
    list_type = node.get("x-kubernetes-list-type")
    if list_type in ("set", "map"):
        out["x-flotilla-list"] = (list_type, node.get("x-kubernetes-list-map-keys") or [])
    return out


def _value_constraints(node: dict) -> dict:
    """A branch of anyOf/allOf/oneOf: value validations only (the structural part is the parent's)."""
    return {k: node[k] for k in _KEEP if k in node} | (
        {"properties": {k: _value_constraints(v) for k, v in node["properties"].items()}}
        if "properties" in node else {})


@functools.lru_cache(maxsize=4)
def crd_index(directory: str) -> "CrdIndex":
    """The ``CrdIndex`` of a directory, built once per process."""
    return CrdIndex(directory)


class CrdIndex:
    """The served versions' schemas of the CRDs in ``directory`` (*.yaml), by (group, version, kind)."""

    def __init__(self, directory: str):
        self.schemas: dict[tuple[str, str, str], dict] = {}
        self.cel: dict[tuple[str, str, str], list[str]] = {}
        for path in sorted(glob.glob(os.path.join(directory, "*.yaml"))):
            with open(path, encoding="utf-8") as f:
                crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - safe
            if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    key = (group, version["name"], kind)
                    cel: list[str] = []
                    schema = structural_to_json_schema(version["schema"]["openAPIV3Schema"], "", cel)
                    schema.setdefault("properties", {})["metadata"] = {
                        "type": "object", "properties": {f: {} for f in OBJECT_META_FIELDS},
                        "additionalProperties": False}
                    self.schemas[key], self.cel[key] = schema, cel

    def problems(self, obj: dict) -> list[str]:
        import jsonschema
        group, version = _group(obj.get("apiVersion", ""))
        key = (group, version, obj.get("kind"))
        schema = self.schemas.get(key)
        if schema is None:
            return [f"no served CRD version for {obj.get('apiVersion')} {obj.get('kind')}"]
        validator = jsonschema.Draft4Validator(schema, format_checker=_format_checker())
        found = [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
                 for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
        found += _list_problems(schema, obj, "")
        found += [f"{p}: sets a field with CEL validation rules (x-kubernetes-validations), not evaluated offline"
                  for p in self.cel[key] if _present(obj, p)]
        return found


def _format_checker():
    import jsonschema
    checker = jsonschema.FormatChecker()
    for name, (low, high) in _INT_RANGES.items():
        checker.checks(name)(lambda v, low=low, high=high: not isinstance(v, int) or low <= v <= high)
    return checker


def _list_problems(schema: dict, value: Any, path: str) -> list[str]:
    """Repeated items of x-kubernetes-list-type set lists, repeated keys of map lists."""
    problems = []
    if isinstance(value, dict):
        for k, v in value.items():
            sub = (schema.get("properties") or {}).get(k)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                problems += _list_problems(sub, v, f"{path}.{k}")
    elif isinstance(value, list) and "items" in schema:
        kind, keys = schema.get("x-flotilla-list", (None, []))
        seen = [(tuple(i.get(k) for k in keys) if kind == "map" and isinstance(i, dict) else repr(i)) for i in value]
        if kind in ("set", "map") and len(set(seen)) != len(seen):
            problems.append(f"{path or '(root)'}: duplicate {'keys' if kind == 'map' else 'items'} in a "
                            f"{kind} list")
        for i, item in enumerate(value):
            problems += _list_problems(schema["items"], item, f"{path}[{i}]")
    return problems


def _present(obj: Any, path: str) -> bool:
    """Whether the field at a schema path (``.spec.items[].name``; ``*``: any map key) is set in ``obj``."""
    if path == "(root)":
        return True
    values = [obj]
    for part in filter(None, path.split(".")):
        name, is_list = (part[:-2], True) if part.endswith("[]") else (part, False)
        found = []
        for value in values:
            if isinstance(value, dict):
                found += list(value.values()) if name == "*" else ([value[name]] if name in value else [])
        if is_list:
            found = [item for value in found if isinstance(value, list) for item in value]
        values = [value for value in found if value is not None]
    return bool(values)


# ---- everything -------------------------------------------------------------------------------------------

def validate_objects(objects: Iterable[dict], crd_dir: str, k8s_version: str = K8S_VERSION) -> list[str]:
    """Problems of every object (empty: all valid), each prefixed with its kind and name."""
    crds = None
    problems = []
    for obj in objects:
        found = metadata_problems(obj)
        if is_core(obj):
            found += core_problems(obj, k8s_version)
        else:
            crds = crds or crd_index(os.path.abspath(crd_dir))
            found += crds.problems(obj)
        problems += [f"{describe(obj)}: {p}" for p in found]
    return problems
