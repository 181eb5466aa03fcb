"""``--target kserve``: a ``ClusterServingRuntime`` for flotilla and one ``InferenceService`` per model.

- The runtime (serving.kserve.io/v1alpha1, one per device, and one with a ``workerSpec`` for multi-node
  models) runs ``flotilla serve --config /etc/flotilla/deploy.yaml`` on KServe's port 8080: model formats
  ``flotilla`` (auto-selected), ``gguf`` and ``huggingface`` (generative and embedding models) and ``triton``
  (a Triton-layout model repository: flotilla's onnxruntime, torch program and python backends, ensembles),
  named explicitly; protocol ``v2`` (KServe v2 REST on /v2). Not ``grpc-v2``: the runtime exposes one port,
  HTTP (the pod's gRPC server is off). flotilla serves the OpenAI API (/v1) on the same port: the CRD's
  ``protocolVersions`` is a free list of strings and KServe's own values (``v1``, ``v2``, ``grpc-v1``,
  ``grpc-v2``) have none for OpenAI; KServe's LLM runtimes serve it the same way. Probes as
  ``flotilla.k8s.pod`` describes.
- Each InferenceService (serving.kserve.io/v1beta1) names the runtime, the model's ``storageUri``
  (``--model-pvc`` -> ``pvc://``, ``--model-uri`` -> that URI; none for models in the image), its
  resources and pod deployment file (a ConfigMap), and min/max replicas from ``replicas`` / ``autoscaling``
  with ``scaleMetric: concurrency`` and ``scaleTarget`` = ``target_ongoing_requests`` (Knative's KPA scales on
  requests in flight per pod, the metric Ray Serve's ``target_ongoing_requests`` means).
- A route (alias) is served by one InferenceService named after it, in Knative mode: KServe splits its
  traffic between its previous revision (the route's heavier target) and its newest one (the lighter target)
  with ``canaryTrafficPercent``. Roll it out in two steps: ``--kserve-rollout stable`` first (the heavier
  target at 100%), then the default ``canary``. Its pods also serve the alias name. A route has at most two
  targets here, and a model is the target of at most one route (a model in a route has no InferenceService
  of its own).
- The file's ``model_repository``: one InferenceService ``<release>-repository`` (format ``triton``, the CPU
  runtime, one replica: its model control state lives in its pod) whose ``storageUri`` is the repository's
  directory (KServe mounts one storage URI: one directory, unless the repository is in the image), its own
  deployment file (the repository alone) and KServe v2 readiness probes (``/v2/health/ready``).
- A model whose ranks need more GPUs than one pod has gets ``workerSpec`` (tensor and pipeline parallel
  sizes: KServe starts ceil(world / GPUs per pod) pods, which join the head's Ray cluster), in KServe's
  ``Standard`` mode with ``autoscalerClass: none`` and a ``pvc://`` storageUri, as KServe requires.
"""

from __future__ import annotations

import math

from flotilla.deploy.spec import DeploymentConfig
from flotilla.k8s import pod
from flotilla.k8s.names import MODEL_ANNOTATION, base_labels, dns_label, object_name
from flotilla.k8s.options import GPU_RESOURCE, K8sError, K8sOptions
from flotilla.k8s.plain import metadata
from flotilla.k8s.plan import ModelPlan, RepositoryPods

RUNTIME_PORT = 8080          # KServe's default container port
MODEL_FORMAT = "flotilla"
REPOSITORY_FORMAT = "triton"   # a Triton-layout model repository
PROTOCOL_VERSIONS = ["v2"]     # KServe v2 REST (see the module docstring)
KNATIVE, STANDARD = "Knative", "Standard"
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
AUTOSCALER_CLASS = "serving.kserve.io/autoscalerClass"
KNATIVE_DEFAULT_TIMEOUT_S = 300
RAY_GCS_PORT = 6379


def runtime_name(options: K8sOptions, plan: ModelPlan | RepositoryPods) -> str:
    kind = "gpu" if plan.device == GPU_RESOURCE else "cpu"
    return object_name(options.release, kind, *(["multinode"] if plan.multi_node else []))


def kserve_objects(config: DeploymentConfig, plans: list[ModelPlan], options: K8sOptions, version: str,
                   repository: RepositoryPods | None = None) -> list[dict]:
    """The runtimes, then a ConfigMap and an InferenceService per model or route (and the repository)."""
    api_key = pod.api_key_setting(config, options)
    by_name = {p.name: p for p in plans}
    routed = _routed_models(config, by_name)
    runtimes: dict[str, list] = {}
    for plan in [*plans, *([repository] if repository is not None else [])]:
        runtimes.setdefault(runtime_name(options, plan), []).append(plan)
    objects = [serving_runtime(name, members, options, version) for name, members in runtimes.items()]
    for plan in plans:
        if plan.name not in routed:
            objects += model_service(plan, plan.label, config, options, api_key, version)
    for alias, (stable, canary, percent) in _routes(config, by_name).items():
        objects += route_service(alias, stable, canary, percent, config, options, api_key, version)
    if repository is not None:
        objects += repository_service(repository, config, options, api_key, version)
    return objects


# ---- the runtime ------------------------------------------------------------------------------------------

def serving_runtime(name: str, plans: list, options: K8sOptions, version: str) -> dict:
    """The runtime of ``plans`` (``ModelPlan``s, or the ``RepositoryPods``, of one device)."""
    first = plans[0]
    container = {"name": "kserve-container", "image": options.image_for(first.device),
                 "command": list(pod.SERVER_COMMAND), "args": pod.server_args(RUNTIME_PORT, options, grpc_port=0),
                 "ports": [{"containerPort": RUNTIME_PORT, "name": "http1", "protocol": "TCP"}],
                 "resources": first.resources(),
                 **pod.probes(RUNTIME_PORT, max(p.startup_timeout_s for p in plans)),
                 "securityContext": pod.container_security()}
    spec = {"annotations": {"prometheus.kserve.io/port": str(RUNTIME_PORT),
                            "prometheus.kserve.io/path": pod.METRICS_PATH},
            "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": True, "priority": 1},
                                      {"name": "gguf", "version": "1", "autoSelect": False},
                                      {"name": "huggingface", "version": "1", "autoSelect": False},
                                      {"name": REPOSITORY_FORMAT, "version": "2", "autoSelect": False}],
            "protocolVersions": list(PROTOCOL_VERSIONS), "containers": [container], **pod.pull_secrets(options)}
    if first.multi_node:
        _multinode_runtime(spec, container, first, options)
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ClusterServingRuntime",
            "metadata": {"name": name, "labels": base_labels(options.release, "runtime", version)}, "spec": spec}


def _multinode_runtime(spec: dict, container: dict, plan: ModelPlan, options: K8sOptions) -> None:
    """The head container starts a Ray head, waits for KServe's ``RAY_NODE_COUNT`` nodes, then serves; the
    worker container joins the head Service KServe names in ``HEAD_SVC``."""
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    ray = '--num-gpus="${REQUEST_GPU_COUNT}" --node-ip-address="${POD_IP}" --disable-usage-stats'
    serve = " ".join(["exec", *pod.SERVER_COMMAND, *container.pop("args")])
    container["command"] = ["/bin/sh", "-c", "set -e\n"
                            f"ray start --head --port={RAY_GCS_PORT} --include-dashboard=false {ray}\n"
                            'python -m flotilla.k8s.ray_group --nodes "${RAY_NODE_COUNT}" '
                            f"--timeout {plan.startup_timeout_s}\n{serve}\n"]
    container["env"] = list(env)
    address = f"${{HEAD_SVC}}.${{POD_NAMESPACE}}.svc.cluster.local:{RAY_GCS_PORT}"
    worker = {"name": "worker-container", "image": options.image_for(plan.device),
              "command": ["/bin/sh", "-c", "set -e\n"
                          f'until ray health-check --address "{address}" >/dev/null 2>&1; do sleep 5; done\n'
                          f'exec ray start --address="{address}" --block {ray}\n'],
              "env": list(env), "resources": plan.resources(), "securityContext": pod.container_security()}
    spec["workerSpec"] = {"tensorParallelSize": 1, "pipelineParallelSize": 1, "containers": [worker]}


# ---- InferenceServices ------------------------------------------------------------------------------------

def _isvc_name(options: K8sOptions, label: str) -> str:
    return dns_label(f"{options.release}-{label}", 45)


def _predictor(plan: ModelPlan, config_map_name: str, options: K8sOptions, api_key) -> dict:
    volume, mount = pod.config_volume(config_map_name)
    volumes, mounts = [volume], [mount]
    if plan.ranks_per_pod > 1 or plan.gpus_per_pod:
        volumes.append(dict(pod.SHM_VOLUME))
        mounts.append(dict(pod.SHM_MOUNT))
    model = {"modelFormat": {"name": MODEL_FORMAT}, "runtime": runtime_name(options, plan), "protocolVersion": "v2",
             "resources": plan.resources(), "env": pod.api_key_env(api_key), "volumeMounts": mounts,
             "startupProbe": pod.probes(RUNTIME_PORT, plan.startup_timeout_s)["startupProbe"]}
    storage = plan.source.storage_uri(options)
    if storage is not None:
        model["storageUri"] = storage
    predictor = {"minReplicas": plan.min_replicas, "maxReplicas": plan.max_replicas, "model": model,
                 "volumes": volumes}
    if plan.multi_node:
        if options.model_pvc is None:
            raise K8sError(f"model {plan.name!r}: KServe serves a multi-node model only from a pvc:// storageUri; "
                           "give --model-pvc")
        if plan.autoscaling is not None:
            raise K8sError(f"model {plan.name!r}: KServe does not autoscale a multi-node model "
                           "(autoscalerClass none); use replicas, or --target kuberay")
        predictor["workerSpec"] = {"tensorParallelSize": plan.spec.tensor_parallel_size,
                                   "pipelineParallelSize": plan.spec.pipeline_parallel_size,
                                   "containers": [{"name": "worker-container", "resources": plan.resources()}]}
        predictor["terminationGracePeriodSeconds"] = pod.grace_period_s(options.shutdown_timeout_s)
    else:
        if plan.autoscaling is not None:
            predictor["scaleMetric"] = "concurrency"
            predictor["scaleTarget"] = max(1, math.ceil(plan.autoscaling.target_ongoing_requests))
        # Knative gives a terminating pod its revision timeout as grace period: keep it above the drain.
        predictor["timeout"] = max(KNATIVE_DEFAULT_TIMEOUT_S, pod.grace_period_s(options.shutdown_timeout_s))
    return predictor


def _annotations(plan: ModelPlan, notes: dict) -> dict:
    mode = {DEPLOYMENT_MODE: STANDARD, AUTOSCALER_CLASS: "none"} if plan.multi_node else {DEPLOYMENT_MODE: KNATIVE}
    return {**mode, "serving.kserve.io/enable-prometheus-scraping": "true", **notes}


def model_service(plan: ModelPlan, label: str, config: DeploymentConfig, options: K8sOptions, api_key,
                  version: str, aliases: tuple[str, ...] = ()) -> list[dict]:
    """The ConfigMap and InferenceService of one model (not in a route)."""
    name = _isvc_name(options, label)
    labels = base_labels(options.release, "model", version)
    notes = {MODEL_ANNOTATION: plan.name}
    document = pod.pod_document(plan, config, api_key, kserve=True, aliases=aliases)
    cm = pod.config_map(name, metadata(name, labels, options, notes), {pod.CONFIG_FILE: pod.dump_yaml(document)})
    isvc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": metadata(name, labels, options, _annotations(plan, notes)),
            "spec": {"predictor": _predictor(plan, name, options, api_key)}}
    return [cm, isvc]


def route_service(alias: str, stable: ModelPlan, canary: ModelPlan | None, percent: int, config: DeploymentConfig,
                  options: K8sOptions, api_key, version: str) -> list[dict]:
    """A route's InferenceService: ``stable`` alone (``--kserve-rollout stable``, or a one-target route), or
    ``canary`` as the newest revision with ``canaryTrafficPercent: percent``. Each target has its own
    ConfigMap, so a stable pod that restarts during the canary still reads its own file."""
    alias_label = dns_label(alias, 40)
    name = _isvc_name(options, alias_label)
    labels = base_labels(options.release, "route", version)
    objects, maps = [], {}
    for plan in (stable, canary):
        if plan is None:
            continue
        if plan.multi_node:
            raise K8sError(f"route {alias!r}: model {plan.name!r} is multi-node, which KServe cannot canary "
                           "(Knative revisions); serve it without a route, or use --target plain or kuberay")
        maps[plan.name] = cm_name = _isvc_name(options, f"{alias_label}-{plan.label}")
        document = pod.pod_document(plan, config, api_key, kserve=True, aliases=(alias,))
        objects.append(pod.config_map(cm_name, metadata(cm_name, labels, options, {MODEL_ANNOTATION: plan.name}),
                                      {pod.CONFIG_FILE: pod.dump_yaml(document)}))
    current = canary if canary is not None and options.kserve_rollout == "canary" else stable
    predictor = _predictor(current, maps[current.name], options, api_key)
    if current is canary:
        predictor["canaryTrafficPercent"] = percent
    notes = {MODEL_ANNOTATION: current.name, "flotilla/route": alias, "flotilla/stable-model": stable.name,
             **({"flotilla/canary-model": canary.name} if canary is not None else {})}
    annotations = {**_annotations(current, notes), "serving.kserve.io/enable-tag-routing": "true"}
    objects.append({"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                    "metadata": metadata(name, labels, options, annotations), "spec": {"predictor": predictor}})
    return objects


def repository_service(repository: RepositoryPods, config: DeploymentConfig, options: K8sOptions, api_key,
                       version: str) -> list[dict]:
    """The ConfigMap and InferenceService of the model repository."""
    sources = repository.sources
    if len(sources) > 1 and any(s.relpath is not None for s in sources):
        raise K8sError("--target kserve: an InferenceService mounts one storage URI, so a model repository from "
                       "--model-pvc / --model-uri must be one directory (or put the repositories in the image)")
    name = _isvc_name(options, repository.label)
    labels = base_labels(options.release, "repository", version)
    document = pod.repository_document(repository, config, api_key, kserve=True)
    cm = pod.config_map(name, metadata(name, labels, options), {pod.CONFIG_FILE: pod.dump_yaml(document)})
    volume, mount = pod.config_volume(name)
    probes = pod.probes(RUNTIME_PORT, repository.startup_timeout_s, ready_path=pod.READY_PATH)
    model = {"modelFormat": {"name": REPOSITORY_FORMAT}, "runtime": runtime_name(options, repository),
             "protocolVersion": "v2", "resources": repository.resources(), "env": pod.api_key_env(api_key),
             "volumeMounts": [mount], "startupProbe": probes["startupProbe"],
             "readinessProbe": probes["readinessProbe"]}
    storage = sources[0].storage_uri(options)
    if storage is not None:
        model["storageUri"] = storage
    predictor = {"minReplicas": 1, "maxReplicas": 1, "model": model, "volumes": [volume],
                 "timeout": max(KNATIVE_DEFAULT_TIMEOUT_S, pod.grace_period_s(options.shutdown_timeout_s))}
    annotations = {DEPLOYMENT_MODE: KNATIVE, "serving.kserve.io/enable-prometheus-scraping": "true"}
    isvc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": metadata(name, labels, options, annotations), "spec": {"predictor": predictor}}
    return [cm, isvc]


def _routed_models(config: DeploymentConfig, by_name: dict) -> set[str]:
    seen: dict[str, str] = {}
    for alias, weights in config.routes.items():
        for target in weights:
            if target in seen:
                raise K8sError(f"model {target!r} is a target of routes {seen[target]!r} and {alias!r}; on KServe a "
                               "model is the target of at most one route (its InferenceService is the route's)")
            seen[target] = alias
    return set(seen)


def _routes(config: DeploymentConfig, by_name: dict) -> dict[str, tuple[ModelPlan, ModelPlan | None, int]]:
    """alias -> (stable plan, canary plan or None, canary percent): the heavier target is stable (on a tie,
    the one first in the file)."""
    order = {name: i for i, name in enumerate(by_name)}
    out = {}
    for alias, weights in config.routes.items():
        if len(weights) > 2:
            raise K8sError(f"route {alias!r} has {len(weights)} targets; a KServe InferenceService splits traffic "
                           "between two revisions (stable and canary): use --target plain or kuberay")
        ranked = sorted(weights, key=lambda t: (-weights[t], order[t]))
        stable = by_name[ranked[0]]
        canary = by_name[ranked[1]] if len(ranked) > 1 else None
        percent = round(100 * weights[ranked[1]] / sum(weights.values())) if canary is not None else 0
        out[alias] = (stable, canary, percent)
    return out
