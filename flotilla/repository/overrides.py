"""The parameters of Triton's load API (``POST /v2/repository/models/{m}/load``): a ``config`` override (the
model configuration as JSON) and ``file:<path>`` model files, which replace the model's directory.

Contracts:
- ``parse_config_override(name, text)``: the JSON as a ``ModelConfig`` (its ``name``, when given, must be the
  model's). ``InferError`` INVALID_ARG naming the problem otherwise.
- ``write_model_files(name, files)``: a new temporary directory holding ``<tmp>/<name>/<path>`` for each
  ``"file:<path>"`` key (``path`` relative to the model directory, e.g. ``1/model.onnx``; absolute paths,
  ``..`` and keys without ``file:`` are INVALID_ARG). Returns the ``TemporaryDirectory`` (the caller removes it
  when the model is unloaded) and the model directory inside it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath
from typing import Mapping

from flotilla.repository.config import ModelConfig, parse_model_config
from flotilla.repository.errors import InferError, ModelConfigError

FILE_PREFIX = "file:"


def parse_config_override(name: str, text: str) -> ModelConfig:
    if not isinstance(text, str) or not text.strip():
        raise InferError("INVALID_ARG", f"failed to load '{name}': the 'config' parameter must be the model "
                                        "configuration as a JSON string")
    try:
        config = parse_model_config(text, "json", source=f"config override of '{name}'")
    except ModelConfigError as e:
        raise InferError("INVALID_ARG", f"failed to load '{name}': {e}") from None
    if config.name and config.name != name:
        raise InferError("INVALID_ARG", f"failed to load '{name}': the config override names model "
                                        f"'{config.name}'")
    return config


def _relative_path(name: str, key: str) -> PurePosixPath:
    if not isinstance(key, str) or not key.startswith(FILE_PREFIX):
        raise InferError("INVALID_ARG", f"failed to load '{name}': unexpected parameter '{key}' (model files are "
                                        f"given as '{FILE_PREFIX}<path in the model directory>')")
    path = PurePosixPath(key[len(FILE_PREFIX):])
    if not path.parts or path.is_absolute() or ".." in path.parts or "\\" in key:
        raise InferError("INVALID_ARG", f"failed to load '{name}': invalid model file path '{key}' (it must be "
                                        "relative to the model directory, without '..')")
    return path


def write_model_files(name: str, files: Mapping[str, bytes]) -> tuple[tempfile.TemporaryDirectory, Path]:
    paths = {_relative_path(name, key): content for key, content in files.items()}
    tmp = tempfile.TemporaryDirectory(prefix="flotilla-model-")
    model_dir = Path(tmp.name) / name
    try:
        model_dir.mkdir()
        for path, content in paths.items():
            if not isinstance(content, (bytes, bytearray)):
                raise InferError("INVALID_ARG", f"failed to load '{name}': the content of '{FILE_PREFIX}{path}' "
                                                "must be bytes")
            target = model_dir.joinpath(*path.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(bytes(content))
    except BaseException:
        tmp.cleanup()
        raise
    return tmp, model_dir
