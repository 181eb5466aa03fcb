"""From a deployment file and ``K8sOptions`` to the objects of a target, and to YAML (one stream on stdout,
or one file per object in a directory)."""

from __future__ import annotations

import os

import yaml

import flotilla
from flotilla.deploy.config import load_deployment_config, parse_deployment_config
from flotilla.deploy.spec import DeploymentConfig
from flotilla.k8s.options import K8sError, K8sOptions
from flotilla.k8s.plan import ModelPlan, plan_models, plan_repository_pods


def load_unresolved(path: str) -> DeploymentConfig:
    """The deployment file with its model paths as written (``load_deployment_config`` makes relative paths
    that exist here absolute, which would name this machine's directories inside a pod). The file is fully
    validated first, with the usual errors naming file and key."""
    load_deployment_config(path)
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return parse_deployment_config(data, path, base_dir=None)


def generate(config: DeploymentConfig, options: K8sOptions, base_dir: str | None = None) -> list[dict]:
    """The objects of ``options.target`` for ``config`` (``base_dir``: where the file is, to size its local
    models). Raises ``K8sError`` for what the target cannot express."""
    from flotilla.k8s.kserve import kserve_objects
    from flotilla.k8s.kuberay import kuberay_objects
    from flotilla.k8s.plain import plain_objects
    options.check()
    if not config.models and config.model_repository is None:
        raise K8sError("the deployment file has no models")
    plans = plan_models(config, options, base_dir)
    repository = plan_repository_pods(config, options, base_dir)
    build = {"plain": plain_objects, "kserve": kserve_objects, "kuberay": kuberay_objects}[options.target]
    return build(config, plans, options, flotilla.__version__, repository=repository)


def plans_for(path: str, options: K8sOptions) -> list[ModelPlan]:
    """The model plans of a deployment file (what tests compare the objects with)."""
    return plan_models(load_unresolved(path), options.check(), os.path.dirname(os.path.abspath(path)))


def generate_from_file(path: str, options: K8sOptions) -> list[dict]:
    return generate(load_unresolved(path), options, os.path.dirname(os.path.abspath(path)))


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the files in ConfigMaps, serveConfigV2, scripts) as literal blocks; no anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value and not any(c in value for c in "\t\r") and value == value.rstrip(" ") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(obj) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def render(objects: list[dict], header: str | None = None) -> str:
    """A multi-document YAML stream, in apply order."""
    docs = [to_yaml(obj) for obj in objects]
    text = "---\n".join(docs)
    return (f"# {header}\n" if header else "") + text


def file_name(index: int, obj: dict) -> str:
    return f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def write_dir(objects: list[dict], directory: str, header: str | None = None) -> list[str]:
    """One file per object (``NN-kind-name.yaml``, numbered in apply order); returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, obj in enumerate(objects):
        path = os.path.join(directory, file_name(i, obj))
        with open(path, "w", encoding="utf-8") as f:
            f.write(render([obj], header))
        paths.append(path)
    return paths
