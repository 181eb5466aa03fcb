"""``flotilla k8s --config deploy.yaml --target plain|kserve|kuberay [-o DIR] [options]``: Kubernetes
manifests from a deployment file, on stdout (one YAML stream) or one file per object in ``DIR``. Errors
(an invalid file, what a target cannot express) exit with code 2 and a message naming the cause."""

from __future__ import annotations

import argparse
import sys

from flotilla.deploy.engine_args import finite_float
from flotilla.k8s.options import (DEFAULT_RAY_VERSION, DEFAULT_SHUTDOWN_TIMEOUT_S, DEFAULT_STORAGE_INITIALIZER,
                                  DEVICES, KSERVE_ROLLOUTS, TARGETS, K8sOptions)


def add_k8s_parser(sub) -> None:
    p = sub.add_parser("k8s", help="Kubernetes manifests (plain, KServe, KubeRay) from a deployment file")
    p.add_argument("--config", required=True, metavar="DEPLOY_YAML", help="the deployment file")
    p.add_argument("--target", required=True, choices=TARGETS,
                   help="plain: Deployments, Services, HPAs, PDBs and a router; kserve: a ClusterServingRuntime and "
                        "InferenceServices; kuberay: a RayService running flotilla's Ray Serve application")
    p.add_argument("-o", "--output-dir", default=None, metavar="DIR",
                   help="write one file per object (NN-kind-name.yaml, in apply order) instead of stdout")
    p.add_argument("--name", default="flotilla", help="release name: prefix of every object name (default flotilla)")
    p.add_argument("--namespace", "-n", default=None, help="namespace of the objects (default: kubectl's)")
    p.add_argument("--image", default=None,
                   help="the flotilla image (default flotilla:VERSION-cpu, or -cuda for GPU models: the "
                        "Dockerfiles' tags)")
    p.add_argument("--image-pull-secret", default=None, metavar="SECRET", help="a registry credential Secret")
    storage = p.add_mutually_exclusive_group()
    storage.add_argument("--model-pvc", default=None, metavar="CLAIM",
                         help="models live on this PersistentVolumeClaim (mounted read-only at /mnt/models); "
                              "model paths in the file are relative to its root")
    storage.add_argument("--model-uri", default=None, metavar="URI",
                         help="models are fetched from this storage URI prefix (s3://, gs://, hf://, https://) by "
                              "KServe's storage initializer (an init container; KServe's storageUri)")
    p.add_argument("--storage-initializer-image", default=DEFAULT_STORAGE_INITIALIZER)
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="cpu or nvidia.com/gpu (default: each model's engine.device, else cpu)")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs of one pod; a model with more ranks spans several pods (default 8)")
    p.add_argument("--cpus-per-rank", type=finite_float, default=2.0, help="CPU request = limit per rank")
    p.add_argument("--memory-per-rank", type=finite_float, default=8.0, metavar="GIB",
                   help="memory request = limit per rank, in GiB (default 8)")
    p.add_argument("--api-key-secret", default=None, metavar="SECRET",
                   help="the Secret holding the API key under the key 'api-key' (default NAME-api-key when the "
                        "file sets api_key_env; given without api_key_env, the key is required too)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the servers and the router (plain)")
    p.add_argument("--shutdown-timeout", type=finite_float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help="the servers' drain limit after SIGTERM; the pods' grace period is set above it")
    p.add_argument("--startup-timeout", type=int, default=None, metavar="SECONDS",
                   help="how long a pod may take to load its model (default: estimated from the model's size)")
    p.add_argument("--hpa-cpu-utilization", type=int, default=80, metavar="PERCENT")
    p.add_argument("--kserve-rollout", choices=KSERVE_ROLLOUTS, default="canary",
                   help="routes' InferenceServices: canary (the default: split by weight) or stable (their first "
                        "rollout: the heavier target only)")
    p.add_argument("--ray-version", default=DEFAULT_RAY_VERSION, help="rayVersion of the RayService (the image's Ray)")
    p.set_defaults(func=cmd_k8s)


def options_from(ns: argparse.Namespace) -> K8sOptions:
    return K8sOptions(
        target=ns.target, release=ns.name, image=ns.image, image_pull_secret=ns.image_pull_secret,
        namespace=ns.namespace, model_pvc=ns.model_pvc, model_uri=ns.model_uri,
        storage_initializer_image=ns.storage_initializer_image, device=ns.device, gpus_per_node=ns.gpus_per_node,
        cpus_per_rank=ns.cpus_per_rank, memory_per_rank_gib=ns.memory_per_rank, api_key_secret=ns.api_key_secret,
        port=ns.port, shutdown_timeout_s=ns.shutdown_timeout, startup_timeout_s=ns.startup_timeout,
        hpa_cpu_utilization=ns.hpa_cpu_utilization, kserve_rollout=ns.kserve_rollout,
        ray_version=ns.ray_version).check()


def cmd_k8s(ns: argparse.Namespace) -> int:
    from flotilla.k8s.render import generate_from_file, render, write_dir
    options = options_from(ns)
    objects = generate_from_file(ns.config, options)
    header = f"generated by flotilla k8s --target {options.target} from {ns.config}"
    if ns.output_dir is None:
        sys.stdout.write(render(objects, header))
        return 0
    paths = write_dir(objects, ns.output_dir, header)
    print(f"wrote {len(paths)} objects to {ns.output_dir} (kubectl apply -f {ns.output_dir})", file=sys.stderr)
    return 0
