"""The validated deployment as plain frozen values: ``DeploymentConfig``, ``ModelSpec``, ``AutoscalingSpec``
and ``DeploymentConfigError`` (the file's schema, which builds them, is ``flotilla.deploy.config``).

Nothing here imports more than the standard library and ``flotilla.errors``, so the CLI can build a
deployment without loading the schema or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from flotilla.errors import FlotillaError

DEFAULT_ROUTING = "power_of_two"
DEFAULT_TARGET_ONGOING_REQUESTS = 2.0  # Ray Serve's default
MODEL_CONTROL_MODES = ("none", "poll", "explicit")   # Triton's --model-control-mode
DEFAULT_REPOSITORY_POLL_SECS = 15.0                  # Triton's --repository-poll-secs


class DeploymentConfigError(FlotillaError, ValueError):
    """An invalid deployment file. ``source`` is the file (or a description), ``key`` the key path
    (``models[0].engine.max_num_seqs``; "" for the whole document); the message starts with both."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.reason = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


@dataclass(frozen=True)
class AutoscalingSpec:
    """Replica bounds for Ray Serve's autoscaler (``1 <= min_replicas <= max_replicas``). The delays are
    None for Ray's defaults. Embedded mode does not autoscale: it runs ``min_replicas``."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float = DEFAULT_TARGET_ONGOING_REQUESTS
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One served model. ``name`` is what clients send; ``model`` what the engine loads (alias, directory or
    .gguf path; relative paths that exist next to the file are made absolute). ``replicas`` is the fixed
    replica count, or ``autoscaling.min_replicas`` when ``autoscaling`` is set (they are exclusive in the
    file). ``engine`` holds validated ``EngineArgs`` overrides (only the keys given); ``ray`` holds
    Ray-only options, ignored in embedded mode. ``parallel_auto`` (the file's ``parallel: auto``): the sizes
    and replicas are placeholders until ``flotilla.planner.resolve_deployment`` fills them in (``flotilla
    serve`` does); ``engine_args`` refuses an unresolved spec. Instances compare by value (do not hash them)."""

    name: str
    model: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    replicas: int = 1
    autoscaling: AutoscalingSpec | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    ray: dict[str, Any] = field(default_factory=dict)
    parallel_auto: bool = False

    def engine_args(self):
        """The ``EngineArgs`` of one replica (``served_model_name`` is ``name``)."""
        from flotilla.engine.arg_utils import EngineArgs
        if self.parallel_auto:
            raise DeploymentConfigError("<deployment>", f"model {self.name!r} parallel",
                                        "auto is resolved by flotilla.planner.resolve_deployment before serving")
        return EngineArgs(model=self.model, served_model_name=self.name, tensor_parallel_size=self.tensor_parallel_size,
                          pipeline_parallel_size=self.pipeline_parallel_size, **self.engine)


@dataclass(frozen=True)
class RepositorySpec:
    """A Triton-style model repository served next to the LLMs (tritonserver's flags): ``paths`` the repository
    directories (``--model-repository``, absolute once resolved), ``model_control_mode`` none / poll /
    explicit, ``load_models`` the models explicit mode loads at startup (``--load-model``; ``*``: all),
    ``poll_secs`` the poll interval of poll mode (``--repository-poll-secs``), ``strict_readiness``
    (``--strict-readiness``: ready only when every model that should be loaded is)."""

    paths: tuple[str, ...]
    model_control_mode: str = "none"
    load_models: tuple[str, ...] = ()
    poll_secs: float = DEFAULT_REPOSITORY_POLL_SECS
    strict_readiness: bool = True


def repository_problem(mode: str, load_models, poll_secs: float | None) -> tuple[str, str] | None:
    """The first rule a repository setting breaks, as (setting, reason), for the CLI and the file alike:
    ``setting`` is "model_control_mode", "load_models" or "poll_secs"; None when all hold."""
    if mode not in MODEL_CONTROL_MODES:
        return "model_control_mode", f"expected one of: {', '.join(MODEL_CONTROL_MODES)}, got {mode!r}"
    if load_models and mode != "explicit":
        return "load_models", "models to load at startup need model control mode 'explicit'"
    if "*" in load_models and len(load_models) > 1:
        return "load_models", "'*' (all models) must be the only model to load if given"
    if poll_secs is not None and mode != "poll":
        return "poll_secs", "a repository poll interval needs model control mode 'poll'"
    if poll_secs is not None and not poll_secs > 0:
        return "poll_secs", f"must be > 0, got {poll_secs:g}"
    return None


@dataclass(frozen=True)
class DeploymentConfig:
    """A validated deployment: ``models`` (unique names, in file order), ``routes`` (alias -> {model name:
    weight}, weights >= 0 with a positive sum; aliases never shadow a model), ``routing`` (one of
    ``ROUTING_POLICIES``), ``api_key_env`` (name of the env var holding the API key, or None), ``seed`` (for
    traffic splits and routing; None: nondeterministic), ``ingress_replicas`` (replicas of the Ray Serve
    ingress, >= 1; embedded mode ignores it), ``model_repository`` (a ``RepositorySpec`` or None; with one,
    ``models`` may be empty: a server of repository models only). ``source`` (the file) is not part of
    equality."""

    models: tuple[ModelSpec, ...]
    routes: dict[str, dict[str, float]] = field(default_factory=dict)
    routing: str = DEFAULT_ROUTING
    api_key_env: str | None = None
    seed: int | None = None
    ingress_replicas: int = 1
    model_repository: RepositorySpec | None = None
    source: str = field(default="<deployment>", compare=False)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def model(self, name: str) -> ModelSpec:
        """The model called ``name`` (KeyError if none)."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The API key from ``api_key_env`` (None when no variable is named). A named variable that is unset
        or empty is a ``DeploymentConfigError``. ``environ`` defaults to the process environment."""
        if self.api_key_env is None:
            return None
        if environ is None:
            from flotilla import envs
            value = envs.named(self.api_key_env)
        else:
            value = environ.get(self.api_key_env)
        if not value:
            raise DeploymentConfigError(self.source, "api_key_env",
                                        f"the environment variable {self.api_key_env} is not set (or empty)")
        return value
