"""The parts every target shares: the flotilla server container (command, probes, resources, security),
the deployment file a pod serves (one model, as a ConfigMap), the API key from a Secret, model storage
(a PVC, or KServe's storage initializer as an init container) and the Prometheus annotations.

The probes follow what ``flotilla serve`` does (``flotilla.entrypoints.openai.server``):
- the listening socket is bound before the models load, but nothing answers until they are loaded, so the
  **startup** probe (``/health``) gets the model's whole loading budget (``ModelPlan.startup_timeout_s``);
- **readiness** is ``/health``: 200 while every engine is alive and the server admits requests, 503 while it
  drains after SIGTERM (and when an engine died), so a draining pod leaves the Service at once;
- **liveness** is ``/v2/health/live``: 200 while the HTTP loop runs, draining included (a drain is never
  cut short by a liveness restart); an engine that dies makes the server exit (code 1), so the kubelet
  restarts the container without a probe;
- ``terminationGracePeriodSeconds`` = the preStop pause (``PRESTOP_SLEEP_S``, so endpoints are updated before
  SIGTERM) + ``--shutdown-timeout`` (the drain) + ``EXIT_MARGIN_S`` (uvicorn's 2 s and the engines' shutdown).
"""

from __future__ import annotations

import math

import yaml

from flotilla.deploy.config import parse_deployment_config
from flotilla.deploy.spec import DeploymentConfig
from flotilla.k8s.names import object_name
from flotilla.k8s.options import API_KEY_SECRET_KEY, DEFAULT_API_KEY_ENV, K8sOptions
from flotilla.k8s.plan import MODELS_MOUNT, ModelPlan, RepositoryPods

CONFIG_DIR = "/etc/flotilla"
CONFIG_FILE = "deploy.yaml"
HEALTH_PATH = "/health"
LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"     # KServe v2 readiness: a repository server's (strict readiness, drain)
METRICS_PATH = "/metrics"
SERVER_COMMAND = ["flotilla"]
GRPC_PORT = 8001
PRESTOP_SLEEP_S = 5
EXIT_MARGIN_S = 15
STARTUP_PERIOD_S = 10
RUN_AS = 1000            # the image's non-root user (Dockerfile: uid/gid 1000)
SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}


def grace_period_s(shutdown_timeout_s: float) -> int:
    """``terminationGracePeriodSeconds`` for a server draining up to ``shutdown_timeout_s``."""
    return PRESTOP_SLEEP_S + math.ceil(shutdown_timeout_s) + EXIT_MARGIN_S


def server_args(port: int, options: K8sOptions, grpc_port: int = GRPC_PORT) -> list[str]:
    """``flotilla serve`` arguments of a pod serving the deployment file at ``CONFIG_DIR/CONFIG_FILE``."""
    return ["serve", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--host", "0.0.0.0", "--port", str(port),
            "--grpc-port", str(grpc_port), "--shutdown-timeout", f"{options.shutdown_timeout_s:g}"]


def http_get(path: str, port) -> dict:
    return {"httpGet": {"path": path, "port": port}}


def probes(port, startup_timeout_s: int, ready_path: str = HEALTH_PATH) -> dict:
    """Startup, readiness and liveness probes of a flotilla server on ``port`` (a number or a port name);
    startup and readiness on ``ready_path``."""
    return {
        "startupProbe": {**http_get(ready_path, port), "periodSeconds": STARTUP_PERIOD_S, "timeoutSeconds": 5,
                         "failureThreshold": max(1, math.ceil(startup_timeout_s / STARTUP_PERIOD_S))},
        "readinessProbe": {**http_get(ready_path, port), "periodSeconds": 5, "timeoutSeconds": 5,
                           "failureThreshold": 2, "successThreshold": 1},
        "livenessProbe": {**http_get(LIVE_PATH, port), "periodSeconds": 10, "timeoutSeconds": 5,
                          "failureThreshold": 6},
    }


def prestop() -> dict:
    return {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}}


def container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}}


def pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def prometheus_annotations(port: int, path: str = METRICS_PATH) -> dict[str, str]:
    """The prometheus.io annotations Prometheus' Kubernetes pod discovery (and most charts) scrape by."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": path}


# ---- the API key -------------------------------------------------------------------------------------------

def api_key_setting(config: DeploymentConfig, options: K8sOptions) -> tuple[str, str] | None:
    """``(environment variable, Secret name)`` of the API key, or None (no key). The server reads the key from
    the variable its deployment file names in ``api_key_env`` (``DeploymentConfig.api_key``); the file's
    own name is kept, else ``FLOTILLA_API_KEY`` when ``--api-key-secret`` asks for a key."""
    if config.api_key_env is None and options.api_key_secret is None:
        return None
    variable = config.api_key_env or DEFAULT_API_KEY_ENV
    return variable, options.api_key_secret or object_name(options.release, "api-key")


def api_key_env(setting: tuple[str, str] | None) -> list[dict]:
    """The container's env entry that reads the key from the Secret (key ``api-key``; required: a pod whose
    Secret is missing does not start, rather than serving without a key)."""
    if setting is None:
        return []
    variable, secret = setting
    return [{"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": API_KEY_SECRET_KEY}}}]


# ---- the deployment file of a pod ------------------------------------------------------------------------

def pod_document(plan: ModelPlan, config: DeploymentConfig, api_key: tuple[str, str] | None, *,
                 kserve: bool = False, aliases: tuple[str, ...] = ()) -> dict:
    """The deployment file one pod serves: this model alone (one replica: Kubernetes runs the replicas), its
    container path and engine overrides, the API key variable and seed; each of ``aliases`` routes to it.
    Checked with the deployment file's own schema (``parse_deployment_config``)."""
    spec = plan.spec
    entry = {"name": plan.name, "model": plan.source.container_path(kserve=kserve),
             "parallel": {"tensor": spec.tensor_parallel_size, "pipeline": spec.pipeline_parallel_size}}
    if plan.engine:
        entry["engine"] = dict(plan.engine)
    doc: dict = {"models": [entry]}
    if api_key is not None:
        doc["api_key_env"] = api_key[0]
    if config.seed is not None:
        doc["seed"] = config.seed
    if aliases:
        doc["routes"] = {alias: {plan.name: 1} for alias in aliases}
    parse_deployment_config(doc, f"the pod deployment file of model {plan.name!r}")
    return doc


def repository_document(repository: RepositoryPods, config: DeploymentConfig, api_key: tuple[str, str] | None,
                        *, kserve: bool = False) -> dict:
    """The deployment file of the pod that serves the file's model repository alone (``flotilla serve
    --config`` with no models: a server of repository models, KServe v2 over HTTP and gRPC), checked with the
    deployment file's own schema."""
    doc: dict = {"model_repository": repository.section(kserve=kserve), "models": []}
    if api_key is not None:
        doc["api_key_env"] = api_key[0]
    parse_deployment_config(doc, "the pod deployment file of the model repository")
    return doc


def dump_yaml(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def config_map(name: str, metadata: dict, files: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**metadata, "name": name}, "data": files}


def config_volume(config_map_name: str) -> tuple[dict, dict]:
    """(volume, mount) of a ConfigMap at ``CONFIG_DIR``."""
    return ({"name": "flotilla-config", "configMap": {"name": config_map_name}},
            {"name": "flotilla-config", "mountPath": CONFIG_DIR, "readOnly": True})


# ---- model storage ------------------------------------------------------------------------------------

def model_storage(plans: list[ModelPlan], options: K8sOptions, repository: RepositoryPods | None = None
                  ) -> tuple[list[dict], list[dict], list[dict]]:
    """``(volumes, mounts, init containers)`` that put the weights of ``plans`` (and the ``repository``'s
    directories) under /mnt/models: the PVC (read-only), or an emptyDir that KServe's storage initializer fills
    (``--model-uri``); nothing for models in the image."""
    if options.storage == "pvc":
        return ([{"name": "models", "persistentVolumeClaim": {"claimName": options.model_pvc, "readOnly": True}}],
                [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}], [])
    sources = [p.source for p in plans] + list(repository.sources if repository is not None else ())
    pairs = [s.download(options.model_uri) for s in sources] if options.storage == "uri" else []
    pairs = [pair for pair in pairs if pair is not None]
    if not pairs:
        return [], [], []
    init = {"name": "storage-initializer", "image": options.storage_initializer_image,
            "args": [part for pair in pairs for part in pair],
            "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}],
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
            "securityContext": container_security()}
    return ([{"name": "models", "emptyDir": {}}], [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}],
            [init])


def pull_secrets(options: K8sOptions) -> dict:
    return {"imagePullSecrets": [{"name": options.image_pull_secret}]} if options.image_pull_secret else {}
