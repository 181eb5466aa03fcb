"""The deployment's model repository (``RepositorySpec``, from ``--model-repository`` & co. or the file's
``model_repository:``) as a running ``flotilla.repository.ModelRepository``.

Contracts:
- ``check_repository_paths(spec)``: ValueError naming each path that is not a directory (the server checks
  this before it binds or loads anything: exit code 2).
- ``build_model_repository(spec)``: the ``ModelRepository`` (not started: the server calls ``await start()``
  on its serving loop, which loads the models, and ``await close()`` when it shuts down, which drains every
  batcher and finalizes every backend). KIND_AUTO instance groups use the GPUs torch sees, as Triton's do.
"""

from __future__ import annotations

import os

from flotilla.deploy.spec import RepositorySpec


def check_repository_paths(spec: RepositorySpec) -> None:
    missing = [p for p in spec.paths if not os.path.isdir(p)]
    if missing:
        raise ValueError(f"model repository {', '.join(repr(p) for p in missing)} is not a directory")


def visible_gpus() -> int:
    """The CUDA devices torch sees (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def build_model_repository(spec: RepositorySpec, *, gpu_count: int | None = None):
    from flotilla.repository.manager import ModelRepository
    return ModelRepository(spec.paths, model_control_mode=spec.model_control_mode, load_models=spec.load_models,
                           poll_interval_s=spec.poll_secs, strict_readiness=spec.strict_readiness,
                           gpu_count=visible_gpus() if gpu_count is None else gpu_count)
