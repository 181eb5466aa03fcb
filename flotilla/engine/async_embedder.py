"""AsyncEmbedder: an embedding model for the server, next to the ``AsyncLLM``s of generative models.

It has the members of ``EngineClient`` that every served model needs (``config``, ``model_config``,
``tokenizer``, ``input_processor`` for the tokenizer lanes, ``is_dead`` / ``dead_error``, the queue counts,
``latest_stats``, ``shutdown``) and, instead of ``generate``, ``embed(token_ids, params)``. The model runs in
this process, batched by the ``batcher_factory`` it is given: the layers above pass the model repository's
Triton dynamic batcher (``flotilla.repository.embedding_model``), whose worker thread runs the forward
passes; the event loop only awaits. ``make_async_engine(args, embedding_batcher)`` builds the engine a model
needs: this one for an encoder, ``AsyncLLM`` for a decoder.
"""

from __future__ import annotations

import bisect

from flotilla.config import EngineConfig
from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.embedding import Embedder
from flotilla.pooling_params import PoolingParams
from flotilla.scheduler.scheduler import ITERATION_TOKENS_BUCKETS, SchedulerStats


class AsyncEmbedder:
    """Embeddings on a batching worker thread (see the module docstring).

    Contract: ``check_params`` validates ``PoolingParams`` against the model (``InvalidRequestError``);
    ``input_processor.process(input, param)`` tokenizes one input (call it on a tokenizer lane);
    ``await embed(token_ids, params)`` returns the float32 embedding row (a 1-D array) of one processed input, batched
    with whatever else is waiting; ``await embed_many(token_ids_list, params)`` those of one request's inputs,
    which enter the batcher together; ``EngineDeadError`` after ``shutdown()``. ``num_blocks`` is 0 (no KV
    cache); ``latest_stats`` reports the inputs running and waiting and, as vLLM's ``iteration_tokens`` per
    engine step, the tokens of each forward pass (real tokens, not padding).

    ``batcher_factory(run_batch, max_num_seqs, max_num_batched_tokens)`` makes the batcher: an object with
    ``await submit(token_ids, params)`` (the result of ``run_batch`` for that input, batched with others;
    ``EngineDeadError`` once closed), ``await submit_many(token_ids_list, params)`` (several inputs at once), ``close()``, ``num_waiting``, ``num_running`` and ``dead_error``.
    """

    runner = "pooling"

    def __init__(self, config: EngineConfig, batcher_factory):
        self.config = config
        self.model_config = config.model
        self.embedder = Embedder(config)
        self.tokenizer = self.embedder.tokenizer
        self.input_processor = self.embedder.input_processor
        self.output_dim = self.embedder.output_dim
        self.num_blocks = 0
        self._step_counts = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)  # see SchedulerStats.iteration_tokens
        self._step_tokens = 0
        sched = config.scheduler
        self.batcher = batcher_factory(self._run_batch, sched.max_num_seqs, sched.max_num_batched_tokens)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, batcher_factory) -> "AsyncEmbedder":
        return cls(args.create_engine_config(), batcher_factory)

    @property
    def dead_error(self) -> BaseException | None:
        return self.batcher.dead_error

    @property
    def is_dead(self) -> bool:
        return self.batcher.dead_error is not None

    @property
    def num_queued_requests(self) -> int:
        return self.batcher.num_waiting

    @property
    def num_unfinished_requests(self) -> int:
        return self.batcher.num_waiting + self.batcher.num_running

    @property
    def latest_stats(self) -> SchedulerStats:
        return SchedulerStats(self.batcher.num_running, self.batcher.num_waiting, 0.0, 0, 0, 0,
                              iteration_tokens=tuple(self._step_counts), iteration_tokens_sum=self._step_tokens)

    def _run_batch(self, token_ids: list[list[int]], params: list[PoolingParams]) -> list:
        """One forward pass (on the batcher's worker thread), counted as one engine step."""
        rows = self.embedder.run_batch(token_ids, params)
        tokens = sum(len(ids) for ids in token_ids)
        self._step_counts[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, tokens)] += 1
        self._step_tokens += tokens
        return rows

    def check_params(self, params: PoolingParams | None) -> PoolingParams:
        return self.embedder.check_params(params)

    async def embed(self, token_ids: list[int], params: PoolingParams):
        return await self.batcher.submit(token_ids, params)

    async def embed_many(self, token_ids: list[list[int]], params: PoolingParams) -> list:
        """The embedding rows of one request's inputs, in order, submitted to the batcher together."""
        return await self.batcher.submit_many(token_ids, params)

    def shutdown(self) -> None:
        self.batcher.close()


def is_pooling_model(args: EngineArgs) -> bool:
    """Whether ``args`` name an embedding model (the pooling runner), reading only the model's config.json
    (a GGUF model is always generative)."""
    from flotilla.models.loader import load_hf_config, resolve_model
    from flotilla.models.registry import runner_for
    if args.runner != "auto":
        return args.runner == "pooling"
    resolved = resolve_model(args.model)
    if resolved.kind != "hf_dir":
        return False
    return runner_for(getattr(load_hf_config(resolved), "architectures", None)) == "pooling"


def make_async_engine(args: EngineArgs, embedding_batcher):
    """The serving engine of ``args``' model: ``AsyncEmbedder`` batched by ``embedding_batcher`` (its
    ``batcher_factory``) for an embedding model (the pooling runner), else ``AsyncLLM`` (whose engine core runs in its own process). Embedding models are Hugging Face
    directories, so a GGUF model goes to ``AsyncLLM`` without its metadata being read twice."""
    from flotilla.engine.async_llm import AsyncLLM
    from flotilla.models.loader import resolve_model
    if args.runner != "generate" and resolve_model(args.model).kind == "hf_dir":
        config = args.create_engine_config()
        if config.model.runner == "pooling":
            return AsyncEmbedder(config, embedding_batcher)
    return AsyncLLM.from_engine_args(args)
