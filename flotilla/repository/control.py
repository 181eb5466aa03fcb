"""Model versions and Triton's model control modes (none / poll / explicit) as a policy over directory scans.

This module decides *what should be loaded*; loading, unloading and serving belong to the repository manager
above it. Contracts:
- ``versions_to_load(config, available)``: Triton's VersionsToLoad (latest N highest, all, specific present
  ones); an empty result is Triton's error "at least one version must be available under the version policy".
- ``scan_repositories(repos)``: one ``ModelSnapshot`` per model directory (hidden entries and plain files are
  skipped), each with digests of its config file, of its other top-level files (label files) and of every
  version directory (relative path, size and mtime of each file), so a poll sees added, removed and changed
  models and versions. A model name in two repositories is an error for that name only.
- ``ModelControl``: ``startup()`` -> the targets to load first (none/poll: every model; explicit: the
  ``load_models`` names, ``"*"`` meaning all); ``poll()`` (poll mode) -> ``None`` until ``poll_interval_s``
  has passed on the injected clock, then the changes since the previous scan with the new targets;
  ``load(name)`` / ``unload(name)`` (explicit mode only; otherwise Triton's error). A ``ModelTarget`` carries
  either a validated config and the versions to load, or the error that prevents loading; when a reload's
  target has an error the manager keeps the loaded model (as Triton does).
"""

from __future__ import annotations

import enum
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from flotilla.repository.config import (
    CONFIG_PBTXT, CONFIG_YAML, ModelConfig, load_model_config, version_dirs,
)
from flotilla.repository.errors import ModelConfigError, ModelControlError

NOT_ALLOWED_MESSAGE = "explicit model load / unload is not allowed if polling is enabled"


# --------------------------------------------------------------------------------------------- versions

def versions_to_load(config: ModelConfig, available: Iterable[int]) -> list[int]:
    """The versions that ``config.version_policy`` selects among ``available`` (ascending). Raises
    ModelConfigError when none is selected; versions named by a specific policy but absent are listed."""
    present = sorted(set(available))
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice") or "latest"
    missing: list[int] = []
    if which == "specific":
        wanted = sorted(set(policy.specific.versions))
        chosen = [v for v in wanted if v in present]
        missing = [v for v in wanted if v not in present]
    elif which == "all":
        chosen = present
    else:
        n = policy.latest.num_versions if policy.HasField("latest") else 1
        chosen = present[-n:] if n > 0 else []
    if not chosen:
        detail = f"version directories present: {present or 'none'}"
        if missing:
            detail += f"; versions {missing} are specified but their directories are not present"
        raise ModelConfigError("at least one version must be available under the version policy of model "
                               f"'{config.name}' ({detail})")
    return chosen


# ------------------------------------------------------------------------------------------------- scans

@dataclass(frozen=True)
class ModelSnapshot:
    """One model directory as seen by one scan."""
    name: str
    path: Path
    config_digest: str                    # sha256 of config.pbtxt / config.yaml bytes ('' when none)
    other_digest: str                     # other top-level files (label files): a change reloads the model
    versions: Mapping[int, str]           # version -> digest of its directory's files


@dataclass(frozen=True)
class RepositoryScan:
    models: Mapping[str, ModelSnapshot]
    errors: Mapping[str, str] = field(default_factory=dict)   # model name -> why it cannot be used


def _files_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            try:
                st = path.stat()
            except OSError:
                continue
            h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def snapshot_model(model_dir: Path) -> ModelSnapshot:
    """Digest one model directory (no parsing: a broken config still gets a snapshot)."""
    config_h, other_h = hashlib.sha256(), hashlib.sha256()
    versions = {int(p.name): _files_digest(p) for p in version_dirs(model_dir)}
    version_names = {str(v) for v in versions}
    for entry in sorted(model_dir.iterdir(), key=lambda p: p.name):
        if entry.name in version_names or entry.name.startswith("."):
            continue
        if entry.name in (CONFIG_PBTXT, CONFIG_YAML) and entry.is_file():
            config_h.update(entry.name.encode() + b"\0" + entry.read_bytes())
        elif entry.is_file():
            st = entry.stat()
            other_h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        elif entry.is_dir():
            other_h.update(f"{entry.name}/\0{_files_digest(entry)}\n".encode())
    return ModelSnapshot(model_dir.name, model_dir, config_h.hexdigest(), other_h.hexdigest(), versions)


def scan_repositories(repositories: Sequence[Path | str]) -> RepositoryScan:
    """Scan every repository directory. Raises ModelControlError if a repository is not a directory."""
    found: dict[str, list[Path]] = {}
    for repo in map(Path, repositories):
        if not repo.is_dir():
            raise ModelControlError(f"model repository '{repo}' is not a directory", code="INVALID_ARG")
        for entry in repo.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                found.setdefault(entry.name, []).append(entry)
    models, errors = {}, {}
    for name, paths in sorted(found.items()):
        if len(paths) > 1:
            errors[name] = (f"model '{name}' appears in more than one model repository: "
                            + ", ".join(str(p.parent) for p in paths))
            continue
        try:
            models[name] = snapshot_model(paths[0])
        except OSError as e:     # the directory vanished or became unreadable while scanning
            errors[name] = f"cannot read model directory '{paths[0]}': {e}"
    return RepositoryScan(models, errors)


@dataclass(frozen=True)
class ModelChange:
    """How one model differs between two scans. kind: "added", "removed" or "modified"."""
    name: str
    kind: str
    config_changed: bool = False          # config file or other top-level files changed (reload)
    versions_added: tuple[int, ...] = ()
    versions_removed: tuple[int, ...] = ()
    versions_modified: tuple[int, ...] = ()


def diff_scans(old: RepositoryScan, new: RepositoryScan) -> list[ModelChange]:
    """The models that were added, removed or modified from ``old`` to ``new``, sorted by name. A name's
    state is its snapshot, its scan error, or absent; moving between a snapshot and an error (or to another
    error) is a modification with ``config_changed``."""
    changes = []
    for name in sorted(set(old.models) | set(new.models) | set(old.errors) | set(new.errors)):
        a = old.models.get(name, old.errors.get(name))
        b = new.models.get(name, new.errors.get(name))
        if a is None:
            changes.append(ModelChange(name, "added"))
        elif b is None:
            changes.append(ModelChange(name, "removed"))
        elif not (isinstance(a, ModelSnapshot) and isinstance(b, ModelSnapshot)):
            if a != b:
                changes.append(ModelChange(name, "modified", config_changed=True))
        else:
            config_changed = (a.config_digest, a.other_digest, a.path) != (b.config_digest, b.other_digest, b.path)
            added = tuple(sorted(set(b.versions) - set(a.versions)))
            removed = tuple(sorted(set(a.versions) - set(b.versions)))
            modified = tuple(sorted(v for v in set(a.versions) & set(b.versions) if a.versions[v] != b.versions[v]))
            if config_changed or added or removed or modified:
                changes.append(ModelChange(name, "modified", config_changed, added, removed, modified))
    return changes


# ---------------------------------------------------------------------------------------- model control

class ModelControlMode(str, enum.Enum):
    NONE = "none"
    POLL = "poll"
    EXPLICIT = "explicit"


@dataclass(frozen=True)
class ModelTarget:
    """What should be loaded for one model: a validated config and versions, or the error that prevents it."""
    name: str
    path: Path | None
    config: ModelConfig | None = None
    versions: tuple[int, ...] = ()
    error: str | None = None


def resolve_target(snapshot: ModelSnapshot, *, gpu_count: int = 0,
                   override: ModelConfig | None = None) -> ModelTarget:
    """Load and validate the model's config and choose its versions; failures become ``error``."""
    try:
        config = load_model_config(snapshot.path, gpu_count=gpu_count, override=override)
        versions = versions_to_load(config, snapshot.versions)
    except ModelConfigError as e:
        return ModelTarget(snapshot.name, snapshot.path, error=str(e))
    except OSError as e:
        return ModelTarget(snapshot.name, snapshot.path, error=f"cannot read model directory: {e}")
    return ModelTarget(snapshot.name, snapshot.path, config, tuple(versions))


class ModelControl:
    """Triton's model control modes over one or more repository directories. Not thread-safe: the manager
    calls it from one task. ``clock`` (seconds, monotonic) paces polling and is injectable for tests."""

    def __init__(self, repositories: Sequence[Path | str], mode: ModelControlMode | str = "none", *,
                 load_models: Sequence[str] = (), poll_interval_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic, gpu_count: int = 0):
        self.mode = ModelControlMode(mode)
        if not repositories:
            raise ModelControlError("no model repository given", code="INVALID_ARG")
        if load_models and self.mode is not ModelControlMode.EXPLICIT:
            raise ModelControlError("models to load at startup (--load-model) need model control mode "
                                    "'explicit'", code="INVALID_ARG")
        if "*" in load_models and len(load_models) > 1:
            raise ModelControlError("Wildcard model name '*' must be the ONLY startup model if specified at all.",
                                    code="INVALID_ARG")
        if self.mode is ModelControlMode.POLL and not poll_interval_s > 0:
            raise ModelControlError("poll mode needs a repository poll interval > 0 seconds", code="INVALID_ARG")
        self.repositories = tuple(Path(r) for r in repositories)
        self.load_models = tuple(load_models)
        self.poll_interval_s = float(poll_interval_s)
        self._clock = clock
        self._gpu_count = gpu_count
        self._scan = RepositoryScan({})
        self._next_poll = 0.0

    def _target(self, name: str, scan: RepositoryScan, override: ModelConfig | None = None) -> ModelTarget:
        if name in scan.errors:
            return ModelTarget(name, None, error=scan.errors[name])
        if name not in scan.models:
            return ModelTarget(name, None, error=f"failed to load '{name}', no model directory named '{name}' "
                                                 "in the model repository")
        return resolve_target(scan.models[name], gpu_count=self._gpu_count, override=override)

    def startup(self) -> dict[str, ModelTarget]:
        """Scan the repositories and return the targets to load at startup, by model name."""
        self._scan = scan_repositories(self.repositories)
        self._next_poll = self._clock() + self.poll_interval_s
        if self.mode is ModelControlMode.EXPLICIT and self.load_models != ("*",):
            names = list(dict.fromkeys(self.load_models))
        else:
            names = sorted(set(self._scan.models) | set(self._scan.errors))
        return {name: self._target(name, self._scan) for name in names}

    def poll(self, force: bool = False) -> list[tuple[ModelChange, ModelTarget | None]] | None:
        """Poll mode: ``None`` until the poll interval has passed (unless ``force``); then rescan and return
        each change with the new target (``None`` for a removed model). Other modes raise ModelControlError."""
        if self.mode is not ModelControlMode.POLL:
            raise ModelControlError(f"the repository is polled only in model control mode 'poll' "
                                    f"(mode is '{self.mode.value}')", code="UNAVAILABLE")
        now = self._clock()
        if not force and now < self._next_poll:
            return None
        self._next_poll = now + self.poll_interval_s
        new = scan_repositories(self.repositories)
        changes = diff_scans(self._scan, new)
        self._scan = new
        return [(c, None if c.kind == "removed" else self._target(c.name, new)) for c in changes]

    def seconds_until_poll(self) -> float:
        """How long the manager may sleep before the next ``poll()`` is due (0 when due)."""
        return max(0.0, self._next_poll - self._clock())

    def check_explicit(self) -> None:
        """Raise ModelControlError (Triton's message) unless the mode is explicit."""
        if self.mode is not ModelControlMode.EXPLICIT:
            raise ModelControlError(NOT_ALLOWED_MESSAGE, code="UNAVAILABLE")

    def load(self, name: str, config_override: ModelConfig | None = None) -> ModelTarget:
        """Explicit mode: re-read the model's directory (a reload picks up new versions and config) and
        return its target. Raises ModelControlError in other modes or when there is no such model."""
        self.check_explicit()
        if not name or "/" in name or name.startswith("."):
            raise ModelControlError(f"invalid model name '{name}'", code="INVALID_ARG")
        scan = scan_repositories(self.repositories)
        self._scan = scan
        if name not in scan.models and name not in scan.errors:
            raise ModelControlError(f"failed to load '{name}', failed to poll from model repository",
                                    code="INVALID_ARG")
        return self._target(name, scan, config_override)

    def unload(self, name: str) -> None:
        """Explicit mode: allow unloading ``name`` (the manager drains and unloads it). Raises otherwise."""
        self.check_explicit()

    def index(self) -> RepositoryScan:
        """A fresh scan of the repositories (the repository index lists every model, loaded or not)."""
        return scan_repositories(self.repositories)
