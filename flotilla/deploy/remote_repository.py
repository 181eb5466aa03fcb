"""RemoteRepository: the ``InferenceService`` of a model repository served on Ray Serve, for the ingress.

The ingress builds the same KServe v2 routes as embedded mode over it: each repository model is its own Serve
deployment (``RepositoryModelServer`` replicas, ``flotilla.deploy.ray_repository``), reached through its
deployment handle. Requests and answers cross as ``flotilla.deploy.tensor_wire`` bytes, never pickle.

Contract:
- ``model(name, version)`` answers from the latest state the replicas reported (never a call per read):
  a ``RemoteModel`` for a loaded version (no version: the latest ready one, resolved in the replica when the
  request runs); Triton's NOT_FOUND messages for an unknown model or version, for a model the plan left
  UNAVAILABLE ("has no available versions") and for a deployed model whose replicas report no loaded version;
  UNAVAILABLE while a deployment has not reported yet. (A request to a deployment whose replicas are being
  replaced waits in Serve's queue for the replacement.)
- ``RemoteModel.infer`` sends the request to one replica (Serve's request router) and returns its outputs, or
  raises the replica's ``InferError`` unchanged (Triton's code and message). A replica that dies before it
  answers is UNAVAILABLE ("retry it"; the request is not re-sent: nothing says it did not run). Cancelling the
  call (client gone) cancels it in the replica (a queued request leaves its batcher's queue).
- State refresh: ``start()`` runs ``refresh()`` every ``refresh_period_s`` (``NOT_READY_PERIOD_S`` while a
  deployment is not ready) on the running loop: every replica of every deployment reports its versions,
  metadata, config and statistics. ``refresh_statistics()`` refreshes now (the v2 ``.../stats`` routes call
  it, so statistics include every request answered before). A version's statistics are the sum over the
  replicas (``merge_statistics``); metadata and config come from the first replica that has the version.
- ``ready()``: strict readiness (the default) is every deployed model with a ready version on some replica and
  no model UNAVAILABLE; otherwise True once the first refresh has run. ``live()`` until ``close()``.
- ``index()``: the deployed models' versions as their replicas report them (LOADING before the first report,
  UNAVAILABLE with the reason when no replica answers), the plan's UNAVAILABLE models with their reasons, the
  models not loaded (explicit mode) without a state.
- ``load`` / ``unload`` raise UNSUPPORTED (HTTP 501): the deployments are fixed when the application is
  deployed; redeploy to change them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import flotilla
from flotilla.deploy.aio_util import NOT_READY_PERIOD_S
from flotilla.deploy.ray_repository import RepositoryPlan, deployment_name
from flotilla.deploy.tensor_wire import (INFER_MESSAGE, INFER_RESULT, MODEL_INFO, InferFailure, InferMessage,
                                         ModelInfo, VersionInfo, tensor_from_wire, tensor_to_wire)
from flotilla.repository.config import ModelConfig
from flotilla.repository.errors import InferError
from flotilla.repository.service import InferOutcome, ModelMetadata, RepositoryEntry, TensorMetadata

logger = logging.getLogger(__name__)

REFRESH_PERIOD_S = 2.0
INFO_TIMEOUT_S = 10.0
EXTENSIONS = ("model_repository", "model_configuration", "schedule_policy", "statistics")
FIXED_DEPLOYMENTS = ("on Ray Serve each repository model is a deployment fixed when the application was deployed; "
                     "change the repository or load_models and redeploy (flotilla serve --ray)")


@dataclass
class _Version:
    """One version as the replicas report it: ``info`` from the first replica that has it, ``ready`` on any,
    ``statistics`` summed over them."""

    info: VersionInfo
    ready: bool
    statistics: dict[str, Any]
    pending: int = 0


class _Deployment:
    """One repository model's deployment seen from the ingress: its handle and its replicas' last reports."""

    def __init__(self, name: str, handle):
        self.name, self.handle = name, handle
        self.versions: dict[str, _Version] = {}
        self.rows: list[RepositoryEntry] = [RepositoryEntry(name, state="LOADING")]
        self.reported = False           # some replica answered once
        self.reachable = False          # the last refresh reached a replica
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self.reachable and any(v.ready for v in self.versions.values())

    def latest(self) -> str | None:
        ready = [v for v, s in self.versions.items() if s.ready]
        return max(ready, key=int) if ready else None

    async def refresh(self) -> None:
        async with self._lock:
            try:
                results = await self.handle.broadcast("info").results_async(timeout_s=INFO_TIMEOUT_S,
                                                                           return_exceptions=True)
            except Exception as e:  # noqa: BLE001 - no replica (starting, or all gone)
                self._unreachable(e)
                return
            infos = [MODEL_INFO.decode(r) for r in results if isinstance(r, (bytes, bytearray))]
            if not infos:
                self._unreachable(next((r for r in results if isinstance(r, BaseException)), None))
                return
            self._apply(infos)

    def _unreachable(self, error: BaseException | None) -> None:
        self.reachable = False
        if error is not None:
            logger.debug("repository model %s: no report (%s)", self.name, error)
        if self.reported:
            reason = f"no replica of its Ray Serve deployment {deployment_name(self.name)} answers"
            self.rows = [RepositoryEntry(self.name, state="UNAVAILABLE", reason=reason)]

    def _apply(self, infos: list[ModelInfo]) -> None:
        versions: dict[str, _Version] = {}
        for info in infos:
            for v in info.versions:
                seen = versions.get(v.version)
                if seen is None:
                    versions[v.version] = _Version(v, v.ready, v.statistics, v.pending)
                else:
                    seen.ready = seen.ready or v.ready
                    seen.statistics = merge_statistics([seen.statistics, v.statistics])
                    seen.pending += v.pending
        self.versions = dict(sorted(versions.items(), key=lambda kv: int(kv[0])))
        if versions:
            self.rows = [RepositoryEntry(self.name, v, "READY" if s.ready else "UNAVAILABLE")
                         for v, s in self.versions.items()]
        else:
            first = infos[0].rows or []
            self.rows = [RepositoryEntry(self.name, r.version, r.state, r.reason) for r in first] or \
                [RepositoryEntry(self.name)]
        self.reported = self.reachable = True

    async def infer(self, message: bytes) -> bytes:
        response = self.handle.infer.remote(message)
        try:
            return await response
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                response.cancel()
            raise


class RemoteRepository:
    """The ``InferenceService`` of a repository on Ray Serve (see the module contract). ``plan``: what was
    deployed; ``handles``: model name -> its deployment handle."""

    def __init__(self, plan: RepositoryPlan, handles: Mapping[str, Any], *,
                 refresh_period_s: float = REFRESH_PERIOD_S):
        missing = sorted(set(plan.deployed) - set(handles))
        if missing:
            raise ValueError(f"no deployment handle for repository model(s) {missing}")
        self.plan = plan
        self.deployments = {name: _Deployment(name, handles[name]) for name in plan.deployed}
        self.refresh_period_s = refresh_period_s
        self._task: asyncio.Task | None = None
        self._refreshed = self._closed = False

    # ---- state -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the periodic refresh on the running loop (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._refresh_loop(), name="repository-refresh")

    async def _refresh_loop(self) -> None:
        while not self._closed:
            with contextlib.suppress(Exception):
                await self.refresh()
            all_ready = all(d.ready for d in self.deployments.values())
            await asyncio.sleep(self.refresh_period_s if all_ready else min(self.refresh_period_s,
                                                                            NOT_READY_PERIOD_S))

    async def refresh(self) -> None:
        """Ask every replica of every deployment for its report now."""
        await asyncio.gather(*(d.refresh() for d in self.deployments.values()))
        self._refreshed = True

    async def refresh_statistics(self) -> None:
        await self.refresh()

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()

    # ---- InferenceService ----------------------------------------------------------------------------
    def live(self) -> bool:
        return not self._closed

    def ready(self) -> bool:
        if self._closed or not self._refreshed:
            return False
        if not self.plan.strict_readiness:
            return True
        return not self.plan.unavailable and all(d.ready for d in self.deployments.values())

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "flotilla", "version": flotilla.__version__, "extensions": list(EXTENSIONS)}

    def model(self, name: str, version: str | None = None) -> "RemoteModel":
        d = self.deployments.get(name)
        if d is None:
            if name in self.plan.unavailable:
                raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' has no available versions")
            raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' is not found")
        if not d.reported:
            raise InferError("UNAVAILABLE", f"model '{name}' is not ready: its Ray Serve deployment "
                                            f"{deployment_name(name)} has not reported a replica yet")
        if version in (None, ""):
            if d.latest() is None:
                raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' has no available versions")
            return RemoteModel(d, None)
        if version not in d.versions:
            raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' version {version} is not found")
        return RemoteModel(d, version)

    def model_versions(self, name: str) -> Sequence[str]:
        d = self.deployments.get(name)
        return list(d.versions) if d is not None else []

    def index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        rows: list[RepositoryEntry] = []
        for name in self.plan.names:
            if name in self.deployments:
                rows.extend(self.deployments[name].rows)
            elif name in self.plan.unavailable:
                rows.append(RepositoryEntry(name, state="UNAVAILABLE", reason=self.plan.unavailable[name]))
            else:
                rows.append(RepositoryEntry(name))
        return [r for r in rows if r.state == "READY"] if ready_only else rows

    async def load(self, name: str, config: str | None = None, files: Mapping[str, bytes] | None = None) -> None:
        raise InferError("UNSUPPORTED", f"load failed for model '{name}': {FIXED_DEPLOYMENTS}")

    async def unload(self, name: str, unload_dependents: bool = False) -> None:
        raise InferError("UNSUPPORTED", f"failed to unload '{name}': {FIXED_DEPLOYMENTS}")


class RemoteModel:
    """One repository model version (``version`` None: the latest ready one) behind its deployment, as a
    ``ServedModel``. ``version`` is the one that served the last ``infer`` (before any: the latest ready)."""

    def __init__(self, deployment: _Deployment, version: str | None):
        self._d, self._asked = deployment, version
        self.name = deployment.name
        self.version = version or deployment.latest() or ""

    def _state(self) -> _Version:
        state = self._d.versions.get(self.version)
        if state is None:
            raise InferError("NOT_FOUND", f"Request for unknown model: '{self.name}' version {self.version} is "
                                          f"not found")
        return state

    def metadata(self) -> ModelMetadata:
        info = self._state().info

        def tensors(items) -> tuple[TensorMetadata, ...]:
            return tuple(TensorMetadata(t.name, t.datatype, tuple(t.shape)) for t in items)
        return ModelMetadata(self.name, tuple(self._d.versions), info.platform, tensors(info.inputs),
                             tensors(info.outputs))

    def config(self) -> ModelConfig:
        return ModelConfig.FromString(self._state().info.config)

    def ready(self) -> bool:
        state = self._d.versions.get(self.version)
        return self._d.reachable and state is not None and state.ready

    def statistics(self) -> dict[str, Any]:
        return self._state().statistics

    def pending_request_count(self) -> int:
        """Requests queued in the version's batchers of every replica, at their last report."""
        return self._state().pending

    async def infer(self, inputs, *, requested_outputs: Sequence[str] = (), parameters=None, priority: int = 0,
                    timeout_us: int = 0) -> InferOutcome:
        message = InferMessage(self.name, self._asked or "", [tensor_to_wire(n, a) for n, a in inputs.items()],
                               list(requested_outputs), dict(parameters or {}), priority, timeout_us)
        try:
            data = await self._d.infer(INFER_MESSAGE.encode(message))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - Ray's errors never reach the client
            raise _replica_error(self.name, e) from None
        result = INFER_RESULT.decode(data)
        if isinstance(result, InferFailure):
            raise InferError(result.code, result.message)
        self.version = result.version
        return InferOutcome({t.name: tensor_from_wire(t) for t in result.outputs}, dict(result.parameters))

    def generate(self, text_input: str, parameters: Mapping[str, Any]):
        raise InferError("UNSUPPORTED", f"model '{self.name}' does not support the generate extension (it is "
                                        f"not an LLM)")


def _replica_error(name: str, e: BaseException) -> InferError:
    from ray.exceptions import RayActorError
    cause = getattr(e, "cause", None)
    if isinstance(e, RayActorError) or isinstance(cause, RayActorError):
        return InferError("UNAVAILABLE", f"model '{name}': the replica serving the request stopped before it "
                                         f"answered; retry it")
    logger.error("repository model %s: request failed: %s: %s", name, type(e).__name__, str(e).strip()[-500:])
    return InferError("INTERNAL", f"model '{name}': the request failed in its replica")


def merge_statistics(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Triton ``ModelStatistics`` JSON of several replicas of one version as one: counts and durations summed
    (``batch_stats`` per batch size), ``last_inference`` the latest."""
    out = copy.deepcopy(stats[0])
    for s in stats[1:]:
        out = _add(out, s)
    return out


def _add(a: Any, b: Any, key: str = "") -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _add(a[k], b[k], k) if k in a and k in b else copy.deepcopy(a.get(k, b.get(k)))
                for k in {**a, **b}}
    if key == "batch_stats" and isinstance(a, list) and isinstance(b, list):
        by_size = {e["batch_size"]: e for e in a}
        for e in b:
            size = e["batch_size"]
            by_size[size] = _add(by_size[size], e) if size in by_size else copy.deepcopy(e)
        return [by_size[size] for size in sorted(by_size)]
    if key == "last_inference":
        return max(a, b)
    if key == "batch_size":
        return a
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a + b
    return a
