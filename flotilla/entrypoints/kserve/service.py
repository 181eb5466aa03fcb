"""``KServeService``: the ``InferenceService`` of one ``flotilla serve`` app.

It serves the app's engine models (``LLMModel`` / ``EmbeddingModel``: version "1", always loaded) and, when
given, a model repository's models (every call about another name goes to the repository). The repository
learns the engine models (``set_external_models``, before it starts): its ensembles may use them as steps
(an LLM between a pre- and a post-processing model), and it loads no model of the same name. The repository
API cannot load or unload an engine model (UNSUPPORTED: it changes with the server's configuration); without a
repository, load/unload are UNSUPPORTED. Server metadata lists the protocol extensions the server offers.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flotilla
from flotilla.entrypoints.kserve.infer_call import unsupported
from flotilla.repository.errors import InferError
from flotilla.repository.service import InferenceService, RepositoryEntry, ServedModel

VERSION = "1"
EXTENSIONS = ("binary_tensor_data", "parameters", "statistics", "model_configuration", "schedule_policy")


class KServeService:
    """The app's ``InferenceService``: ``engine_models`` ({name: ServedModel}) and an optional ``repository``."""

    def __init__(self, engine_models: Mapping[str, ServedModel], repository: InferenceService | None = None):
        self.engine_models, self.repository = dict(engine_models), repository
        if repository is not None and hasattr(repository, "set_external_models"):
            repository.set_external_models(self.engine_models)
        names = {e.name for e in repository.index()} if repository is not None else set()
        overlap = sorted(set(self.engine_models) & names)
        if overlap:
            raise ValueError(f"model name(s) {overlap} are both served models and repository models")

    def live(self) -> bool:
        return self.repository is None or self.repository.live()

    def ready(self) -> bool:
        engines = all(m.ready() for m in self.engine_models.values())
        return engines and (self.repository is None or self.repository.ready())

    def server_metadata(self) -> dict[str, Any]:
        """Triton's server metadata: the protocol's extensions plus the repository's."""
        extensions = list(EXTENSIONS)
        if self.repository is not None:
            extensions += [e for e in self.repository.server_metadata().get("extensions", ()) if e not in extensions]
        return {"name": "flotilla", "version": flotilla.__version__, "extensions": extensions}

    def model(self, name: str, version: str | None = None):
        model = self.engine_models.get(name)
        if model is not None:
            if version not in (None, "", VERSION):
                raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' version {version} is not found")
            return model
        if self.repository is not None:
            return self.repository.model(name, version)
        raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' is not found")

    def model_versions(self, name: str) -> Sequence[str]:
        if name in self.engine_models:
            return [VERSION]
        if self.repository is not None:
            return self.repository.model_versions(name)
        raise InferError("NOT_FOUND", f"Request for unknown model: '{name}' is not found")

    def index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        entries = [RepositoryEntry(name, VERSION, "READY" if m.ready() else "UNAVAILABLE")
                   for name, m in self.engine_models.items() if m.ready() or not ready_only]
        return entries + (self.repository.index(ready_only) if self.repository is not None else [])

    def _repository_for(self, name: str, verb: str) -> InferenceService:
        if name in self.engine_models:
            raise unsupported(f"model '{name}' is served from this server's configuration, not its model "
                              f"repository; the repository API cannot {verb} it (restart flotilla serve to change it)")
        if self.repository is None:
            raise unsupported(f"this server has no model repository to {verb} '{name}' from "
                              f"(flotilla serve --model-repository)")
        return self.repository

    async def refresh_statistics(self) -> None:
        """Let a repository whose models run elsewhere (``RemoteRepository`` on Ray Serve) collect their
        statistics now (a no-op for an in-process repository)."""
        refresh = getattr(self.repository, "refresh_statistics", None)
        if refresh is not None:
            await refresh()

    async def load(self, name: str, config: str | None = None, files: Mapping[str, bytes] | None = None) -> None:
        await self._repository_for(name, "load").load(name, config=config, files=files)

    async def unload(self, name: str, unload_dependents: bool = False) -> None:
        await self._repository_for(name, "unload").unload(name, unload_dependents=unload_dependents)
