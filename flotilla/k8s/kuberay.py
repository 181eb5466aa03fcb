"""``--target kuberay``: one ``RayService`` (ray.io/v1) that runs the deployment on Ray Serve, as
``flotilla serve --config deploy.yaml --ray`` does.

- ``serveConfigV2`` (Ray Serve's multi-application config, ``ray.serve.schema.ServeDeploySchema``) deploys
  the application ``flotilla`` (route prefix ``/``) from the import path ``APP_BUILDER``
  (``flotilla.entrypoints.ray_serve_app:build_app``) with the deployment document itself as ``args.deployment``
  (model paths as the pods see them, engine ``device``), plus ``shutdown_timeout``: the same Serve deployments,
  ingress, routes and autoscaling as ``flotilla serve --config --ray``. Serve's HTTP proxy listens on
  0.0.0.0:8000 on every node (KubeRay's serve Service selects them).
- ``rayClusterConfig``: a head group (no model replicas: ``num-cpus: 0``; 1 CPU and 2 GiB per ingress replica
  on top of 1 CPU and 4 GiB) and one worker group per model whose pods are sized for one replica's ranks
  (``ModelPlan``: CPUs and memory per rank, GPUs), ``nodes`` pods per replica, between
  ``min_replicas x nodes`` and ``max_replicas x nodes`` pods. Each pod offers Ray exactly the logical CPUs and
  GPUs one replica asks for (``replica_ray_resources``, the rule of ``flotilla.deploy.ray_serve``), so Serve
  places one replica per pod. The autoscaler is on when any model autoscales (Serve asks for replicas, Ray's
  autoscaler adds pods).
- Embedding models are Serve deployments like the others (``EmbeddingServer``), sized by the same rule.
- The file's ``model_repository`` (paths as the pods see them) becomes one ``repo-<model>`` deployment per
  repository model the application deploys (``flotilla.deploy.ray_repository.plan_repository``, run here on
  the repository as this machine sees it: it must be readable, relative paths against the file's directory),
  each one replica of ``REPOSITORY_NUM_CPUS`` CPU; the worker group ``repository`` has one pod per such
  deployment (one CPU rank's resources, Ray ``num-cpus`` 1). Refused, as ``flotilla serve --ray`` refuses
  them: model control mode ``poll`` (a Serve application's deployments are fixed when it is deployed), and a
  repository model whose name or deployment name is taken by a model of the file (``ray_serve.
  build_ray_app``'s check).
- Every pod gets the model storage (the ingress reads every model's tokenizer), the API key from the
  Secret, and flotilla's proxy middleware setting (errors Serve's proxy answers itself become OpenAI JSON).
"""

from __future__ import annotations

import dataclasses
import math
import os

from flotilla.deploy.config import parse_deployment_config
from flotilla.deploy.spec import DeploymentConfig
from flotilla.distributed.ray_compat import PROXY_CALLBACK_SETTING
from flotilla.k8s import pod
from flotilla.k8s.names import base_labels, object_name, selector_labels
from flotilla.k8s.options import GPU_RESOURCE, K8sError, K8sOptions
from flotilla.k8s.plain import metadata
from flotilla.k8s.plan import ModelPlan, RepositoryPods

APP_BUILDER = "flotilla.entrypoints.ray_serve_app:build_app"
APP_NAME = "flotilla"                          # flotilla.deploy.ray_serve.APP_NAME
INGRESS_NAME = "flotilla-ingress"              # flotilla.deploy.ray_serve.INGRESS_NAME
PROXY_MIDDLEWARES = "flotilla.entrypoints.openai.ray_proxy.proxy_middlewares"   # ray_proxy.IMPORT_PATH
SERVE_PORT = 8000
RAY_METRICS_PORT = 8080
RAY_PORTS = [("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("serve", SERVE_PORT),
             ("metrics", RAY_METRICS_PORT)]
_EXECUTOR_KEYS = ("distributed_executor_backend", "ray_address")


def replica_ray_resources(plan: ModelPlan) -> tuple[float, float]:
    """Logical (CPUs, GPUs) one replica takes in Ray: the replica actor (``flotilla.deploy.ray_serve.
    replica_resources``: 1 CPU or 1 GPU with one rank, nothing with several, or the file's ``ray:`` settings)
    plus one bundle per rank when there are several (``{"CPU": 1}``, or ``{"GPU": 1}`` on CUDA)."""
    ray = plan.spec.ray or {}
    cuda = plan.device == GPU_RESOURCE
    single = plan.world_size == 1
    options = {"num_cpus": ray.get("num_cpus", 1 if single and not cuda else 0),
               "num_gpus": ray.get("num_gpus", 1 if single and cuda else 0)}
    options.update(ray.get("ray_actor_options") or {})
    ranks = 0 if single else plan.world_size
    return (options.get("num_cpus", 0) + (0 if cuda else ranks), options.get("num_gpus", 0) + (ranks if cuda else 0))


def app_document(config: DeploymentConfig, plans: list[ModelPlan], api_key,
                 repository: RepositoryPods | None = None) -> dict:
    """The deployment document the Serve application is built from: the file's, with the models' (and the
    repository's) paths as the pods see them and their engine device (the replicas pick Ray's executor
    themselves)."""
    models = []
    for plan in plans:
        spec = plan.spec
        entry = {"name": plan.name, "model": plan.source.container_path(),
                 "parallel": {"tensor": spec.tensor_parallel_size, "pipeline": spec.pipeline_parallel_size}}
        if plan.autoscaling is not None:
            auto = plan.autoscaling
            entry["autoscaling"] = {k: v for k, v in (
                ("min", auto.min_replicas), ("max", auto.max_replicas),
                ("target_ongoing_requests", auto.target_ongoing_requests), ("upscale_delay_s", auto.upscale_delay_s),
                ("downscale_delay_s", auto.downscale_delay_s)) if v is not None}
        else:
            entry["replicas"] = plan.replicas
        engine = {k: v for k, v in plan.engine.items() if k not in _EXECUTOR_KEYS or k in spec.engine}
        if engine:
            entry["engine"] = engine
        if spec.ray:
            entry["ray"] = dict(spec.ray)
        models.append(entry)
    doc: dict = {"models": models, "routing": config.routing, "ingress": {"replicas": config.ingress_replicas}}
    if repository is not None:
        doc["model_repository"] = repository.section()
    if config.routes:
        doc["routes"] = {alias: dict(weights) for alias, weights in config.routes.items()}
    if api_key is not None:
        doc["api_key_env"] = api_key[0]
    if config.seed is not None:
        doc["seed"] = config.seed
    parse_deployment_config(doc, "serveConfigV2 args.deployment")
    return doc


def serve_config(config: DeploymentConfig, plans: list[ModelPlan], options: K8sOptions, api_key,
                 repository: RepositoryPods | None = None) -> dict:
    """The ``serveConfigV2`` document (``ServeDeploySchema``)."""
    app = {"name": APP_NAME, "route_prefix": "/", "import_path": APP_BUILDER,
           "args": {"deployment": app_document(config, plans, api_key, repository),
                    "shutdown_timeout": options.shutdown_timeout_s}}
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
            "applications": [app]}


def _container(name: str, image: str, resources: dict, env: list, mounts: list, ports) -> dict:
    return {"name": name, "image": image, "resources": resources, "env": env,
            "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
            "securityContext": pod.container_security(), "volumeMounts": mounts,
            "lifecycle": pod.prestop()}


def _template(labels: dict, container: dict, volumes: list, init: list, options: K8sOptions) -> dict:
    spec = {"securityContext": pod.pod_security(), "enableServiceLinks": False,
            "terminationGracePeriodSeconds": pod.grace_period_s(options.shutdown_timeout_s),
            **pod.pull_secrets(options), "containers": [container], "volumes": volumes}
    if init:
        spec["initContainers"] = init
    return {"metadata": {"labels": dict(labels), "annotations": pod.prometheus_annotations(RAY_METRICS_PORT)},
            "spec": spec}


def worker_group(plan: ModelPlan, options: K8sOptions, env: list, storage: tuple, labels: dict) -> dict:
    """One model's worker group: ``nodes`` pods per replica, each offering Ray one replica's share."""
    cpus, gpus = replica_ray_resources(plan)
    volumes, mounts, init = storage
    volumes, mounts = list(volumes), list(mounts)
    if plan.ranks_per_pod > 1 or plan.gpus_per_pod:
        volumes.append(dict(pod.SHM_VOLUME))
        mounts.append(dict(pod.SHM_MOUNT))
    params = {"num-cpus": str(math.ceil(cpus / plan.nodes)), "num-gpus": str(math.ceil(gpus / plan.nodes))}
    container = _container("ray-worker", options.image_for(plan.device), plan.resources(), env, mounts,
                           [("serve", SERVE_PORT), ("metrics", RAY_METRICS_PORT)])
    group_labels = {**labels, **selector_labels(options.release, "ray-worker", plan.label)}
    return {"groupName": plan.label, "replicas": plan.min_replicas * plan.nodes,
            "minReplicas": plan.min_replicas * plan.nodes, "maxReplicas": plan.max_replicas * plan.nodes,
            "rayStartParams": params, "template": _template(group_labels, container, volumes, init, options)}


def repository_deployments(config: DeploymentConfig, repository: RepositoryPods) -> tuple[str, ...]:
    """The repository models the Serve application deploys (one ``repo-<model>`` deployment each), planned
    as ``flotilla.deploy.ray_repository.plan_repository`` plans them, on the repository's directories here.
    ``K8sError`` for what ``flotilla serve --ray`` refuses, and for a repository this machine cannot read."""
    from flotilla.deploy.ray_repository import check_repository_names, check_repository_on_ray, plan_repository
    spec = repository.spec
    try:
        check_repository_on_ray(spec)
    except ValueError as e:
        raise K8sError(f"--target kuberay: {e}") from None
    missing = [p for p in repository.local_paths if not os.path.isdir(p)]
    if missing:
        raise K8sError(f"--target kuberay sizes the Ray cluster from the repository's models, so the model "
                       f"repository must be readable here: {', '.join(repr(p) for p in missing)} is not a "
                       f"directory (relative paths are looked up next to the deployment file)")
    try:
        plan = plan_repository(dataclasses.replace(spec, paths=repository.local_paths), config.model_names)
    except ValueError as e:
        raise K8sError(f"the model repository: {e}") from None
    try:
        check_repository_names(config.model_names, plan, INGRESS_NAME)
    except ValueError as e:
        raise K8sError(str(e)) from None
    return plan.deployed


def repository_group(repository: RepositoryPods, count: int, options: K8sOptions, env: list, storage: tuple,
                     labels: dict) -> dict:
    """The worker group of the repository's deployments: ``count`` pods, each one replica's CPU for Ray."""
    from flotilla.deploy.ray_repository import REPOSITORY_NUM_CPUS
    volumes, mounts, init = storage
    container = _container("ray-worker", options.image_for("cpu"), repository.resources(), env, list(mounts),
                           [("serve", SERVE_PORT), ("metrics", RAY_METRICS_PORT)])
    group_labels = {**labels, **selector_labels(options.release, "ray-worker", repository.label)}
    return {"groupName": repository.label, "replicas": count, "minReplicas": count, "maxReplicas": count,
            "rayStartParams": {"num-cpus": str(math.ceil(REPOSITORY_NUM_CPUS)), "num-gpus": "0"},
            "template": _template(group_labels, container, list(volumes), init, options)}


def kuberay_objects(config: DeploymentConfig, plans: list[ModelPlan], options: K8sOptions, version: str,
                    repository: RepositoryPods | None = None) -> list[dict]:
    """The RayService (the API key Secret is the user's)."""
    deployed = repository_deployments(config, repository) if repository is not None else ()
    api_key = pod.api_key_setting(config, options)
    env = [*pod.api_key_env(api_key), {"name": PROXY_CALLBACK_SETTING, "value": PROXY_MIDDLEWARES}]
    storage = pod.model_storage(plans, options, repository)
    labels = base_labels(options.release, "ray", version)
    ingress = config.ingress_replicas
    head_amounts = {"cpu": str(1 + ingress), "memory": f"{4 + 2 * ingress}Gi"}
    head = _container("ray-head", options.image_for(plans[0].device if plans else "cpu"),
                      {"requests": head_amounts, "limits": dict(head_amounts)}, env, storage[1], RAY_PORTS)
    head_labels = {**labels, **selector_labels(options.release, "ray-head")}
    cluster = {"rayVersion": options.ray_version,
               "headGroupSpec": {"rayStartParams": {"num-cpus": "0"},
                                 "template": _template(head_labels, head, storage[0], storage[2], options)},
               "workerGroupSpecs": [worker_group(p, options, env, storage, labels) for p in plans]}
    if deployed:
        cluster["workerGroupSpecs"].append(repository_group(repository, len(deployed), options, env, storage, labels))
    if any(p.autoscaling is not None for p in plans):
        cluster["enableInTreeAutoscaling"] = True
        cluster["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 60}
    name = object_name(options.release)
    return [{"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": metadata(name, labels, options),
             "spec": {"serveConfigV2": pod.dump_yaml(serve_config(config, plans, options, api_key, repository)),
                      "rayClusterConfig": cluster}}]
