"""``ServedModels``: the models (and route aliases) one OpenAI endpoint serves, and which serves a request.

A request's ``model`` is a model name or a route alias; an alias picks one of its targets by weight
(``flotilla.deploy.routing.choose_weighted``: seeded, or sticky per ``user``), and the response names the
target that served it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping

from flotilla.deploy.routing import choose_weighted
from flotilla.entrypoints.openai.admission import RequestTracker
from flotilla.entrypoints.openai.cli_args import ServerConfig
from flotilla.entrypoints.openai.errors import APIError
from flotilla.entrypoints.openai.generation import ServingContext, TokenizerLanes
from flotilla.entrypoints.openai.metrics import ServerMetrics


class ServedModels:
    """Model name -> ``ServingContext`` for one app, plus aliases, and the app-wide state they share.

    Contract: ``engines`` is ``{name: EngineClient}`` (file order is kept for ``/v1/models``), or one engine,
    served as ``config.served_model_name``. ``routes`` is ``{alias: {model name: weight}}``; aliases must not
    be model names, targets must be model names, weights finite and >= 0 with a positive sum (ValueError
    otherwise). ``resolve(name, user)`` returns the context of the model that serves a request: the model
    itself, or for an alias a target drawn by weight (from ``random.Random(seed)``; with ``user``, the same
    user always gets the same target); ``name`` None is allowed only when exactly one model is served
    (else 400); an unknown name is a 404 naming it, ``param`` "model"; with ``runner`` ("generate" for the
    generation routes, "pooling" for /v1/embeddings) a model of the other kind is a 400 naming ``model``
    (as vLLM answers an API its model does not support; a route's targets are all of one kind). The app shares one ``tracker``
    (in-flight count, draining), one pair of tokenizer lanes, one metrics registry (``model_name`` label per
    model) and one set of active runs. ``is_dead`` is True when any engine is dead; ``not_ready`` names the
    models whose engine reports ``is_ready`` False (an optional member: remote engines before a replica is
    up; engines without it are ready once built). ``allow_empty``: no engines is allowed (a server of
    model-repository models only, answering the KServe v2 routes). Event-loop thread only.
    """

    def __init__(self, engines, config: ServerConfig, routes: Mapping[str, Mapping[str, float]] | None = None,
                 seed: int | None = None, allow_empty: bool = False):
        if not isinstance(engines, Mapping):
            engines = {config.served_model_name: engines}
        if not engines and not allow_empty:
            raise ValueError("no models to serve")
        self.config = config
        self.tracker = RequestTracker()
        self.metrics = ServerMetrics(config.metrics_prefixes,
                                     max((e.model_config.max_model_len for e in engines.values()), default=8192))
        self.lanes = TokenizerLanes()
        self.active_runs: set = set()
        self.created = int(time.time())
        self.contexts: dict[str, ServingContext] = {
            name: ServingContext(engine, config, name, self.metrics.add_model(name, engine), self.tracker,
                                 self.lanes, self.active_runs, self.created)
            for name, engine in engines.items()}
        self.routes = _check_routes(routes or {}, {name: ctx.runner for name, ctx in self.contexts.items()})
        self._rng = random.Random(seed)
        self.kserve = None  # the app's KServe v2 InferenceService (build_app sets it)

    @property
    def model_names(self) -> list[str]:
        return list(self.contexts)

    @property
    def aliases(self) -> list[str]:
        return list(self.routes)

    @property
    def engines(self) -> dict:
        return {name: ctx.engine for name, ctx in self.contexts.items()}

    def resolve(self, name: str | None, user: str | None = None, runner: str | None = None) -> ServingContext:
        """The context of the model serving a request for ``name`` (see the class contract)."""
        return _check_runner(self._resolve(name, user), runner)

    def _resolve(self, name: str | None, user: str | None) -> ServingContext:
        if name is None:
            if len(self.contexts) == 1:
                return next(iter(self.contexts.values()))
            raise APIError(400, f"the request must name a model (served: {', '.join(self.ids())})", "model")
        ctx = self.contexts.get(name)
        if ctx is not None:
            return ctx
        weights = self.routes.get(name)
        if weights is None:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        return self.contexts[choose_weighted(weights, self._rng, sticky_key=user)]

    def ids(self) -> list[str]:
        """Every name a request may use: models, then aliases."""
        return self.model_names + self.aliases

    def card(self, name: str) -> dict:
        """The ``/v1/models`` entry of a model or alias (404 APIError for an unknown name)."""
        ctx = self.contexts.get(name)
        if ctx is not None:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "flotilla",
                    "root": ctx.engine.model_config.model, "parent": None, "max_model_len": ctx.max_model_len}
        weights = self.routes.get(name)
        if weights is None:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        return {"id": name, "object": "model", "created": self.created, "owned_by": "flotilla", "root": None,
                "parent": None, "max_model_len": min(self.contexts[t].max_model_len for t in weights),
                "flotilla_route": dict(weights)}

    def cards(self) -> list[dict]:
        return [self.card(name) for name in self.ids()]

    @property
    def is_dead(self) -> bool:
        return any(ctx.engine.is_dead for ctx in self.contexts.values())

    @property
    def not_ready(self) -> list[str]:
        """Models whose engine says it cannot serve yet (``is_ready`` False), in file order."""
        return [name for name, ctx in self.contexts.items() if not getattr(ctx.engine, "is_ready", True)]

    @property
    def dead_error(self) -> str | None:
        """``name: error`` of every dead engine, or None when all are alive."""
        dead = [f"{name}: {ctx.engine.dead_error}" for name, ctx in self.contexts.items() if ctx.engine.is_dead]
        return "; ".join(dead) or None

    def abort_all(self) -> int:
        """Abort every engine request in flight (their streams end, unfinished); returns how many runs."""
        runs = list(self.active_runs)
        for run in runs:
            run.abort()
        return len(runs)

    def close(self) -> None:
        """Stop the tokenizer lanes (engines belong to whoever created them)."""
        self.lanes.shutdown()


def _check_runner(ctx: ServingContext, runner: str | None) -> ServingContext:
    if runner is None or ctx.runner == runner:
        return ctx
    if ctx.runner == "pooling":
        raise APIError(400, f"The model `{ctx.model_name}` is an embedding model: it serves /v1/embeddings, not "
                            f"text generation.", "model")
    raise APIError(400, f"The model `{ctx.model_name}` is a generative model and does not support the Embeddings "
                        f"API.", "model")


def _check_routes(routes: Mapping[str, Mapping[str, float]],
                  models: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """``routes`` checked against ``models`` (name -> runner)."""
    out = {}
    for alias, weights in routes.items():
        if alias in models:
            raise ValueError(f"route {alias!r} has the name of a model")
        if not weights:
            raise ValueError(f"route {alias!r} has no targets")
        for target, weight in weights.items():
            if target not in models:
                raise ValueError(f"route {alias!r}: unknown model {target!r}")
        if len({models[t] for t in weights}) > 1:
            raise ValueError(f"route {alias!r} mixes embedding and generative models")
        choose_weighted(weights, random.Random(0))  # ValueError for bad weights
        out[alias] = dict(weights)
    return out
