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
        parallel: {tensor: 1, pipeline: 1}
        replicas: 2                      # or autoscaling: {min: 1, max: 4, target_ongoing_requests: 8}
        engine: {max_num_seqs: 32, kv_cache_memory: 1}   # EngineArgs fields
        ray: {placement_strategy: PACK}  # Ray-only options (ignored when embedded)
    routes:                              # aliases with weighted traffic (A/B, canary)
      chat: {chat-v1: 90, chat-v2: 10}
    routing: prefix_aware                # replica choice: prefix_aware | power_of_two | round_robin

Contract: ``load_deployment_config`` / ``parse_deployment_config`` return a validated, frozen
``DeploymentConfig`` or raise ``DeploymentConfigError`` whose message starts with the file and the key path
(``deploy.yaml: models[0].parallel.tensr: unknown key (expected one of: tensor, pipeline)``); a YAML syntax
error (or a duplicated key) names the line. Nothing here loads a model.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from flotilla.deploy.engine_args import ENGINE_KEYS_SET_ELSEWHERE as _ENGINE_KEYS_SET_ELSEWHERE
from flotilla.deploy.engine_args import deployment_from_cli
from flotilla.deploy.routing import ROUTING_POLICIES
from flotilla.deploy.spec import (DEFAULT_ROUTING, DEFAULT_TARGET_ONGOING_REQUESTS, AutoscalingSpec, DeploymentConfig,
                                  DeploymentConfigError, ModelSpec)

__all__ = ["AutoscalingSpec", "DeploymentConfig", "DeploymentConfigError", "ModelSpec", "deployment_from_cli",
           "load_deployment_config", "parse_deployment_config"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Early checks of engine overrides (the engine validates everything again when it starts).
_ENGINE_CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16"), "quantization": (None, "int8"),
                   "distributed_executor_backend": (None, "uni", "mp", "ray", "external"),
                   "distributed_backend": (None, "gloo", "nccl")}
_ENGINE_MINIMUM = {"max_model_len": 1, "num_kv_blocks": 1, "block_size": 1, "max_num_seqs": 1,
                   "max_num_batched_tokens": 1, "num_threads": 1, "kv_cache_memory": 1e-9}
_TOP_KEYS = ("models", "routes", "routing", "api_key_env", "seed")
_MODEL_KEYS = ("name", "model", "parallel", "replicas", "autoscaling", "engine", "ray")
_PARALLEL_KEYS = ("tensor", "pipeline")
_AUTOSCALING_KEYS = ("min", "max", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s")


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
    top = _Node(source, "", data)
    top.check_keys(_TOP_KEYS, required=("models",))
    models_node = top.child("models")
    if not isinstance(models_node.value, list) or not models_node.value:
        raise models_node.error("expected a non-empty list of models")
    models = tuple(_parse_model(models_node.item(i), base_dir) for i in range(len(models_node.value)))
    seen: dict[str, int] = {}
    for i, m in enumerate(models):
        if m.name in seen:
            raise models_node.item(i).child("name").error(f"duplicate model name {m.name!r} "
                                                          f"(also models[{seen[m.name]}].name)")
        seen[m.name] = i
    routing = top.optional("routing", DEFAULT_ROUTING)
    if routing.value not in ROUTING_POLICIES:
        raise routing.error(f"unknown routing policy {routing.value!r} (expected one of: "
                            f"{', '.join(ROUTING_POLICIES)})")
    api_key_env = top.optional("api_key_env", None)
    if api_key_env.value is not None and not (isinstance(api_key_env.value, str) and api_key_env.value.strip()):
        raise api_key_env.error("expected the name of an environment variable")
    seed = top.optional("seed", None)
    if seed.value is not None:
        seed.integer(minimum=0)
    routes = _parse_routes(top.optional("routes", {}), [m.name for m in models])
    return DeploymentConfig(models=models, routes=routes, routing=routing.value, api_key_env=api_key_env.value,
                            seed=seed.value, source=source)


def _parse_model(node: "_Node", base_dir: str | None) -> ModelSpec:
    node.check_keys(_MODEL_KEYS, required=("name", "model"))
    name = node.child("name").string()
    if not NAME_RE.match(name):
        raise node.child("name").error(f"invalid name {name!r}: use letters, digits and . _ - : / @ +, "
                                       "starting with a letter or digit")
    model = _resolve_path(node.child("model").string(), base_dir)
    parallel = node.optional("parallel", {})
    parallel.check_keys(_PARALLEL_KEYS)
    tp = parallel.optional("tensor", 1).integer(minimum=1)
    pp = parallel.optional("pipeline", 1).integer(minimum=1)
    autoscaling = None
    if "autoscaling" in (node.value or {}):
        if "replicas" in node.value:
            raise node.child("replicas").error("give either replicas or autoscaling, not both")
        autoscaling = _parse_autoscaling(node.child("autoscaling"))
        replicas = autoscaling.min_replicas
    else:
        replicas = node.optional("replicas", 1).integer(minimum=1)
    engine = _parse_engine(node.optional("engine", {}))
    ray = node.optional("ray", {})
    ray.check_keys(None)
    if "placement_strategy" in ray.value:
        strategy = ray.child("placement_strategy")
        if strategy.value not in PLACEMENT_STRATEGIES:
            raise strategy.error(f"expected one of: {', '.join(PLACEMENT_STRATEGIES)}")
    return ModelSpec(name=name, model=model, tensor_parallel_size=tp, pipeline_parallel_size=pp, replicas=replicas,
                     autoscaling=autoscaling, engine=engine, ray=dict(ray.value))


def _resolve_path(model: str, base_dir: str | None) -> str:
    if base_dir is None or os.path.isabs(model):
        return model
    candidate = os.path.normpath(os.path.join(base_dir, model))
    return candidate if os.path.exists(candidate) else model


def _parse_autoscaling(node: "_Node") -> AutoscalingSpec:
    node.check_keys(_AUTOSCALING_KEYS, required=("min", "max"))
    lo = node.child("min").integer(minimum=1)
    hi = node.child("max").integer(minimum=1)
    if lo > hi:
        raise node.child("min").error(f"min ({lo}) must not exceed max ({hi})")
    target = node.optional("target_ongoing_requests", DEFAULT_TARGET_ONGOING_REQUESTS).number(positive=True)
    delays = [node.optional(k, None) for k in ("upscale_delay_s", "downscale_delay_s")]
    up, down = (d.number() if d.value is not None else None for d in delays)
    return AutoscalingSpec(min_replicas=lo, max_replicas=hi, target_ongoing_requests=target, upscale_delay_s=up,
                           downscale_delay_s=down)


def _parse_engine(node: "_Node") -> dict[str, Any]:
    import typing

    from flotilla.engine.arg_utils import EngineArgs
    hints = typing.get_type_hints(EngineArgs)
    allowed = [k for k in hints if k not in _ENGINE_KEYS_SET_ELSEWHERE]
    node.check_keys(None)
    out = {}
    for key in node.value:
        child = node.child(key)
        if key in _ENGINE_KEYS_SET_ELSEWHERE:
            raise child.error(f"not an engine override: set it with the model's "
                              f"{_ENGINE_KEYS_SET_ELSEWHERE[key]}")
        if key not in hints:
            raise child.error(f"unknown key (expected one of: {', '.join(allowed)})")
        value = out[key] = child.typed(hints[key])
        if key in _ENGINE_CHOICES and value not in _ENGINE_CHOICES[key]:
            raise child.error(f"expected one of: {', '.join(map(str, _ENGINE_CHOICES[key]))}")
        if key in _ENGINE_MINIMUM and value is not None and value < _ENGINE_MINIMUM[key]:
            raise child.error(f"must be >= {_ENGINE_MINIMUM[key]}, got {value}")
    return out


def _parse_routes(node: "_Node", model_names: list[str]) -> dict[str, dict[str, float]]:
    node.check_keys(None)
    routes = {}
    for alias in node.value:
        child = node.child(alias)
        if not NAME_RE.match(alias):
            raise child.error(f"invalid route name {alias!r}")
        if alias in model_names:
            raise child.error(f"route name {alias!r} is also a model name")
        child.check_keys(None)
        if not child.value:
            raise child.error("a route needs at least one target")
        weights = {}
        for target in child.value:
            weight = child.child(target)
            if target not in model_names:
                raise weight.error(f"unknown model {target!r} (models: {', '.join(model_names)})")
            weights[target] = weight.number()
        if math.fsum(weights.values()) <= 0:
            raise child.error("the weights must sum to more than 0")
        routes[alias] = weights
    return routes


# ------------------------------------------------------------------------------------- validation nodes

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class _Node:
    """A value of the document with its key path, for errors that name where they are."""

    def __init__(self, source: str, path: str, value: Any):
        self.source, self.path, self.value = source, path, value

    def error(self, message: str) -> DeploymentConfigError:
        return DeploymentConfigError(self.source, self.path, message)

    def _sub(self, key) -> str:
        if isinstance(key, str) and _PLAIN_KEY.match(key):
            return f"{self.path}.{key}" if self.path else key
        return f"{self.path}[{key!r}]"

    def child(self, key: str) -> "_Node":
        return _Node(self.source, self._sub(key), self.value[key])

    def optional(self, key: str, default: Any) -> "_Node":
        value = self.value.get(key, default) if isinstance(self.value, dict) else default
        return _Node(self.source, self._sub(key), default if value is None and default is not None else value)

    def item(self, index: int) -> "_Node":
        return _Node(self.source, f"{self.path}[{index}]", self.value[index])

    def check_keys(self, allowed, required=()) -> None:
        """A mapping with string keys, only ``allowed`` ones (None: any), and every ``required`` one."""
        if not isinstance(self.value, dict):
            raise self.error(f"expected a mapping, got {_kind(self.value)}")
        for key in self.value:
            if not isinstance(key, str) or not key:
                raise self.error(f"keys must be non-empty strings, got {key!r}")
            if allowed is not None and key not in allowed:
                raise DeploymentConfigError(self.source, self._sub(key),
                                            f"unknown key (expected one of: {', '.join(allowed)})")
        for key in required:
            if key not in self.value:
                raise DeploymentConfigError(self.source, self._sub(key), "required key is missing")

    def string(self) -> str:
        if not isinstance(self.value, str) or not self.value.strip():
            raise self.error(f"expected a non-empty string, got {_kind(self.value)}")
        return self.value

    def integer(self, minimum: int | None = None) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self.error(f"expected an integer, got {_kind(self.value)}")
        if minimum is not None and self.value < minimum:
            raise self.error(f"must be >= {minimum}, got {self.value}")
        return self.value

    def number(self, positive: bool = False) -> float:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.error(f"expected a finite number, got {_kind(v)}")
        if v < 0 or (positive and v == 0):
            raise self.error(f"must be {'> 0' if positive else '>= 0'}, got {v}")
        return float(v)

    def typed(self, hint) -> Any:
        """The value checked against an EngineArgs annotation (int, float, bool, str, list[int], X | None)."""
        import types
        import typing
        args = typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            if self.value is None and type(None) in args:
                return None
            (hint,) = [a for a in args if a is not type(None)]
        if hint is bool:
            if not isinstance(self.value, bool):
                raise self.error(f"expected true or false, got {_kind(self.value)}")
            return self.value
        if hint is int:
            return self.integer()
        if hint is float:
            v = self.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise self.error(f"expected a number, got {_kind(v)}")
            return float(v)
        if hint is str:
            return self.string()
        if typing.get_origin(hint) is list:
            if not isinstance(self.value, list):
                raise self.error(f"expected a list, got {_kind(self.value)}")
            return [self.item(i).typed(typing.get_args(hint)[0]) for i in range(len(self.value))]
        raise self.error(f"cannot be set from the deployment file (type {hint})")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return f"{type(value).__name__} {value!r}"
