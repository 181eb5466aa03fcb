"""``--target plain``: plain Kubernetes objects, no operator needed.

Per model (``<release>-<model>``): a ConfigMap with the pod's deployment file, a Deployment of ``replicas``
pods (each runs ``flotilla serve --config`` for this model alone), a Service, a PodDisruptionBudget
(``maxUnavailable: 1``), and with ``autoscaling`` a HorizontalPodAutoscaler (autoscaling/v2) on CPU
utilization and on the external metric ``flotilla_num_requests_waiting`` (queued requests per pod, served
by the Prometheus adapter; README "Kubernetes" has its rule). A model whose ranks need more GPUs than one pod
has is a multi-pod group per replica: a leader Deployment (Ray head + ``flotilla serve``, in the model's
Service) and a worker Deployment (``ray start --address`` the leader's headless Service), the ranks placed
by flotilla's Ray executor; a NetworkPolicy keeps the group's Ray ports to its own pods. Groups have fixed
replicas (autoscaling one needs a group-aware controller: use ``--target kuberay``).

The file's ``model_repository`` (``<release>-repository``): a ConfigMap with a deployment file of the
repository alone, a Deployment of one pod (``flotilla serve --config``: its model control state, explicit
loads and polls, lives in that pod), a Service and a PodDisruptionBudget; its probes are KServe v2's
(``/v2/health/ready``: strict readiness while it loads, 400 while it drains). A repository pod is a CPU pod.

In front of them: the router (``flotilla.entrypoints.router``, ``ingress.replicas`` pods) behind the
Service ``<release>``, the one endpoint for every model and alias (the file's ``routes`` are its config),
and for the repository's models (KServe v2 requests for a model it does not know, and ``/v2/repository``).
"""

from __future__ import annotations

import hashlib
import re

from flotilla.deploy.spec import DeploymentConfig
from flotilla.k8s import pod
from flotilla.k8s.names import (GROUP_LABEL, MODEL_ANNOTATION, ROLE_LABEL, base_labels, object_name,
                                selector_labels)
from flotilla.k8s.options import K8sError, K8sOptions
from flotilla.k8s.plan import ModelPlan, RepositoryPods

EXTERNAL_METRIC = "flotilla_num_requests_waiting"   # the Prometheus adapter's name for flotilla:num_requests_waiting
ROUTER_MODULE = "flotilla.entrypoints.router"
ROUTER_FILE = "router.yaml"
RAY_GCS_PORT = 6379
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def plain_objects(config: DeploymentConfig, plans: list[ModelPlan], options: K8sOptions, version: str,
                  repository: RepositoryPods | None = None) -> list[dict]:
    """Every object of the plain target, models (and the repository) first, then the router."""
    api_key = pod.api_key_setting(config, options)
    objects: list[dict] = []
    for plan in plans:
        objects += model_objects(plan, config, options, api_key, version)
    if repository is not None:
        objects += repository_objects(repository, config, options, api_key, version)
    return objects + router_objects(config, plans, options, api_key, version, repository)


def metadata(name: str, labels: dict, options: K8sOptions, annotations: dict | None = None) -> dict:
    meta = {"name": name}
    if options.namespace is not None:
        meta["namespace"] = options.namespace
    meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def model_objects(plan: ModelPlan, config: DeploymentConfig, options: K8sOptions,
                  api_key: tuple[str, str] | None, version: str) -> list[dict]:
    name = object_name(options.release, plan.label)
    labels = {**base_labels(options.release, "model", version), **selector_labels(
        options.release, "model", plan.label)}
    notes = {MODEL_ANNOTATION: plan.name}
    document = pod.dump_yaml(pod.pod_document(plan, config, api_key))
    objects = [pod.config_map(name, metadata(name, labels, options, notes), {pod.CONFIG_FILE: document})]
    if plan.multi_node:
        if plan.autoscaling is not None:
            raise K8sError(f"model {plan.name!r}: a multi-pod group ({plan.nodes} pods per replica) has fixed "
                           f"replicas on plain Kubernetes; use replicas, or --target kuberay to autoscale it")
        for group in range(plan.replicas):
            objects += group_objects(plan, group, name, labels, notes, document, options, api_key)
        objects.append(network_policy(plan, name, labels, options))
        selector = selector_labels(options.release, "model", plan.label, role="leader")
    else:
        objects.append(deployment(name, labels, notes, plan.replicas, plan, _server_pod(
            plan, name, document, options, api_key), options))
        selector = selector_labels(options.release, "model", plan.label)
        if plan.autoscaling is not None:
            objects.append(hpa(plan, name, labels, notes, options))
    objects.append(service(name, labels, selector, options, grpc=True))
    objects.append(pdb(name, labels, selector_labels(options.release, "model", plan.label), options))
    return objects


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _server_container(plan: ModelPlan, options: K8sOptions, api_key, mounts: list[dict]) -> dict:
    return {"name": "flotilla", "image": options.image_for(plan.device), "command": list(pod.SERVER_COMMAND),
            "args": pod.server_args(options.port, options),
            "ports": [{"name": "http", "containerPort": options.port, "protocol": "TCP"},
                      {"name": "grpc", "containerPort": pod.GRPC_PORT, "protocol": "TCP"}],
            "env": pod.api_key_env(api_key), "resources": plan.resources(),
            **pod.probes("http", plan.startup_timeout_s), "lifecycle": pod.prestop(),
            "securityContext": pod.container_security(), "volumeMounts": mounts}


def _volumes(plan: ModelPlan, config_name: str, options: K8sOptions) -> tuple[list, list, list]:
    volume, mount = pod.config_volume(config_name)
    storage_volumes, storage_mounts, init = pod.model_storage([plan], options)
    volumes, mounts = [volume, *storage_volumes], [mount, *storage_mounts]
    if plan.ranks_per_pod > 1 or plan.gpus_per_pod:
        volumes.append(dict(pod.SHM_VOLUME))
        mounts.append(dict(pod.SHM_MOUNT))
    return volumes, mounts, init


def _server_pod(plan: ModelPlan, config_name: str, document: str, options: K8sOptions, api_key) -> dict:
    """The pod template's spec and annotations of a single-pod replica."""
    volumes, mounts, init = _volumes(plan, config_name, options)
    spec = {"securityContext": pod.pod_security(), "enableServiceLinks": False,
            "terminationGracePeriodSeconds": pod.grace_period_s(options.shutdown_timeout_s),
            **pod.pull_secrets(options), "containers": [_server_container(plan, options, api_key, mounts)],
            "volumes": volumes}
    if init:
        spec["initContainers"] = init
    return {"spec": spec, "annotations": {**pod.prometheus_annotations(options.port),
                                          "flotilla/config-sha256": _checksum(document)}}


def deployment(name: str, labels: dict, notes: dict, replicas: int, plan: ModelPlan | None, template: dict,
               options: K8sOptions, selector: dict | None = None) -> dict:
    """A Deployment of ``template`` ({"spec", "annotations"}), its pods spread over nodes where possible. GPU
    pods roll one at a time without a surge pod (no spare GPUs assumed); CPU pods surge one, never dropping
    below ``replicas``."""
    selector = selector or {k: v for k, v in labels.items() if k in _SELECTOR_KEYS}
    gpu = plan is not None and plan.gpus_per_pod > 0
    rolling = {"maxSurge": 0, "maxUnavailable": 1} if gpu else {"maxSurge": 1, "maxUnavailable": 0}
    spread = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
               "labelSelector": {"matchLabels": dict(selector)}}]
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(name, labels, options, notes),
            "spec": {"replicas": replicas, "selector": {"matchLabels": dict(selector)},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling},
                     "template": {"metadata": {"labels": dict(labels),
                                               "annotations": {**notes, **template["annotations"]}},
                                  "spec": {**template["spec"], "topologySpreadConstraints": spread}}}}


_SELECTOR_KEYS = set(selector_labels("r", "c", "m", role="x")) | {GROUP_LABEL}


def service(name: str, labels: dict, selector: dict, options: K8sOptions, grpc: bool = False) -> dict:
    ports = [{"name": "http", "port": options.port, "targetPort": "http", "protocol": "TCP"}]
    if grpc:
        ports.append({"name": "grpc", "port": pod.GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                      "appProtocol": "grpc"})
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(name, labels, options),
            "spec": {"type": "ClusterIP", "selector": dict(selector), "ports": ports}}


def pdb(name: str, labels: dict, selector: dict, options: K8sOptions) -> dict:
    """At most one pod of the selection evicted at a time (a broken pod never blocks a node drain)."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": metadata(name, labels, options),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(selector)},
                     "unhealthyPodEvictionPolicy": "AlwaysAllow"}}


def quantity(value: float) -> str:
    """A non-negative number as a Kubernetes quantity ("8", "2500m")."""
    millis = round(value * 1000)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def hpa(plan: ModelPlan, name: str, labels: dict, notes: dict, options: K8sOptions) -> dict:
    """Scale between the file's ``autoscaling`` bounds on CPU and on queued requests per pod (above
    ``target_ongoing_requests`` waiting per pod, the HPA adds pods); the file's delays become the
    stabilization windows."""
    auto = plan.autoscaling
    if not _LABEL_VALUE.match(plan.name) or len(plan.name) > 63:
        raise K8sError(f"model {plan.name!r}: the HPA selects its metric by the label model_name, and this name "
                       f"is not a valid label value; rename the model to autoscale it on plain Kubernetes")
    waiting = {"type": "External", "external": {
        "metric": {"name": EXTERNAL_METRIC, "selector": {"matchLabels": {"model_name": plan.name}}},
        "target": {"type": "AverageValue", "averageValue": quantity(auto.target_ongoing_requests)}}}
    cpu = {"type": "Resource", "resource": {"name": "cpu", "target": {
        "type": "Utilization", "averageUtilization": options.hpa_cpu_utilization}}}
    spec = {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": auto.min_replicas, "maxReplicas": auto.max_replicas, "metrics": [cpu, waiting]}
    behavior = {}
    if auto.upscale_delay_s is not None:
        behavior["scaleUp"] = {"stabilizationWindowSeconds": round(auto.upscale_delay_s)}
    if auto.downscale_delay_s is not None:
        behavior["scaleDown"] = {"stabilizationWindowSeconds": round(auto.downscale_delay_s)}
    if behavior:
        spec["behavior"] = behavior
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": metadata(name, labels, options, notes), "spec": spec}


def repository_objects(repository: RepositoryPods, config: DeploymentConfig, options: K8sOptions,
                       api_key: tuple[str, str] | None, version: str) -> list[dict]:
    """The repository's ConfigMap, Deployment (one pod), Service and PodDisruptionBudget."""
    name = object_name(options.release, repository.label)
    labels = {**base_labels(options.release, "repository", version), **selector_labels(options.release, "repository")}
    document = pod.dump_yaml(pod.repository_document(repository, config, api_key))
    volume, mount = pod.config_volume(name)
    storage_volumes, storage_mounts, init = pod.model_storage([], options, repository)
    container = {"name": "flotilla", "image": options.image_for("cpu"), "command": list(pod.SERVER_COMMAND),
                 "args": pod.server_args(options.port, options),
                 "ports": [{"name": "http", "containerPort": options.port, "protocol": "TCP"},
                           {"name": "grpc", "containerPort": pod.GRPC_PORT, "protocol": "TCP"}],
                 "env": pod.api_key_env(api_key), "resources": repository.resources(),
                 **pod.probes("http", repository.startup_timeout_s, ready_path=pod.READY_PATH),
                 "lifecycle": pod.prestop(), "securityContext": pod.container_security(),
                 "volumeMounts": [mount, *storage_mounts]}
    spec = {"securityContext": pod.pod_security(), "enableServiceLinks": False,
            "terminationGracePeriodSeconds": pod.grace_period_s(options.shutdown_timeout_s),
            **pod.pull_secrets(options), "containers": [container], "volumes": [volume, *storage_volumes]}
    if init:
        spec["initContainers"] = init
    template = {"spec": spec, "annotations": {**pod.prometheus_annotations(options.port),
                                              "flotilla/config-sha256": _checksum(document)}}
    selector = selector_labels(options.release, "repository")
    return [pod.config_map(name, metadata(name, labels, options), {pod.CONFIG_FILE: document}),
            deployment(name, labels, {}, 1, None, template, options, selector),
            service(name, labels, selector, options, grpc=True),
            pdb(name, labels, selector, options)]


# ---- multi-pod groups -----------------------------------------------------------------------------------

def _ray_start(plan: ModelPlan) -> str:
    cpus = max(1, plan.cpu_millis_per_pod // 1000)
    return (f"--num-cpus={cpus} --num-gpus={plan.gpus_per_pod} --node-ip-address=\"$POD_IP\" "
            f"--disable-usage-stats")


def group_objects(plan: ModelPlan, group: int, name: str, labels: dict, notes: dict, document: str,
                  options: K8sOptions, api_key) -> list[dict]:
    """Replica ``group`` of a multi-pod model: leader + workers + the leader's headless Service."""
    group_name = object_name(options.release, plan.label, f"g{group}")
    head = object_name(options.release, plan.label, f"g{group}", "head")
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    leader_labels = {**labels, ROLE_LABEL: "leader", GROUP_LABEL: str(group)}
    template = _server_pod(plan, name, document, options, api_key)
    server = template["spec"]["containers"][0]
    serve = " ".join(["exec", *pod.SERVER_COMMAND, *server.pop("args")])
    server["command"] = ["/bin/sh", "-c", "set -e\n"
                         f"ray start --head --port={RAY_GCS_PORT} --include-dashboard=false {_ray_start(plan)}\n"
                         f"python -m flotilla.k8s.ray_group --nodes {plan.nodes} --timeout {plan.startup_timeout_s}\n"
                         f"{serve}\n"]
    server["env"] = [pod_ip, *server["env"]]
    server["ports"].append({"name": "ray-gcs", "containerPort": RAY_GCS_PORT, "protocol": "TCP"})
    leader = deployment(f"{group_name}-leader", leader_labels, notes, 1, plan, template, options)
    worker_labels = {**labels, ROLE_LABEL: "worker", GROUP_LABEL: str(group)}
    worker_pod = _worker_pod(plan, name, head, pod_ip, options)
    workers = deployment(f"{group_name}-workers", worker_labels, notes, plan.nodes - 1, plan, worker_pod, options)
    head_service = {"apiVersion": "v1", "kind": "Service", "metadata": metadata(head, leader_labels, options),
                    "spec": {"clusterIP": "None", "selector": {k: v for k, v in leader_labels.items()
                                                               if k in _SELECTOR_KEYS},
                             "ports": [{"name": "ray-gcs", "port": RAY_GCS_PORT, "targetPort": "ray-gcs"}]}}
    return [leader, workers, head_service]


def _worker_pod(plan: ModelPlan, config_name: str, head: str, pod_ip: dict, options: K8sOptions) -> dict:
    volumes, mounts, init = _volumes(plan, config_name, options)
    address = f"{head}:{RAY_GCS_PORT}"
    script = ("set -e\n"
              f"until ray health-check --address {address} >/dev/null 2>&1; do echo waiting for {address}; "
              f"sleep 5; done\n"
              f"exec ray start --address={address} --block {_ray_start(plan)}\n")
    container = {"name": "ray-worker", "image": options.image_for(plan.device), "command": ["/bin/sh", "-c", script],
                 "env": [pod_ip], "resources": plan.resources(), "securityContext": pod.container_security(),
                 "volumeMounts": mounts}
    spec = {"securityContext": pod.pod_security(), "enableServiceLinks": False, **pod.pull_secrets(options),
            "containers": [container], "volumes": volumes}
    if init:
        spec["initContainers"] = init
    return {"spec": spec, "annotations": {}}


def network_policy(plan: ModelPlan, name: str, labels: dict, options: K8sOptions) -> dict:
    """The pods of a multi-pod model accept anything from each other (Ray), and only HTTP and gRPC from
    elsewhere."""
    pods = {"matchLabels": selector_labels(options.release, "model", plan.label)}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata(name, labels, options),
            "spec": {"podSelector": pods, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": pods}]},
                                 {"ports": [{"port": options.port, "protocol": "TCP"},
                                            {"port": pod.GRPC_PORT, "protocol": "TCP"}]}]}}


# ---- the router --------------------------------------------------------------------------------------------

def router_document(config: DeploymentConfig, plans: list[ModelPlan], options: K8sOptions,
                    api_key: tuple[str, str] | None, repository: RepositoryPods | None = None) -> dict:
    """The router's config: each model's Service URL (and the repository's), the file's routes and seed, the
    API key variable."""
    suffix = f".{options.namespace}.svc" if options.namespace else ""

    def url(label: str) -> str:
        return f"http://{object_name(options.release, label)}{suffix}:{options.port}"

    doc: dict = {"backends": {p.name: url(p.label) for p in plans}}
    if repository is not None:
        doc["repository"] = url(repository.label)
    if config.routes:
        doc["routes"] = {alias: dict(weights) for alias, weights in config.routes.items()}
    if config.seed is not None:
        doc["seed"] = config.seed
    if api_key is not None:
        doc["api_key_env"] = api_key[0]
    return doc


def router_objects(config: DeploymentConfig, plans: list[ModelPlan], options: K8sOptions, api_key,
                   version: str, repository: RepositoryPods | None = None) -> list[dict]:
    name = object_name(options.release, "router")
    labels = {**base_labels(options.release, "router", version), **selector_labels(options.release, "router")}
    text = pod.dump_yaml(router_document(config, plans, options, api_key, repository))
    volume, mount = pod.config_volume(name)
    amounts = {"cpu": "1", "memory": "1Gi"}
    container = {"name": "router", "image": options.image_for("cpu"), "command": ["python", "-m", ROUTER_MODULE],
                 "args": ["--config", f"{pod.CONFIG_DIR}/{ROUTER_FILE}", "--host", "0.0.0.0",
                          "--port", str(options.port), "--shutdown-timeout", f"{options.shutdown_timeout_s:g}"],
                 "ports": [{"name": "http", "containerPort": options.port, "protocol": "TCP"}],
                 "env": pod.api_key_env(api_key), "resources": {"requests": amounts, "limits": dict(amounts)},
                 **pod.probes("http", 60), "lifecycle": pod.prestop(),
                 "securityContext": pod.container_security(), "volumeMounts": [mount]}
    template = {"spec": {"securityContext": pod.pod_security(), "enableServiceLinks": False,
                         "terminationGracePeriodSeconds": pod.grace_period_s(options.shutdown_timeout_s),
                         **pod.pull_secrets(options), "containers": [container], "volumes": [volume]},
                "annotations": {**pod.prometheus_annotations(options.port), "flotilla/config-sha256": _checksum(text)}}
    selector = selector_labels(options.release, "router")
    return [pod.config_map(name, metadata(name, labels, options), {ROUTER_FILE: text}),
            deployment(name, labels, {}, config.ingress_replicas, None, template, options, selector),
            service(options.release, labels, selector, options),
            pdb(name, labels, selector, options)]
