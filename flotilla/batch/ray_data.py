"""Ray Data: a processor with the shape of ``ray.data.llm`` running flotilla engines.

    from flotilla.batch.ray_data import FlotillaEngineProcessorConfig, build_processor

    config = FlotillaEngineProcessorConfig(model_source="smollm2-135m-instruct", batch_size=64, concurrency=2)
    processor = build_processor(
        config,
        preprocess=lambda row: dict(messages=[{"role": "user", "content": row["question"]}],
                                    sampling_params=dict(temperature=0, max_tokens=64)),
        postprocess=lambda row: dict(answer=row["generated_text"], **row))
    ds = processor(ray.data.read_parquet(...))

``build_processor(config, preprocess, postprocess)`` returns a ``Processor``; ``processor(ds)`` is lazy, as any
Ray Data transformation: ``ds.map(preprocess)`` (its output is merged into the row) ->
``ds.map_batches(FlotillaEngineStage, compute=ActorPoolStrategy(size=concurrency), batch_size=...)`` ->
``ds.map(postprocess)`` (its output is the row; without one every column is kept).

Rows: ``prompt`` (text) or ``messages`` (a chat conversation, rendered with the model's chat template), and
optionally ``sampling_params`` (a dict of ``SamplingParams`` fields for that row; default: the config's).
The engine stage adds ``generated_text``, ``generated_tokens``, ``num_input_tokens``,
``num_generated_tokens`` and ``finish_reason`` (ray.data.llm's names) and keeps every other column.

Engines: ``concurrency`` engine replicas, each one Ray actor of the stage's fixed actor pool holding one
engine for all its batches. A replica with ``tensor_parallel_size * pipeline_parallel_size`` > 1 runs on
flotilla's Ray executor: its ranks are Ray actors in a placement group of one ``{"CPU": 1}`` bundle per rank
(PACK; may span nodes), created by the replica, which then needs no CPU itself (as Ray Serve replicas).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flotilla.batch.engine_cache import PROCESS_ENGINES, resolve_engine
from flotilla.batch.rows import generate_rows, plain, sampling_params_from
from flotilla.engine.arg_utils import EngineArgs
from flotilla.sampling_params import SamplingParams

OUTPUT_COLUMNS = ("generated_text", "generated_tokens", "num_input_tokens", "num_generated_tokens",
                  "finish_reason")


@dataclass(frozen=True)
class FlotillaEngineProcessorConfig:
    """A flotilla engine processor (the counterpart of ``ray.data.llm.vLLMEngineProcessorConfig``).

    ``model_source``: alias, HF directory or .gguf (None: the embedded default), or ``config``: a deployment
    file (``model_name`` picks its model entry when it has several); its engine settings and its ``ray:``
    ``num_cpus`` apply. ``engine_kwargs``: ``EngineArgs`` fields on top. ``sampling_params``: the default of
    rows without their own. ``batch_size``: rows per engine call. ``concurrency``: engine replicas (a fixed
    actor pool). ``num_cpus``: CPUs reserved per replica actor (default: the file's ``ray.num_cpus``, else
    1 for one rank and 0 for several, whose placement group holds the CPUs).
    ``max_tasks_in_flight_per_actor``: passed to ``ActorPoolStrategy`` (None: Ray Data's default).
    Invalid values raise ``ValueError`` on construction.
    """

    model_source: str | None = None
    config: str | None = None
    model_name: str | None = None
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)
    sampling_params: SamplingParams | Mapping[str, Any] | None = None
    batch_size: int = 32
    concurrency: int = 1
    num_cpus: float | None = None
    max_tasks_in_flight_per_actor: int | None = None

    def __post_init__(self):
        for name in ("batch_size", "concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_cpus is not None and not self.num_cpus >= 0:
            raise ValueError(f"num_cpus must be >= 0, got {self.num_cpus!r}")
        sampling_params_from(self.sampling_params)  # fails now, not in an actor

    def resolve(self) -> tuple[EngineArgs, float]:
        """The replicas' ``EngineArgs`` (several ranks: the Ray executor) and CPUs per replica actor."""
        engine = resolve_engine(self.model_source, config=self.config, model_name=self.model_name,
                                engine_kwargs=self.engine_kwargs)
        args = engine.args
        world = args.tensor_parallel_size * args.pipeline_parallel_size
        if world > 1 and args.distributed_executor_backend is None:
            args = dataclasses.replace(args, distributed_executor_backend="ray")
        if world > 1 and args.distributed_executor_backend != "ray":
            raise ValueError(f"a replica of {world} ranks in Ray Data runs them on the Ray executor, got "
                             f"distributed_executor_backend={args.distributed_executor_backend!r}")
        num_cpus = self.num_cpus if self.num_cpus is not None else engine.ray.get("num_cpus", 1 if world == 1 else 0)
        return args, float(num_cpus)

    def map_batches_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the engine stage's ``Dataset.map_batches`` call."""
        import ray.data
        args, num_cpus = self.resolve()
        pool = {"size": self.concurrency}
        if self.max_tasks_in_flight_per_actor is not None:
            pool["max_tasks_in_flight_per_actor"] = self.max_tasks_in_flight_per_actor
        return dict(compute=ray.data.ActorPoolStrategy(**pool), batch_size=self.batch_size, num_cpus=num_cpus,
                    fn_constructor_kwargs={"engine_args": args, "sampling_params":
                                           sampling_params_from(self.sampling_params)})


class FlotillaEngineStage:
    """The ``map_batches`` callable class: one engine per actor, built in ``__init__``.

    ``__call__(batch)``: a batch (dict of column -> numpy array) with ``prompt`` or ``messages`` (and
    optionally ``sampling_params``) -> the same columns plus ``OUTPUT_COLUMNS``, rows in order. When Ray
    Data lets the actor exit (the pool is done), ``__del__`` shuts the engine down (a tensor-parallel one's
    rank actors and placement group included)."""

    def __init__(self, engine_args: EngineArgs, sampling_params: SamplingParams):
        self.args = engine_args
        self.default_params = sampling_params
        self.llm = PROCESS_ENGINES.get(engine_args)

    def __del__(self):
        self.llm = None
        PROCESS_ENGINES.clear()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        size = len(next(iter(batch.values()))) if batch else 0
        inputs = [_row_input(batch, i) for i in range(size)]
        given = batch.get("sampling_params")
        params = [sampling_params_from(None if given is None else plain(given[i]), self.default_params)
                  for i in range(size)]
        with PROCESS_ENGINES.lock:
            results = generate_rows(self.llm, inputs, params)
        out = dict(batch)
        out["generated_text"] = [r.text for r in results]
        out["generated_tokens"] = [r.token_ids for r in results]
        out["num_input_tokens"] = [r.prompt_tokens for r in results]
        out["num_generated_tokens"] = [r.completion_tokens for r in results]
        out["finish_reason"] = [r.finish_reason for r in results]
        return out


def _row_input(batch: dict[str, Any], i: int):
    """Row ``i``'s prompt (str) or conversation (list of dicts); ValueError when it has neither."""
    messages = batch.get("messages")
    if messages is not None and messages[i] is not None:
        return plain(messages[i])
    prompts = batch.get("prompt")
    if prompts is not None and prompts[i] is not None:
        return str(prompts[i])
    raise ValueError("each row needs a 'prompt' (text) or 'messages' (a chat conversation) column; got "
                     f"columns {sorted(batch)}")


class Processor:
    """preprocess -> the engine stage -> postprocess over a Ray Dataset (see the module docstring)."""

    def __init__(self, config: FlotillaEngineProcessorConfig, preprocess: Callable | None = None,
                 postprocess: Callable | None = None, preprocess_map_kwargs: Mapping[str, Any] | None = None,
                 postprocess_map_kwargs: Mapping[str, Any] | None = None):
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.preprocess_map_kwargs = dict(preprocess_map_kwargs or {})
        self.postprocess_map_kwargs = dict(postprocess_map_kwargs or {})
        self.stage_kwargs = config.map_batches_kwargs()  # resolves the engine now (errors before any job)

    def __call__(self, dataset):
        if self.preprocess is not None:
            dataset = dataset.map(_merge_into_row(self.preprocess), **self.preprocess_map_kwargs)
        dataset = dataset.map_batches(FlotillaEngineStage, **self.stage_kwargs)
        if self.postprocess is not None:
            dataset = dataset.map(self.postprocess, **self.postprocess_map_kwargs)
        return dataset


def _merge_into_row(fn: Callable) -> Callable:
    """``row -> {**row, **fn(row)}`` (ray.data.llm's preprocess keeps the input columns)."""
    def preprocess(row: dict) -> dict:
        return {**row, **fn(row)}
    return preprocess


def build_processor(config: FlotillaEngineProcessorConfig, preprocess: Callable | None = None,
                    postprocess: Callable | None = None, preprocess_map_kwargs: Mapping[str, Any] | None = None,
                    postprocess_map_kwargs: Mapping[str, Any] | None = None) -> Processor:
    """The processor of ``config`` (``ray.data.llm.build_processor``'s signature); ``*_map_kwargs`` go to the
    ``Dataset.map`` calls of preprocess and postprocess (e.g. ``num_cpus``)."""
    if not isinstance(config, FlotillaEngineProcessorConfig):
        raise TypeError(f"expected a FlotillaEngineProcessorConfig, got {type(config).__name__} (for Ray's own "
                        "configs use ray.data.llm.build_processor)")
    return Processor(config, preprocess, postprocess, preprocess_map_kwargs, postprocess_map_kwargs)
