"""Triton-style model repository (DESIGN.md layer ``repository/``: below deploy/ and entrypoints/, above engine/).

Modules, one job each:
- ``config``: config.pbtxt / config.yaml -> a validated, normalised ``ModelConfig`` (tritonclient's message).
- ``control``: version discovery and version policies; model control modes none / poll / explicit over
  repository scans (what should be loaded).
- ``errors``: ``InferError`` (Triton status code + message), ``ModelConfigError``, ``ModelControlError``.
"""

from flotilla.repository.config import (
    ModelConfig, instance_count, load_model_config, parse_model_config, read_model_config, validate_model_config,
)
from flotilla.repository.control import (
    ModelChange, ModelControl, ModelControlMode, ModelSnapshot, ModelTarget, RepositoryScan, diff_scans,
    resolve_target, scan_repositories, versions_to_load,
)
from flotilla.repository.errors import InferError, ModelConfigError, ModelControlError

__all__ = [
    "InferError", "ModelChange", "ModelConfig", "ModelConfigError", "ModelControl", "ModelControlError",
    "ModelControlMode", "ModelSnapshot", "ModelTarget", "RepositoryScan", "diff_scans", "instance_count",
    "load_model_config", "parse_model_config", "read_model_config", "resolve_target", "scan_repositories",
    "validate_model_config", "versions_to_load",
]
