"""A deployment's model repository on Ray Serve: which repository models become deployments, and their options.

Each model directory the repository would load becomes one Serve deployment, ``repo-<model>``
(``RepositoryModelServer`` replicas, ``flotilla.deploy.ray_replicas``), serving all its versions that the
version policy selects; the OpenAI/KServe ingress reaches it through its deployment handle. Triton's
``instance_group { count }`` stays what it is in tritonserver: that many concurrent executors inside each
replica. Replicas per deployment: 1 (``REPOSITORY_REPLICAS``); the deployment file has no per-repository-model
section. Each replica reserves ``REPOSITORY_NUM_CPUS`` CPU.

Contracts:
- ``check_repository_on_ray(spec)``: ValueError for what Ray does not serve: model control mode ``poll`` (a
  Serve application's deployments are fixed when it is deployed; redeploy to change them).
- ``plan_repository(spec, file_models)`` -> ``RepositoryPlan``: mode ``none`` deploys every model of the
  repositories; ``explicit`` the ``load_models`` (``*``: all) and, as tritonserver's explicit load does, every
  model their ensembles use (recursively). A model whose directory or configuration is invalid (a duplicate
  name, a config that does not parse, no version the policy selects) gets no deployment: the ingress lists it
  UNAVAILABLE with the reason. So does an ensemble with a step on one of the deployment file's models
  (``file_models``: an LLM pipeline; embedded mode runs those, a repository replica on Ray has no LLM). Other models of the repositories are listed in the index as not loaded. A repository
  directory that does not exist is a ValueError.
- ``repository_deployments(plan)`` -> ``{model: bound deployment}``, ready to hand to the ingress.
- An ensemble's replica loads its composing models itself (each step through that model's batcher in the same
  replica); the composing models' own deployments serve requests made to them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flotilla.deploy.spec import RepositorySpec

DEPLOYMENT_PREFIX = "repo-"
REPOSITORY_REPLICAS = 1
REPOSITORY_NUM_CPUS = 1.0
# Requests one replica accepts at a time: enough for its dynamic batcher to form full batches (its own queue
# policy, max_queue_size, still rejects past its bound); Serve queues the rest at the caller.
REPOSITORY_MAX_ONGOING = 256
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RepositoryPlan:
    """What a repository becomes on Ray Serve: ``deployed`` models (one deployment each, sorted),
    ``unavailable`` models (name -> why; no deployment), ``not_loaded`` models (in the repositories, not asked
    for: explicit mode), the repository ``paths``, its ``mode`` and ``strict_readiness``."""

    paths: tuple[str, ...]
    mode: str
    strict_readiness: bool
    deployed: tuple[str, ...]
    unavailable: dict[str, str] = field(default_factory=dict)
    not_loaded: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        """Every model name the repository index lists."""
        return sorted({*self.deployed, *self.unavailable, *self.not_loaded})


def deployment_name(model: str) -> str:
    """The Serve deployment name of repository model ``model``."""
    return DEPLOYMENT_PREFIX + model


def check_repository_on_ray(spec: RepositorySpec) -> None:
    if spec.model_control_mode == "poll":
        raise ValueError("model control mode 'poll' is not available with --ray: each repository model is a Ray "
                         "Serve deployment fixed when the application is deployed; use 'none' or 'explicit' and "
                         "redeploy (flotilla serve --ray) to change the models")


def plan_repository(spec: RepositorySpec, file_models=()) -> RepositoryPlan:
    """The ``RepositoryPlan`` of ``spec`` next to the deployment file's models ``file_models`` (names; see
    the module contract)."""
    from flotilla.deploy.model_repository import visible_gpus
    from flotilla.repository.control import resolve_target, scan_repositories
    from flotilla.repository.ensemble import ensemble_steps, is_ensemble
    from flotilla.repository.errors import ModelControlError
    check_repository_on_ray(spec)
    try:
        scan = scan_repositories(spec.paths)
    except ModelControlError as e:
        raise ValueError(e.message) from None
    every = sorted({*scan.models, *scan.errors})
    if spec.model_control_mode == "explicit" and tuple(spec.load_models) != ("*",):
        wanted = list(dict.fromkeys(spec.load_models))
    else:
        wanted = list(every)
    deployed: list[str] = []
    unavailable: dict[str, str] = {}
    seen: set[str] = set()
    gpus = visible_gpus()
    while wanted:
        name = wanted.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if name in scan.errors:
            unavailable[name] = scan.errors[name]
            continue
        if name not in scan.models:
            unavailable[name] = f"failed to load '{name}', no model directory named '{name}' in the model repository"
            continue
        target = resolve_target(scan.models[name], gpu_count=gpus)
        if target.error is not None:
            unavailable[name] = target.error
            continue
        steps = [s.model_name for s in ensemble_steps(target.config)] if is_ensemble(target.config) else []
        outside = sorted({s for s in steps if s in file_models})
        if outside:
            unavailable[name] = (f"ensemble '{name}' has step(s) on the deployment file's model(s) "
                                 f"{', '.join(repr(s) for s in outside)}: on Ray Serve an ensemble's steps must be "
                                 f"repository models (serve it without --ray)")
            continue
        deployed.append(name)
        wanted.extend(s for s in steps if s in every)    # its composing models are loaded too
    not_loaded = tuple(n for n in every if n not in seen)
    return RepositoryPlan(tuple(spec.paths), spec.model_control_mode, spec.strict_readiness, tuple(sorted(deployed)),
                          unavailable, not_loaded)


def repository_deployment_options(model: str) -> dict:
    """``Deployment.options`` of one repository model's deployment (Serve's default request router)."""
    return dict(name=deployment_name(model), num_replicas=REPOSITORY_REPLICAS,
                max_ongoing_requests=REPOSITORY_MAX_ONGOING, ray_actor_options={"num_cpus": REPOSITORY_NUM_CPUS},
                health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S)


def repository_deployments(plan: RepositoryPlan) -> dict:
    """``{model: bound RepositoryModelServer deployment}`` for every deployed model of ``plan``."""
    from ray import serve

    from flotilla.deploy.ray_replicas import RepositoryModelServer
    return {model: serve.deployment(RepositoryModelServer).options(**repository_deployment_options(model))
            .bind(list(plan.paths), model) for model in plan.deployed}


def repository_cpus(plan: RepositoryPlan) -> float:
    """Logical CPUs the repository's replicas reserve."""
    return len(plan.deployed) * REPOSITORY_REPLICAS * REPOSITORY_NUM_CPUS


def check_repository_names(model_names, plan, ingress_name: str) -> None:
    """ValueError when a repository model of ``plan`` has the name of a deployment-file model, or its Ray Serve
    deployment name is taken by one (or by the ingress deployment ``ingress_name``)."""
    both = sorted(set(model_names) & set(plan.names))
    if both:
        raise ValueError(f"model name(s) {both} are both models of the deployment file and repository models")
    taken = {*model_names, ingress_name}
    clash = sorted(deployment_name(m) for m in plan.deployed if deployment_name(m) in taken)
    if clash:
        raise ValueError(f"Ray Serve deployment name(s) {clash} of repository models are taken by models of the "
                         f"deployment file; rename those models")
