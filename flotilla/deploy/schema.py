"""The deployment file's schema as pydantic models: strict types (no "4" for 4, no 1 for true), unknown keys
rejected, every number finite, and the cross-field rules (unique names, routes to existing models,
autoscaling bounds) as validators.

A rule that fails raises ``fail(reason, at)``: ``at`` is the key path below the model that raised it, so the
translation to ``DeploymentConfigError`` (``flotilla.deploy.config``) names the exact key. ``Document`` is
the whole file; ``flotilla.deploy.config`` turns a validated one into the frozen ``DeploymentConfig``.

The ``engine:`` section is ``EngineOverrides``, built from ``EngineArgs``' own fields and type hints (so a new
engine setting is accepted in the file as soon as it exists), with the early range and choice checks below.
"""

from __future__ import annotations

import math
import re
import typing
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from flotilla.config import SCHEDULING_POLICIES
from flotilla.deploy.engine_args import ENGINE_KEYS_SET_ELSEWHERE
from flotilla.deploy.routing import ROUTING_POLICIES
from flotilla.deploy.spec import (DEFAULT_ROUTING, DEFAULT_TARGET_ONGOING_REQUESTS, MODEL_CONTROL_MODES,
                                  repository_problem)
from flotilla.engine.arg_utils import EngineArgs

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Early checks of engine overrides (the engine validates everything again when it starts).
ENGINE_CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16"), "quantization": ("gguf", "int8", "int4", "none"),
                  "distributed_executor_backend": ("uni", "mp", "ray", "external"),
                  "distributed_backend": ("gloo", "nccl"), "runner": ("auto", "generate", "pooling"),
                  "scheduling_policy": SCHEDULING_POLICIES}
ENGINE_MINIMUM = {"max_model_len": 1, "num_kv_blocks": 1, "block_size": 1, "max_num_seqs": 1,
                  "max_num_batched_tokens": 1, "num_threads": 1, "cpu_offload_gb": 0,
                  "gguf_dense_min_tokens": 0}
ENGINE_POSITIVE = ("kv_cache_memory", "max_resident_weights")


def fail(reason: str, at: tuple = ()) -> PydanticCustomError:
    """The error of a rule: ``reason`` is the message, ``at`` the key path below the raising model."""
    return PydanticCustomError("flotilla", "{reason}", {"reason": reason, "at": tuple(at)})


def kind(value: Any) -> str:
    """How a value is named in messages: ``int 3``, ``str 'x'``, ``list``, ``nothing (null)``."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return f"{type(value).__name__} {value!r}"


def _non_empty(value: str) -> str:
    if not value.strip():
        raise fail(f"expected a non-empty string, got {kind(value)}")
    return value


def _model_name(value: str) -> str:
    if not NAME_RE.match(_non_empty(value)):
        raise fail(f"invalid name {value!r}: use letters, digits and . _ - : / @ +, starting with a letter or digit")
    return value


def _route_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise fail(f"invalid route name {value!r}")
    return value


def one_of(choices: tuple) -> AfterValidator:
    def check(value):
        if value not in choices:
            raise fail(f"expected one of: {', '.join(map(str, choices))}, got {kind(value)}")
        return value
    return AfterValidator(check)


def _routing(value: str) -> str:
    if value not in ROUTING_POLICIES:
        raise fail(f"unknown routing policy {value!r} (expected one of: {', '.join(ROUTING_POLICIES)})")
    return value


def _finite_tree(value: Any, at: tuple = ()) -> Any:
    """Free-form mappings (Ray options) hold no NaN or infinity either."""
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(f"expected a finite number, got {kind(value)}", at)
    for key, item in (value.items() if isinstance(value, dict) else enumerate(value)
                      if isinstance(value, list) else ()):
        _finite_tree(item, (*at, key))
    return value


NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
FreeMapping = Annotated[dict[str, Any], AfterValidator(_finite_tree)]


class Section(BaseModel):
    """A mapping of the file: strict, closed (unknown keys are errors), finite numbers. An optional key set
    to null takes its default, as if it were left out."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if not (v is None and k in fields and not fields[k].is_required())}
        return data


class Parallel(Section):
    """``parallel: {tensor, pipeline}``, or ``parallel: auto`` (``auto: true``): the planner chooses the sizes
    and the replicas when the file is served (``flotilla.planner.resolve_deployment``)."""

    tensor: PositiveInt = 1
    pipeline: PositiveInt = 1
    auto: bool = False

    @model_validator(mode="before")
    @classmethod
    def _auto_shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            if data != "auto":
                raise fail(f"expected a mapping {{tensor, pipeline}} or auto, got {kind(data)}")
            return {"auto": True}
        return data

    @model_validator(mode="after")
    def _auto_alone(self):
        if self.auto and ({"tensor", "pipeline"} & self.model_fields_set):
            raise fail("auto chooses the tensor and pipeline sizes: remove them, or remove auto",
                       ("tensor" if "tensor" in self.model_fields_set else "pipeline",))
        return self


class Autoscaling(Section):
    min: PositiveInt
    max: PositiveInt
    target_ongoing_requests: Positive = DEFAULT_TARGET_ONGOING_REQUESTS
    upscale_delay_s: Optional[NonNegative] = None
    downscale_delay_s: Optional[NonNegative] = None

    @model_validator(mode="after")
    def _bounds(self):
        if self.min > self.max:
            raise fail(f"min ({self.min}) must not exceed max ({self.max})", ("min",))
        return self


class RaySettings(Section):
    """Ray-only settings of a model (``flotilla.deploy.ray_serve`` applies them; embedded mode ignores them)."""

    num_cpus: Optional[NonNegative] = None
    num_gpus: Optional[NonNegative] = None
    ray_actor_options: Optional[FreeMapping] = None
    max_ongoing_requests: Optional[PositiveInt] = None
    health_check_period_s: Optional[Positive] = None
    health_check_timeout_s: Optional[Positive] = None
    stall_timeout_s: Optional[Positive] = None
    graceful_shutdown_timeout_s: Optional[NonNegative] = None
    autoscaling_config: Optional[FreeMapping] = None
    routing_stats_period_s: Optional[Positive] = None
    routing_kwargs: Optional[FreeMapping] = None
    placement_strategy: Optional[Annotated[str, one_of(PLACEMENT_STRATEGIES)]] = None


RAY_SETTINGS = tuple(RaySettings.model_fields)


class _EngineSection(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _keys_set_elsewhere(cls, data: Any) -> Any:
        for key in data if isinstance(data, dict) else ():
            if key in ENGINE_KEYS_SET_ELSEWHERE:
                raise fail(f"not an engine override: set it with the model's {ENGINE_KEYS_SET_ELSEWHERE[key]}", (key,))
        return data


def _engine_field_type(name: str, hint: Any) -> Any:
    """The file's type of one EngineArgs field: its hint, with choices, minimums and non-empty strings."""
    args = typing.get_args(hint)
    optional = type(None) in args
    (inner,) = [a for a in args if a is not type(None)] if optional else (hint,)
    if name in ENGINE_CHOICES:
        inner = Annotated[inner, one_of(ENGINE_CHOICES[name])]
    elif name in ENGINE_MINIMUM:
        inner = Annotated[inner, Field(ge=ENGINE_MINIMUM[name])]
    elif name in ENGINE_POSITIVE:
        inner = Annotated[inner, Field(gt=0)]
    elif inner is str:
        inner = NonEmptyStr
    return Optional[inner] if optional else inner


EngineOverrides = create_model(
    "EngineOverrides", __base__=_EngineSection,
    **{name: (_engine_field_type(name, hint), None) for name, hint in typing.get_type_hints(EngineArgs).items()
       if name not in ENGINE_KEYS_SET_ELSEWHERE})
EngineOverrides.__doc__ = ("``EngineArgs`` overrides of one model (only the keys given are set); the fields a model "
                           "entry sets itself (``ENGINE_KEYS_SET_ELSEWHERE``) are refused.")


class ModelEntry(Section):
    name: Annotated[str, AfterValidator(_model_name)]
    model: NonEmptyStr
    parallel: Parallel = Parallel()
    replicas: PositiveInt = 1
    autoscaling: Optional[Autoscaling] = None
    engine: EngineOverrides = EngineOverrides()  # type: ignore[valid-type]
    ray: RaySettings = RaySettings()

    @model_validator(mode="before")
    @classmethod
    def _replicas_or_autoscaling(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("replicas") is not None and data.get("autoscaling") is not None:
            raise fail("give either replicas or autoscaling, not both", ("replicas",))
        return data

    @model_validator(mode="after")
    def _auto_parallel_picks_replicas(self):
        if self.parallel.auto and ({"replicas", "autoscaling"} & self.model_fields_set):
            key = "replicas" if "replicas" in self.model_fields_set else "autoscaling"
            raise fail(f"parallel: auto chooses the replicas too: remove {key}, or set the parallel sizes", (key,))
        return self


class Ingress(Section):
    """The Ray Serve ingress (the OpenAI app in front of the models): ``replicas`` copies behind Serve's
    proxy. Embedded mode has one HTTP server and ignores it."""

    replicas: PositiveInt = 1


class ModelRepositorySection(Section):
    """``model_repository:``: a Triton-layout model repository served next to the models (tritonserver's
    --model-repository, --model-control-mode, --load-model, --repository-poll-secs, --strict-readiness)."""

    paths: list[NonEmptyStr]
    model_control_mode: Annotated[str, one_of(MODEL_CONTROL_MODES)] = "none"
    load_models: list[NonEmptyStr] = []
    repository_poll_secs: Optional[Positive] = None
    strict_readiness: bool = True

    @field_validator("paths", mode="before")
    @classmethod
    def _some_paths(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise fail(f"expected a non-empty list of repository directories, got {kind(value)}")
        return value

    @model_validator(mode="after")
    def _rules(self):
        problem = repository_problem(self.model_control_mode, self.load_models, self.repository_poll_secs)
        if problem is not None:
            setting, reason = problem
            raise fail(reason, ({"poll_secs": "repository_poll_secs"}.get(setting, setting),))
        return self


class Document(Section):
    """The whole deployment file (see ``flotilla.deploy.config``). ``models`` may be empty (or left out) when
    a ``model_repository`` is given."""

    model_repository: Optional[ModelRepositorySection] = None
    models: list[ModelEntry]
    ingress: Ingress = Ingress()
    routes: dict[Annotated[str, AfterValidator(_route_name)], dict[str, NonNegative]] = {}
    routing: Annotated[str, AfterValidator(_routing)] = DEFAULT_ROUTING
    api_key_env: Optional[str] = None
    seed: Optional[Annotated[int, Field(ge=0)]] = None

    @model_validator(mode="before")
    @classmethod
    def _models_optional_with_a_repository(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("model_repository") is not None and data.get("models") is None:
            return {**data, "models": []}
        return data

    @field_validator("models", mode="before")
    @classmethod
    def _non_empty_list(cls, value: Any, info) -> Any:
        with_repository = info.data.get("model_repository") is not None
        if not isinstance(value, list) or not (value or with_repository):
            raise fail(f"expected a non-empty list of models (or a model_repository), got {kind(value)}")
        return value

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _env_var_name(cls, value: Any) -> Any:
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise fail(f"expected the name of an environment variable, got {kind(value)}")
        return value

    @field_validator("routes")
    @classmethod
    def _weights(cls, routes: dict) -> dict:
        for alias, weights in routes.items():
            if not weights:
                raise fail("a route needs at least one target", (alias,))
            if math.fsum(weights.values()) <= 0:
                raise fail("the weights must sum to more than 0", (alias,))
        return routes

    @model_validator(mode="after")
    def _names(self):
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.models):
            if entry.name in seen:
                raise fail(f"duplicate model name {entry.name!r} (also models[{seen[entry.name]}].name)",
                           ("models", i, "name"))
            seen[entry.name] = i
        for alias, weights in self.routes.items():
            if alias in seen:
                raise fail(f"route name {alias!r} is also a model name", ("routes", alias))
            for target in weights:
                if target not in seen:
                    raise fail(f"unknown model {target!r} (models: {', '.join(seen)})", ("routes", alias, target))
        return self
