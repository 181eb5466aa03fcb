"""The deployment file: which models to serve, how many replicas, traffic splits and routing.

One schema for every way flotilla serves: ``flotilla serve --config deploy.yaml`` (embedded: one process),
the Ray Serve deployment, and ``flotilla serve MODEL --flags`` (``deployment_from_cli``, from
``flotilla.deploy.engine_args``: the one-model shorthand of the same file). The validated values are the frozen
dataclasses of ``flotilla.deploy.spec``, re-exported here. Example::

    api_key_env: FLOTILLA_API_KEY        # optional: the env var that holds the API key
    seed: 0                              # optional: seeds alias traffic splits and routing
    models:
      - name: chat-v1                    # the name clients send as "model"
        model: smollm2-135m-instruct     # alias, HF directory or .gguf (relative: to this file's directory)
        parallel: {tensor: 1, pipeline: 1}   # or auto: flotilla.planner picks sizes and replicas
        replicas: 2                      # or autoscaling: {min: 1, max: 4, target_ongoing_requests: 8}
        engine: {max_num_seqs: 32, kv_cache_memory: 1}   # EngineArgs fields
        ray: {num_cpus: 1}               # Ray Serve settings (schema.RaySettings; ignored when embedded)
    routes:                              # aliases with weighted traffic (A/B, canary)
      chat: {chat-v1: 90, chat-v2: 10}
    routing: prefix_aware                # replica choice: prefix_aware | power_of_two | round_robin
    ingress: {replicas: 2}               # Ray Serve only: OpenAI ingress replicas (default 1)
    model_repository:                    # optional: a Triton-layout model repository (then models may be empty)
      paths: [./triton_models]           # relative: to this file's directory
      model_control_mode: explicit       # none (default) | poll | explicit
      load_models: [embed]               # explicit mode: load these at startup ("*": all)
      # repository_poll_secs: 15         # poll mode only
      strict_readiness: true             # ready only when every model that should load did

Contract: ``load_deployment_config`` / ``parse_deployment_config`` return a validated, frozen
``DeploymentConfig`` or raise ``DeploymentConfigError`` whose message starts with the file and the key path
(``deploy.yaml: models[0].parallel.tensr: unknown key (expected one of: tensor, pipeline, auto)``); a YAML
syntax error (or a duplicated key) names the line. Nothing here loads a model.

Validation is the pydantic schema of ``flotilla.deploy.schema`` (strict types, unknown keys refused at every
level, every number finite, an optional key set to null takes its default); the first problem is reported,
an unknown key before any other (it is the likely cause of a missing one).
"""

from __future__ import annotations

import os
import re
import types
import typing
from typing import Any

from flotilla.deploy.engine_args import deployment_from_cli
from flotilla.deploy.spec import DEFAULT_REPOSITORY_POLL_SECS
from flotilla.deploy.spec import (AutoscalingSpec, DeploymentConfig, DeploymentConfigError, ModelSpec,
                                  RepositorySpec)

__all__ = ["AutoscalingSpec", "DeploymentConfig", "DeploymentConfigError", "ModelSpec", "RepositorySpec",
           "deployment_from_cli", "load_deployment_config", "parse_deployment_config"]


# ------------------------------------------------------------------------------------------------ loading

def load_deployment_config(path: str | os.PathLike) -> DeploymentConfig:
    """Read, parse and validate a YAML deployment file (see the module docstring)."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DeploymentConfigError(source, "", f"cannot read the file: {e.strerror or e}") from None
    data = _load_yaml(text, source)
    return parse_deployment_config(data, source, base_dir=os.path.dirname(os.path.abspath(source)))


def _load_yaml(text: str, source: str) -> Any:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        line = key_node.start_mark.line + 1
                        raise DeploymentConfigError(source, "", f"line {line}: duplicate key {key_node.value!r}")
                    seen.add(key_node.value)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise DeploymentConfigError(source, "", f"{where}invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise DeploymentConfigError(source, "", f"invalid YAML: {e}") from None


def parse_deployment_config(data: Any, source: str = "<deployment>", base_dir: str | None = None) -> DeploymentConfig:
    """Validate an already-parsed document (``source`` names it in errors). Relative model paths are
    resolved against ``base_dir`` when that path exists there."""
    import pydantic

    from flotilla.deploy import schema
    try:
        doc = schema.Document.model_validate(data)
    except pydantic.ValidationError as e:
        raise _config_error(e, source) from None
    models = tuple(_model_spec(entry, base_dir) for entry in doc.models)
    return DeploymentConfig(models=models, routes={alias: dict(w) for alias, w in doc.routes.items()},
                            routing=doc.routing, api_key_env=doc.api_key_env, seed=doc.seed,
                            ingress_replicas=doc.ingress.replicas,
                            model_repository=_repository_spec(doc.model_repository, base_dir), source=source)


def _repository_spec(section, base_dir: str | None) -> RepositorySpec | None:
    if section is None:
        return None
    paths = tuple(p if base_dir is None or os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))
                  for p in section.paths)
    poll = section.repository_poll_secs
    return RepositorySpec(paths=paths, model_control_mode=section.model_control_mode,
                          load_models=tuple(section.load_models),
                          poll_secs=DEFAULT_REPOSITORY_POLL_SECS if poll is None else float(poll),
                          strict_readiness=section.strict_readiness)


def _model_spec(entry, base_dir: str | None) -> ModelSpec:
    auto = entry.autoscaling
    autoscaling = None if auto is None else AutoscalingSpec(
        min_replicas=auto.min, max_replicas=auto.max, target_ongoing_requests=auto.target_ongoing_requests,
        upscale_delay_s=auto.upscale_delay_s, downscale_delay_s=auto.downscale_delay_s)
    return ModelSpec(name=entry.name, model=_resolve_path(entry.model, base_dir),
                     tensor_parallel_size=entry.parallel.tensor, pipeline_parallel_size=entry.parallel.pipeline,
                     parallel_auto=entry.parallel.auto,
                     replicas=auto.min if auto is not None else entry.replicas, autoscaling=autoscaling,
                     engine=entry.engine.model_dump(exclude_unset=True), ray=entry.ray.model_dump(exclude_unset=True))


def _resolve_path(model: str, base_dir: str | None) -> str:
    if base_dir is None or os.path.isabs(model):
        return model
    candidate = os.path.normpath(os.path.join(base_dir, model))
    return candidate if os.path.exists(candidate) else model


# ------------------------------------------------------------------------ pydantic errors -> key paths

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_UNKNOWN_KEY_ERRORS = ("extra_forbidden", "invalid_key")
_REASONS = {  # pydantic error type -> message (``{kind}``: the offending value, as ``schema.kind`` names it)
    "missing": "required key is missing",
    "model_type": "expected a mapping, got {kind}", "dict_type": "expected a mapping, got {kind}",
    "list_type": "expected a list, got {kind}",
    "int_type": "expected an integer, got {kind}", "int_parsing": "expected an integer, got {kind}",
    "int_from_float": "expected an integer, got {kind}",
    "bool_type": "expected true or false, got {kind}", "bool_parsing": "expected true or false, got {kind}",
    "float_type": "expected a finite number, got {kind}", "float_parsing": "expected a finite number, got {kind}",
    "finite_number": "expected a finite number, got {kind}",
    "string_type": "expected a non-empty string, got {kind}", "string_too_short": "expected a non-empty string, "
                                                                                  "got {kind}",
    "invalid_key": "keys must be strings, got {kind}",
}


def _config_error(error, source: str) -> DeploymentConfigError:
    """The first problem of a pydantic ``ValidationError`` as a ``DeploymentConfigError`` naming its key path
    (an unknown key first: it is the likely cause of a missing one)."""
    from flotilla.deploy import schema
    errors = error.errors()
    first = next((e for e in errors if e["type"] in _UNKNOWN_KEY_ERRORS), errors[0])
    ctx, loc = first.get("ctx") or {}, tuple(first["loc"])
    loc += tuple(ctx.get("at", ()))
    if (loc and loc[-1] == "[key]") or first["type"] == "invalid_key":  # a mapping's key itself is wrong
        loc = loc[:-1]
        if first["type"] == "string_type":
            first = {**first, "type": "invalid_key"}
    if first["type"] == "flotilla":
        reason = ctx["reason"]
    elif first["type"] == "extra_forbidden":
        reason = f"unknown key (expected one of: {', '.join(_keys_at(schema.Document, loc[:-1]))})"
    elif first["type"] in ("greater_than_equal", "greater_than"):
        op, bound = (">=", ctx["ge"]) if "ge" in ctx else (">", ctx["gt"])
        reason = f"must be {op} {_number(bound)}, got {_number(first['input'])}"
    else:
        reason = _REASONS.get(first["type"], first["msg"]).format(kind=schema.kind(first.get("input")))
    return DeploymentConfigError(source, _key_path(loc), reason)


def _key_path(loc: tuple) -> str:
    """``("models", 0, "parallel", "tensr")`` -> ``models[0].parallel.tensr``; odd keys as ``['a b']``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY.match(part):
            path += f".{part}" if path else part
        else:
            path += f"[{part!r}]"
    return path


def _keys_at(model: Any, loc: tuple) -> list[str]:
    """The keys the schema allows in the mapping at ``loc`` (a path from ``model``)."""
    for part in loc:
        model = _unwrap(model)
        if isinstance(model, type) and hasattr(model, "model_fields"):
            model = model.model_fields[part].annotation
        else:  # list[X] -> X, dict[K, V] -> V
            model = typing.get_args(model)[-1]
    return list(_unwrap(model).model_fields)


def _unwrap(hint: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` -> ``X``."""
    while typing.get_origin(hint) in (typing.Annotated, typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
