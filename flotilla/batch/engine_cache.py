"""Which engine a batch worker runs, and one engine per worker process.

- ``resolve_engine(model=..., config=..., model_name=..., engine_kwargs=...)``: the ``EngineArgs`` of a batch
  job (and the model's Ray settings), from a model (alias, HF directory or .gguf) or from a deployment file's
  model entry (its ``ModelSpec.engine_args()`` and ``ray:`` section: the same settings ``flotilla serve
  --config`` uses), with overrides on top. Resolved where the job is defined (the Spark or Ray Data driver);
  workers only receive the result.
- ``PROCESS_ENGINES.get(args, on_load=None)``: this process's ``LLM`` for ``args``. A Spark Python worker or
  a Ray Data actor builds its engine once and reuses it for every batch, and (Spark) for every later job in
  the same session whose engine settings are equal. The cache holds one engine: settings that differ replace
  it (the old engine is shut down first, so a worker never holds two models' memory).

Nothing here imports torch until an engine is built.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flotilla.engine.arg_utils import EngineArgs


@dataclass(frozen=True)
class BatchEngine:
    """The resolved engine of a batch job: ``args`` (one engine's ``EngineArgs``) and ``ray`` (the deployment
    file model's ``ray:`` settings, e.g. ``num_cpus``; empty without a file)."""

    args: EngineArgs
    ray: Mapping[str, Any] = field(default_factory=dict)


def resolve_engine(model: str | None = None, *, config: str | None = None, model_name: str | None = None,
                   engine_kwargs: Mapping[str, Any] | None = None) -> BatchEngine:
    """The engine of a batch job.

    ``model``: an alias, HF directory or .gguf file (None: the embedded default). ``config``: a deployment
    file instead (not both); ``model_name`` picks its model entry by name (needed when the file has several
    models). ``engine_kwargs``: ``EngineArgs`` fields that override either (e.g. ``max_num_seqs``,
    ``num_threads``). Raises ``ValueError`` for a bad combination or an unknown engine setting, and the
    deployment file's ``DeploymentConfigError`` for a bad file.
    """
    if config is not None and model is not None:
        raise ValueError("give a model or a deployment file (config=...), not both")
    if model_name is not None and config is None:
        raise ValueError("model_name picks a model of a deployment file: it needs config=...")
    if config is None:
        args, ray_settings = EngineArgs(model=model), {}
    else:
        spec = _spec_from_file(config, model_name)
        args, ray_settings = spec.engine_args(), dict(spec.ray)
    overrides = dict(engine_kwargs or {})
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown engine setting(s) {', '.join(unknown)} (EngineArgs fields: "
                         f"{', '.join(sorted(fields))})")
    return BatchEngine(dataclasses.replace(args, **overrides), ray_settings)


def _spec_from_file(path: str, model_name: str | None):
    from flotilla.deploy.config import load_deployment_config
    deployment = load_deployment_config(path)
    names = deployment.model_names
    if model_name is not None:
        if model_name not in names:
            raise ValueError(f"{path}: no model named {model_name!r} (models: {', '.join(names) or 'none'})")
        return deployment.model(model_name)
    if len(names) != 1:
        raise ValueError(f"{path} has {len(names)} models ({', '.join(names) or 'none'}): name one with "
                         "model_name=...")
    return deployment.models[0]


def engine_key(args: EngineArgs) -> str:
    """A stable text key of ``args``: equal settings, equal key (``served_model_name``, a label that changes
    no output, is left out, so a deployment file's entry and the same model given directly share an engine)."""
    settings = dataclasses.asdict(args)
    settings.pop("served_model_name", None)
    return json.dumps(settings, sort_keys=True, default=repr)


class EngineCache:
    """At most one ``LLM`` per process, keyed by its ``EngineArgs``; thread-safe.

    ``get(args, on_load)`` returns the cached engine when ``engine_key(args)`` matches, else shuts the
    cached one down, builds a new one and calls ``on_load()`` once (e.g. a Spark accumulator's ``add``).
    ``loads`` counts the engines this process has built. The engine itself runs one ``generate`` at a time:
    callers that share it across threads hold ``lock`` around their calls.
    """

    def __init__(self):
        self.lock = threading.RLock()
        self.loads = 0
        self._key: str | None = None
        self._llm = None

    def get(self, args: EngineArgs, on_load: Callable[[], Any] | None = None):
        key = engine_key(args)
        with self.lock:
            if self._llm is not None and self._key == key:
                return self._llm
            self.clear()
            from flotilla.engine.llm import LLM
            self._llm = LLM.from_engine_args(args)
            self._key = key
            self.loads += 1
            if on_load is not None:
                on_load()
            return self._llm

    def clear(self) -> None:
        """Shut the cached engine down (if any)."""
        with self.lock:
            llm, self._llm, self._key = self._llm, None, None
            if llm is not None and hasattr(llm.engine, "shutdown"):
                llm.engine.shutdown()


PROCESS_ENGINES = EngineCache()
