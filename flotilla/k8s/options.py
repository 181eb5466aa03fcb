"""The settings of ``flotilla k8s`` that are not in the deployment file: where the image and the models come
from, the namespace, the device, per-rank resources, timeouts. ``K8sOptions`` is a frozen value, checked once
(``check``); the deployment file stays the one description of models, replicas, parallelism and routes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import flotilla
from flotilla.errors import FlotillaError
from flotilla.k8s.names import is_dns_label

TARGETS = ("plain", "kserve", "kuberay")
DEVICES = ("cpu", "nvidia.com/gpu")
GPU_RESOURCE = "nvidia.com/gpu"
KSERVE_ROLLOUTS = ("canary", "stable")
DEFAULT_STORAGE_INITIALIZER = "kserve/storage-initializer:v0.20.0"
DEFAULT_RAY_VERSION = "2.60.0"          # the ray[default] pin of flotilla's ray extra (pyproject.toml)
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0        # flotilla serve --shutdown-timeout's default
DEFAULT_API_KEY_ENV = "FLOTILLA_API_KEY"
API_KEY_SECRET_KEY = "api-key"


class K8sError(FlotillaError, ValueError):
    """A deployment that cannot be expressed for the chosen target, or an invalid ``flotilla k8s`` option."""


def default_image(device: str) -> str:
    """The image the Dockerfiles build by default: ``flotilla:<version>-cpu`` or ``-cuda``."""
    return f"flotilla:{flotilla.__version__}-{'cuda' if device == GPU_RESOURCE else 'cpu'}"


@dataclass(frozen=True)
class K8sOptions:
    """``target``: plain | kserve | kuberay. ``release``: the prefix of every object name and the
    ``app.kubernetes.io/instance`` label. ``image``: None picks ``default_image`` per model device.
    ``namespace``: None leaves it to ``kubectl apply -n``. Model storage: ``model_pvc`` (a claim mounted at
    /mnt/models) or ``model_uri`` (a storage URI prefix fetched by KServe's storage initializer), neither:
    models are in the image (aliases baked in, or absolute paths). ``device``: None takes each model's
    ``engine.device`` (cuda -> nvidia.com/gpu). ``gpus_per_node``: GPUs of one pod; a model with more ranks
    becomes a multi-pod group. ``cpus_per_rank`` / ``memory_per_rank_gib``: requests = limits per rank.
    ``api_key_secret``: the Secret holding the API key (key ``api-key``); None: ``<release>-api-key`` when
    the file names an ``api_key_env``. ``shutdown_timeout_s``: the server's drain limit; ``startup_timeout_s``:
    None estimates it from the model's size. ``kserve_rollout``: canary (the alias InferenceServices split
    traffic) or stable (their first rollout, 100% to the heaviest target)."""

    target: str
    release: str = "flotilla"
    image: str | None = None
    image_pull_secret: str | None = None
    namespace: str | None = None
    model_pvc: str | None = None
    model_uri: str | None = None
    storage_initializer_image: str = DEFAULT_STORAGE_INITIALIZER
    device: str | None = None
    gpus_per_node: int = 8
    cpus_per_rank: float = 2.0
    memory_per_rank_gib: float = 8.0
    api_key_secret: str | None = None
    port: int = 8000
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    startup_timeout_s: int | None = None
    hpa_cpu_utilization: int = 80
    kserve_rollout: str = "canary"
    ray_version: str = DEFAULT_RAY_VERSION

    def check(self) -> "K8sOptions":
        """Raise ``K8sError`` naming the first invalid option; return self."""
        problems = [
            (self.target not in TARGETS, f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}"),
            (not is_dns_label(self.release) or len(self.release) > 40 or not self.release[0].isalpha(),
             f"--name must be a DNS-1123 label starting with a letter, at most 40 characters, got {self.release!r}"),
            (self.namespace is not None and not is_dns_label(self.namespace),
             f"--namespace must be a DNS-1123 label, got {self.namespace!r}"),
            (self.model_pvc is not None and self.model_uri is not None,
             "give either --model-pvc or --model-uri, not both"),
            (self.model_pvc is not None and not is_dns_label(self.model_pvc),
             f"--model-pvc must name a PersistentVolumeClaim, got {self.model_pvc!r}"),
            (self.model_uri is not None and "://" not in (self.model_uri or ""),
             f"--model-uri must be a storage URI (s3://, gs://, hf://, https://, ...), got {self.model_uri!r}"),
            (self.device is not None and self.device not in DEVICES,
             f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}"),
            (self.gpus_per_node < 1, f"--gpus-per-node must be >= 1, got {self.gpus_per_node}"),
            (not (math.isfinite(self.cpus_per_rank) and self.cpus_per_rank >= 0.001),
             f"--cpus-per-rank must be >= 0.001, got {self.cpus_per_rank}"),
            (not (math.isfinite(self.memory_per_rank_gib) and self.memory_per_rank_gib > 0),
             f"--memory-per-rank must be > 0 GiB, got {self.memory_per_rank_gib}"),
            (self.api_key_secret is not None and not is_dns_label(self.api_key_secret),
             f"--api-key-secret must name a Secret, got {self.api_key_secret!r}"),
            (not 1 <= self.port <= 65535, f"--port must be in [1, 65535], got {self.port}"),
            (not (math.isfinite(self.shutdown_timeout_s) and self.shutdown_timeout_s >= 0),
             f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout_s}"),
            (self.startup_timeout_s is not None and self.startup_timeout_s < 10,
             f"--startup-timeout must be >= 10 s, got {self.startup_timeout_s}"),
            (not 1 <= self.hpa_cpu_utilization <= 100,
             f"--hpa-cpu-utilization must be in [1, 100], got {self.hpa_cpu_utilization}"),
            (self.kserve_rollout not in KSERVE_ROLLOUTS,
             f"--kserve-rollout must be one of {', '.join(KSERVE_ROLLOUTS)}, got {self.kserve_rollout!r}"),
        ]
        for bad, message in problems:
            if bad:
                raise K8sError(message)
        return self

    def image_for(self, device: str) -> str:
        return self.image or default_image(device)

    @property
    def storage(self) -> str:
        """"pvc", "uri" or "image" (models baked into the image)."""
        return "pvc" if self.model_pvc else "uri" if self.model_uri else "image"
