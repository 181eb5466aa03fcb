"""LLMEngine: one step = schedule -> execute -> update -> detokenize."""

from __future__ import annotations

import logging
import time
import weakref

import torch

from flotilla.config import EngineConfig
from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.input_processor import InputProcessor, PromptType
from flotilla.engine.output_processor import OutputKind, OutputProcessor
from flotilla.engine.core import EngineCore, make_child_requests
from flotilla.errors import InvalidRequestError
from flotilla.outputs import RequestOutput
from flotilla.request import RequestStatus, check_priority
from flotilla.sampling_params import SamplingParams
from flotilla.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def require_generative(config: EngineConfig) -> None:
    """InvalidRequestError unless ``config`` is a generative model's (an embedding model has no decoder
    engine: ``LLM`` runs it with an ``Embedder``, ``flotilla serve`` with an ``AsyncEmbedder``)."""
    if config.model.runner != "generate":
        raise InvalidRequestError(f"{config.model.name} is an embedding model: it runs on the pooling runner "
                                  f"(LLM.embed, /v1/embeddings), not on the generation engine", "model")


def load_tokenizer(config: EngineConfig) -> Tokenizer:
    mc = config.model
    if mc.source_kind == "gguf":
        import os
        return Tokenizer.from_pretrained(os.path.dirname(mc.source), gguf_file=os.path.basename(mc.source),
                                         config=mc.hf_config)
    return Tokenizer.from_pretrained(mc.source)


class LLMEngine:
    """A synchronous engine: ``add_request`` then call ``step`` until ``has_unfinished_requests`` is False.

    Contract: a request that fails validation raises ``InvalidRequestError`` and leaves the engine
    unchanged; ``abort_request`` frees the request's KV blocks at once; each ``step`` returns a
    RequestOutput for every request that made progress (per its OutputKind). ``priority`` (vLLM's: an
    integer, lower is served earlier, default 0) orders the waiting queue under either scheduling policy and
    preempts worse running requests under "priority" (``flotilla.scheduler.scheduler.Scheduler``).
    """

    def __init__(self, config: EngineConfig):
        require_generative(config)
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.core = EngineCore(config)
        # Worker processes (and ranks of a launcher) are told to stop when the engine goes away.
        self._finalizer = weakref.finalize(self, self.core.shutdown)
        self.input_processor = InputProcessor(self.tokenizer, config.model.vocab_size, config.model.max_model_len,
                                              config.structured_outputs.backend)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._counter = 0

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def executor(self):
        return self.core.executor

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        if args.seed is not None:
            torch.manual_seed(args.seed)
        return cls(args.create_engine_config())

    # ---- requests ---------------------------------------------------------------------------------
    def next_request_id(self) -> str:
        self._counter += 1
        return str(self._counter)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    output_kind: OutputKind = OutputKind.CUMULATIVE, arrival_time: float | None = None,
                    priority: int = 0) -> None:
        params = params or SamplingParams()
        if request_id in self.output_processor.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        check_priority(priority)
        processed = self.input_processor.process(prompt, params)
        self.add_processed_request(request_id, processed, output_kind, arrival_time, priority)

    def add_processed_request(self, request_id, processed, output_kind, arrival_time=None, priority: int = 0) -> None:
        check_priority(priority)
        child_ids = self.output_processor.add_request(request_id, processed.prompt, processed.prompt_token_ids,
                                                      processed.params, output_kind)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        for child in make_child_requests(request_id, processed.prompt_token_ids, processed.params, child_ids,
                                         arrival, processed.cache_salt, priority):
            self.core.add_request(child)

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        child_ids = self.output_processor.abort_requests(ids)
        self.core.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or self.output_processor.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests)

    # ---- step -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        self.output_processor.mark_scheduled(core_outputs.scheduled_ids, core_outputs.timestamp)
        processed = self.output_processor.process_outputs(core_outputs.outputs)
        if processed.child_ids_to_stop:
            self.core.finish_requests(processed.child_ids_to_stop, RequestStatus.FINISHED_STOPPED)
        return processed.request_outputs

    def shutdown(self) -> None:
        self._finalizer()
