"""Kubernetes manifests generated from a deployment file (``flotilla k8s``), so the YAML that runs in a cluster
is the file that was tested, never a hand-written copy.

Module map:
- ``options.py``: the settings beyond the file (image, namespace, storage, device, resources per rank).
- ``plan.py``: per model, what it needs (pods per replica, GPUs/CPUs/memory, replica bounds, weights' place,
  startup budget), and the model repository's pods; pure.
- ``pod.py``: the shared parts: the server container and its probes, the pod's deployment file, API key
  Secret, model storage, security contexts.
- ``plain.py``, ``kserve.py``, ``kuberay.py``: the three targets.
- ``render.py``: file -> objects -> YAML; ``cli.py``: the ``flotilla k8s`` command.
- ``validate.py``: offline validation (kubernetes-validate for core kinds, CRD schemas for KServe and KubeRay).
- ``ray_group.py``: run in a multi-pod group's leader: wait until its Ray cluster has every node.
"""
