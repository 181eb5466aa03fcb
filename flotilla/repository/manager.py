"""``ModelRepository``: Triton's model repository manager, the ``service.InferenceService`` of repository models.

Lifecycle (all on one event loop): ``await repo.start()`` loads what ``ModelControl.startup()`` targets (none
/ poll: every model; explicit: ``load_models``) and, in poll mode, polls the repositories every
``poll_interval_s`` on ``clock``; ``await repo.close()`` stops polling and unloads everything (ensembles first,
each draining its requests, then every batcher drains and every backend is finalized).

Contracts:
- Loading a model version loads its instance_group instances (in a worker thread, so requests keep being
  served meanwhile) behind one ``DynamicBatcher`` (``served.ServedVersion``); an ensemble is an
  ``ensemble.EnsembleModel`` validated against its loaded composing models.
- A load that fails leaves the model without versions and UNAVAILABLE with the reason in ``index()``; other
  models are unaffected. A failed *reload* keeps the versions already loaded serving (as Triton does).
- A reload (explicit ``load``, or a poll that saw a change) loads the new or changed versions, makes them
  ready, and only then retires the versions they replace: those stop admitting and finish every request they
  admitted (``stop(drain=True)``) before their instances are finalized, so no request is lost. Unchanged
  versions of an unchanged config keep serving untouched. ``load`` returns once the old versions drained.
- ``model(name)`` (no version) returns a handle that resolves the latest ready version on every call, so a
  request never lands on a version that has stopped admitting; ``model(name, "2")`` is that version.
  Unknown model or version: InferError NOT_FOUND with Triton's "Request for unknown model: ..." message.
- Ensembles are (re)validated after every change: one whose composing model is gone becomes UNAVAILABLE with
  Triton's reason, and comes back when the model does. Explicit ``load`` of an ensemble loads its composing
  models first; ``unload(..., unload_dependents=True)`` also unloads composing models that were not loaded
  explicitly and no other ensemble uses.
- ``load`` / ``unload`` outside explicit mode, and every failure, raise ``InferError`` with Triton's code.
- ``set_external_models(models)`` names the server's other models (its LLMs and embedding models, ``ServedModel``s
  with version 1): an ensemble step may name one (``external.ExternalStep``), and a repository model of the same
  name is never loaded (UNAVAILABLE, the reason says which model holds the name). Call it before ``start()``.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import flotilla
from flotilla.repository.config import ModelConfig
from flotilla.repository.control import (
    ModelControl, ModelControlMode, ModelTarget, resolve_target, snapshot_model,
)
from flotilla.repository.ensemble import (
    LATEST, EnsembleModel, ensemble_cycle, ensemble_steps, is_ensemble, validate_dependencies,
    validate_ensemble_scheduling,
)
from flotilla.repository.errors import InferError, ModelConfigError, ModelControlError
from flotilla.repository.external import EXTERNAL_VERSION, ExternalStep, is_decoupled
from flotilla.repository.overrides import parse_config_override, write_model_files
from flotilla.repository.served import ServedVersion
from flotilla.repository.service import ModelMetadata, RepositoryEntry

logger = logging.getLogger(__name__)

UNLOADED = "unloaded"
EXTENSIONS = ("model_repository", "model_repository(unload_dependents)", "model_configuration", "schedule_policy",
              "statistics")


@dataclass
class _Model:
    """One model name: what should be loaded (``target``) and what serves (``versions``)."""
    name: str
    target: ModelTarget | None = None          # None: nothing wanted (never loaded, unloaded or removed)
    versions: dict[int, Any] = field(default_factory=dict)   # ready versions: ServedVersion | EnsembleModel
    digests: dict[int, str] = field(default_factory=dict)    # version -> digest of the files it was loaded from
    config_key: bytes = b""                    # the target config the versions were loaded from
    reason: str = ""                           # why the wanted versions are not (all) loaded
    explicit: bool = False                     # loaded on its own (not only as an ensemble's composing model)
    busy: str = ""                             # LOADING / UNLOADING while that happens
    files: tempfile.TemporaryDirectory | None = None   # model files given to load()


class ModelRepository:
    """The model repository over one or more directories (see the module contract)."""

    def __init__(self, repositories: Sequence[Path | str], *, model_control_mode: ModelControlMode | str = "none",
                 load_models: Sequence[str] = (), poll_interval_s: float = 15.0, strict_readiness: bool = True,
                 clock: Callable[[], float] = time.monotonic, gpu_count: int = 0):
        try:
            self._control = ModelControl(repositories, model_control_mode, load_models=load_models,
                                         poll_interval_s=poll_interval_s, clock=clock, gpu_count=gpu_count)
        except ValueError:
            raise ModelControlError(f"unknown model control mode {model_control_mode!r} (none, poll, explicit)",
                                    code="INVALID_ARG") from None
        self._gpu_count = gpu_count
        self.strict_readiness = strict_readiness
        self._models: dict[str, _Model] = {}
        self._external: dict[str, Any] = {}       # the server's other models, by name (ServedModel)
        self._lock: asyncio.Lock | None = None
        self._poll_task: asyncio.Task | None = None
        self._poll_wake: asyncio.Event | None = None
        self._started = self._closed = False

    @property
    def mode(self) -> ModelControlMode:
        return self._control.mode

    def set_external_models(self, models: Mapping[str, Any]) -> None:
        """The server's models outside the repository (see the module contract)."""
        self._external = dict(models)

    def _name_taken(self, name: str) -> str | None:
        if name in self._external:
            return (f"model name '{name}' is already served by this server's configuration (not the model "
                    f"repository); rename the repository model")
        return None

    # ------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load the startup models (failures are recorded, not raised) and start polling in poll mode.
        Raises ModelControlError when a repository directory does not exist."""
        if self._started:
            raise RuntimeError("the model repository is already started")
        self._lock, self._poll_wake = asyncio.Lock(), asyncio.Event()
        targets = self._control.startup()
        async with self._lock:
            await self._apply_all(targets.values(), explicit=True)
        self._started = True
        if self.mode is ModelControlMode.POLL:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_loop(), name="repository-poll")

    async def close(self) -> None:
        """Stop polling; unload every model (ensembles first), draining their requests. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._poll_task is not None:     # a poll in progress finishes (a cancelled load would leak instances)
            self.wakeup()
            await asyncio.gather(self._poll_task, return_exceptions=True)
        if self._lock is None:
            return
        async with self._lock:
            order = sorted(self._models.values(), key=lambda m: not is_ensemble(_config_of(m)))
            for m in order:
                await self._unload(m, UNLOADED)

    async def stop(self) -> None:
        """``close()`` (the name the server's lifecycle hooks call)."""
        await self.close()

    async def poll(self, force: bool = False) -> list[str]:
        """Poll mode: when the poll interval has passed on ``clock`` (or ``force``), rescan and apply the
        changes; returns the names of the models that changed (empty when it was not time yet)."""
        async with self._lock:
            changes = self._control.poll(force)
            if not changes:
                return []
            for change, target in changes:
                if target is None and change.name in self._models:
                    await self._unload(self._models[change.name], UNLOADED)
                    del self._models[change.name]
            await self._apply_all([t for _, t in changes if t is not None], explicit=True)
            return [change.name for change, _ in changes]

    def wakeup(self) -> None:
        """Make the poll timer look at ``clock`` again now (after a fake clock moved)."""
        if self._poll_wake is not None:
            self._poll_wake.set()

    async def _poll_loop(self) -> None:
        while not self._closed:
            delay = self._control.seconds_until_poll()
            if delay > 0:
                self._poll_wake.clear()
                try:
                    await asyncio.wait_for(self._poll_wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                changed = await self.poll()
                if changed:
                    logger.info("model repository poll: %s changed", ", ".join(changed))
            except Exception:  # noqa: BLE001 - a failed poll (repository gone) is retried at the next interval
                logger.exception("polling the model repository failed")

    # ----------------------------------------------------------------------------------- loading

    async def _apply_all(self, targets: Iterable[ModelTarget], *, explicit: bool) -> None:
        """Load every target (models concurrently, then ensembles); failures are recorded per model."""
        targets = list(targets)
        plain = [t for t in targets if not is_ensemble(t.config)]
        results = await asyncio.gather(*(self._apply(t, explicit=explicit) for t in plain), return_exceptions=True)
        for target, result in zip(plain, results):
            if isinstance(result, BaseException) and not isinstance(result, ModelControlError):
                raise result
        for target in targets:
            if is_ensemble(target.config):
                self._want(target, explicit)
        await self._refresh_ensembles()

    def _want(self, target: ModelTarget, explicit: bool) -> _Model:
        m = self._models.setdefault(target.name, _Model(target.name))
        m.target = target
        m.explicit = m.explicit or explicit
        if target.error is not None:
            m.reason = target.error
        elif self._name_taken(target.name):
            m.reason = self._name_taken(target.name)
        return m

    async def _apply(self, target: ModelTarget, *, explicit: bool) -> None:
        """Load or reload one non-ensemble target. Raises ModelControlError with the reason when it fails."""
        m = self._want(target, explicit)
        if target.error is not None or self._name_taken(target.name):
            raise ModelControlError(m.reason, code="INVALID_ARG")
        try:
            snapshot = snapshot_model(target.path)  # a changed label file (or directory) reloads every version
        except OSError as e:                        # the directory went away since the scan
            m.reason = f"failed to load '{m.name}': cannot read model directory: {e}"
            raise ModelControlError(m.reason, code="INVALID_ARG") from None
        digests = snapshot.versions
        key = b"\0".join((str(target.path).encode(), snapshot.other_digest.encode(),
                          target.config.SerializeToString(deterministic=True)))
        changed = [v for v in target.versions
                   if key != m.config_key or v not in m.versions or digests.get(v) != m.digests.get(v)]
        keep = [v for v in target.versions if v not in changed]
        if not changed and set(keep) == set(m.versions):
            m.reason = ""
            return
        new = await self._load_versions(m, target, changed)
        retire = [m.versions[v] for v in m.versions if v not in keep]
        m.versions = {v: (new[v] if v in new else m.versions[v]) for v in sorted(keep + changed)}
        m.digests = {v: digests.get(v, "") for v in m.versions}
        m.config_key, m.reason = key, ""
        for served in retire:           # the new versions are ready: the old ones stop admitting and drain
            await served.stop(drain=True)

    async def _load_versions(self, m: _Model, target: ModelTarget, versions: list[int]) -> dict[int, ServedVersion]:
        new: dict[int, ServedVersion] = {}
        m.busy = "LOADING"
        version = None
        try:
            for version in versions:
                served = await asyncio.to_thread(ServedVersion.load, target.config, target.path / str(version),
                                                 version, lambda: self.model_versions(m.name))
                new[version] = served
                await served.start()
        except Exception as e:  # noqa: BLE001 - any load failure is this model's, never the server's
            for served in new.values():
                await served.stop(drain=False)
            m.reason = f"failed to load '{m.name}' version {version}: {e}"
            logger.error("%s", m.reason)
            raise ModelControlError(m.reason, code="INVALID_ARG") from None
        finally:
            m.busy = ""
        return new

    async def _unload(self, m: _Model, reason: str) -> None:
        versions, m.versions = list(m.versions.values()), {}
        m.target, m.digests, m.config_key, m.reason, m.explicit = None, {}, b"", reason, False
        m.busy = "UNLOADING"
        try:
            for served in versions:
                await served.stop(drain=True)
        finally:
            m.busy = ""
            if m.files is not None:
                m.files.cleanup()
                m.files = None

    # --------------------------------------------------------------------------------- ensembles

    def _lookup(self, name: str):
        if name in self._external:                   # the server's model holds the name
            return {EXTERNAL_VERSION: self._external[name].config()}, None
        m = self._models.get(name)
        if m is None or (m.target is None and not m.versions and m.reason in ("", UNLOADED)):
            return None
        error = None if m.reason == UNLOADED else (m.reason or None)
        return {v: served.config() for v, served in m.versions.items()}, error

    def _steps_of(self, name: str) -> list[str] | None:
        config = _config_of(self._models.get(name))
        return [s.model_name for s in ensemble_steps(config)] if is_ensemble(config) else None

    def _ensemble_error(self, config: ModelConfig) -> str | None:
        if self._name_taken(config.name):
            return self._name_taken(config.name)
        try:
            validate_ensemble_scheduling(config)
            cycle = ensemble_cycle(config.name, self._steps_of)
            if cycle:
                return cycle
            validate_dependencies(config, self._lookup)
        except ModelConfigError as e:
            return str(e)
        return None

    def _decoupled_steps(self, config: ModelConfig) -> frozenset[int]:
        """The steps of a (valid) ensemble whose model streams its responses (``external.is_decoupled``)."""
        found = set()
        for i, step in enumerate(ensemble_steps(config)):
            versions, _ = self._lookup(step.model_name) or ({}, None)
            version = max(versions) if step.model_version == LATEST and versions else step.model_version
            if is_decoupled(versions.get(version)):
                found.add(i)
        return frozenset(found)

    def _resolve_step(self, name: str, version: int):
        """An ensemble step's model: a repository model's ready version, else an external model (version 1)."""
        if name in self._external:
            if version not in (LATEST, EXTERNAL_VERSION):
                raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' version {version} is not found")
            return ExternalStep(self._external[name])
        return self._resolve(name, version)

    async def _refresh_ensembles(self) -> None:
        """Load the wanted ensembles that are valid now and retire the loaded ones that are not, to a fixpoint
        (an ensemble can be a step of another)."""
        changed = True
        while changed:
            changed = False
            for m in list(self._models.values()):
                target = m.target
                if target is None or not is_ensemble(target.config) or target.error is not None:
                    continue
                error = self._ensemble_error(target.config)
                key = target.config.SerializeToString(deterministic=True)
                if error is not None:
                    m.reason = error
                    if m.versions:
                        retire, m.versions, m.config_key = list(m.versions.values()), {}, b""
                        for served in retire:
                            await served.stop(drain=True)
                        changed = True
                elif key != m.config_key or set(m.versions) != set(target.versions):
                    retire = [s for v, s in m.versions.items()]
                    decoupled = self._decoupled_steps(target.config)
                    m.versions = {v: EnsembleModel(target.config, v, self._resolve_step,
                                                   lambda name=m.name: self.model_versions(name),
                                                   decoupled_steps=decoupled)
                                  for v in target.versions}
                    m.config_key, m.reason = key, ""
                    for served in retire:
                        await served.stop(drain=True)
                    changed = True

    # ------------------------------------------------------------------------------ InferenceService

    def live(self) -> bool:
        return not self._closed

    def ready(self) -> bool:
        if not self._started or self._closed:
            return False
        if not self.strict_readiness:
            return True
        return all(m.versions for m in self._models.values() if m.target is not None)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "flotilla", "version": flotilla.__version__, "extensions": list(EXTENSIONS)}

    def model(self, name: str, version: str | None = None):
        m = self._models.get(name)
        if m is None:
            raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' is not found")
        if version in (None, ""):
            self._resolve(name, LATEST)
            return _Latest(self, name)
        return self._resolve(name, _parse_version(version))

    def _resolve(self, name: str, version: int):
        """The ready version (LATEST: the highest); InferError NOT_FOUND with Triton's messages."""
        m = self._models.get(name)
        if m is None:
            raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' is not found")
        if version == LATEST:
            if not m.versions:
                raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' has no available versions")
            return m.versions[max(m.versions)]
        if version not in m.versions:
            raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' version {version} is not found")
        return m.versions[version]

    def model_versions(self, name: str) -> list[str]:
        m = self._models.get(name)
        return [str(v) for v in sorted(m.versions)] if m is not None else []

    def index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        try:
            scan = self._control.index()
            names = set(scan.models) | set(scan.errors)
        except ModelControlError:
            names = set()
        rows: list[RepositoryEntry] = []
        for name in sorted(names | set(self._models)):
            m = self._models.get(name)
            if m is not None and m.versions:
                rows.extend(RepositoryEntry(name, str(v), "READY") for v in sorted(m.versions))
            elif ready_only:
                continue
            elif m is not None and m.busy:
                rows.append(RepositoryEntry(name, state=m.busy))
            elif m is not None and m.reason:
                rows.append(RepositoryEntry(name, state="UNAVAILABLE", reason=m.reason))
            else:
                rows.append(RepositoryEntry(name))
        return rows

    async def load(self, name: str, config: str | None = None, files: Mapping[str, bytes] | None = None) -> None:
        self._check_open()
        try:
            self._control.check_explicit()
            override = parse_config_override(name, config) if config is not None else None
            async with self._lock:
                target, tmp = self._explicit_target(name, override, files)
                m = self._models.setdefault(name, _Model(name))
                try:
                    await self._load_explicit(m, target)
                except BaseException:
                    if tmp is not None:
                        tmp.cleanup()
                    raise
                old, m.files = m.files, tmp     # the versions now serving were loaded from here
                if old is not None and old is not tmp:
                    old.cleanup()
        except ModelControlError as e:
            raise InferError(e.code, f"load failed for model '{name}': {e.message}") from None

    async def _load_explicit(self, m: _Model, target: ModelTarget) -> None:
        if is_ensemble(target.config):
            await self._load_composing(target.config, {m.name})
            self._want(target, explicit=True)
            await self._refresh_ensembles()
        else:
            try:
                await self._apply(target, explicit=True)
            finally:
                await self._refresh_ensembles()
        if not m.versions:
            raise ModelControlError(m.reason, code="INVALID_ARG")

    def _check_open(self) -> None:
        if self._lock is None or self._closed:
            raise InferError("UNAVAILABLE", "the model repository is not running")

    def _explicit_target(self, name: str, override: ModelConfig | None, files: Mapping[str, bytes] | None):
        if not files:
            return self._control.load(name, override), None
        if override is None:
            raise InferError("INVALID_ARG", f"failed to load '{name}': the 'config' parameter must be given "
                                            "together with model files ('file:<path>')")
        tmp, model_dir = write_model_files(name, files)
        return resolve_target(snapshot_model(model_dir), gpu_count=self._gpu_count, override=override), tmp

    async def _load_composing(self, config: ModelConfig, seen: set[str]) -> None:
        """Explicit mode: load the ensemble's composing models that are not loaded (recursively)."""
        for step in ensemble_steps(config):
            dep = step.model_name
            if dep in seen or self.model_versions(dep):
                continue
            seen.add(dep)
            try:
                target = self._control.load(dep)
            except ModelControlError:
                continue           # the ensemble's validation names the missing model
            if is_ensemble(target.config):
                await self._load_composing(target.config, seen)
                self._want(target, explicit=False)
                continue
            try:
                await self._apply(target, explicit=False)
            except ModelControlError:
                pass               # recorded on the model; the ensemble's validation reports it

    async def unload(self, name: str, unload_dependents: bool = False) -> None:
        self._check_open()
        try:
            self._control.unload(name)
        except ModelControlError as e:
            raise InferError(e.code, f"failed to unload '{name}': {e.message}") from None
        async with self._lock:
            m = self._models.get(name)
            if m is None:
                if name in {e.name for e in self.index()}:
                    return
                raise InferError("INVALID_ARG", f"failed to unload '{name}', no version is available")
            composing = self._composing_closure(name) if unload_dependents else []
            await self._unload(m, UNLOADED)
            for dep in composing:
                d = self._models.get(dep)
                if d is not None and not d.explicit and not self._used_by_ensemble(dep):
                    await self._unload(d, UNLOADED)
            await self._refresh_ensembles()

    def _composing_closure(self, name: str) -> list[str]:
        found: list[str] = []
        stack = list(self._steps_of(name) or ())
        while stack:
            dep = stack.pop()
            if dep not in found and dep != name:
                found.append(dep)
                stack.extend(self._steps_of(dep) or ())
        return found

    def _used_by_ensemble(self, name: str) -> bool:
        return any(name in (self._steps_of(other) or ()) for other, m in self._models.items()
                   if m.target is not None)


class _Latest:
    """``model(name)`` without a version: every call goes to the latest ready version at that moment."""

    def __init__(self, repo: ModelRepository, name: str):
        self._repo, self.name = repo, name

    def _current(self):
        return self._repo._resolve(self.name, LATEST)  # noqa: SLF001 - the repository's own handle

    @property
    def version(self) -> str:
        return self._current().version

    def metadata(self) -> ModelMetadata:
        return self._current().metadata()

    def config(self) -> ModelConfig:
        return self._current().config()

    def ready(self) -> bool:
        try:
            return self._current().ready()
        except InferError:
            return False

    async def infer(self, inputs, **kwargs):
        return await self._current().infer(inputs, **kwargs)

    def infer_stream(self, inputs, **kwargs):
        """A decoupled ensemble's responses (``EnsembleModel.infer_stream``)."""
        return self._current().infer_stream(inputs, **kwargs)

    def statistics(self) -> dict[str, Any]:
        return self._current().statistics()

    def generate(self, text_input: str, parameters: Mapping[str, Any]):
        return self._current().generate(text_input, parameters)


def _config_of(m: _Model | None) -> ModelConfig | None:
    if m is None:
        return None
    if m.target is not None and m.target.config is not None:
        return m.target.config
    return next((served.config() for served in m.versions.values()), None)


def _parse_version(version: str) -> int:
    text = str(version)
    if not text.isascii() or not text.isdigit():
        raise InferError("INVALID_ARG", f"failed to get model version from specified version string '{text}'")
    return int(text)
