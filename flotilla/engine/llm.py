"""LLM: the offline API (vLLM's ``LLM``): batch generate and chat, or embed with an embedding model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.embedding import Embedder
from flotilla.engine.input_processor import PromptType
from flotilla.engine.llm_engine import LLMEngine
from flotilla.engine.output_processor import OutputKind
from flotilla.errors import InvalidRequestError
from flotilla.outputs import EmbeddingRequestOutput, RequestOutput
from flotilla.pooling_params import PoolingParams
from flotilla.request import check_priority
from flotilla.sampling_params import SamplingParams

ChatMessages = list[dict]


class LLM:
    """Offline inference over a continuously batched engine.

    ``LLM(model=None)`` loads the embedded default (SmolLM2-135M-Instruct). ``generate`` accepts one prompt
    or many (strings, token-id lists or ``{"prompt_token_ids": [...]}``) with one SamplingParams or one per
    prompt, and returns outputs in input order. Every prompt is validated before any is queued, so a bad
    one raises ``InvalidRequestError`` and leaves the engine idle and usable. ``priority`` (as vLLM's): one
    integer per prompt (lower is served earlier, default 0; see ``EngineArgs.scheduling_policy``), a list as
    long as the prompts; ``chat`` takes one per conversation.

    An embedding model (an encoder such as ``"all-minilm-l6-v2"``: ``runner="auto"`` detects it from its
    architecture, as vLLM does; ``runner="pooling"`` insists) loads an ``Embedder`` instead: ``embed`` returns
    ``EmbeddingRequestOutput``s (``.outputs.embedding``), and ``generate``/``chat`` raise
    ``InvalidRequestError``, as ``embed`` does on a generative model.
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", max_model_len: int | None = None,
                 kv_cache_memory: float = 1.0, seed: int = 0, **kwargs):
        args = EngineArgs(model=model, dtype=dtype, max_model_len=max_model_len, kv_cache_memory=kv_cache_memory,
                          seed=seed, **kwargs)
        self.engine = self._make_engine(args)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine = cls._make_engine(args)
        return llm

    @staticmethod
    def _make_engine(args: EngineArgs) -> LLMEngine | Embedder:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        config = args.create_engine_config()
        return Embedder(config) if config.model.runner == "pooling" else LLMEngine(config)

    @property
    def runner(self) -> str:
        """"generate", or "pooling" for an embedding model."""
        return self.engine.config.model.runner

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        self._require("generate", "LLM.generate()")
        prompts = self._as_list(prompts)
        params = self._params_for(prompts, sampling_params)
        priorities = self._priorities_for(prompts, priority)
        processed = [self.engine.input_processor.process(p, sp) for p, sp in zip(prompts, params)]
        ids = []
        for item, prio in zip(processed, priorities):
            rid = self.engine.next_request_id()
            self.engine.add_processed_request(rid, item, OutputKind.FINAL_ONLY, priority=prio)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: ChatMessages | Sequence[ChatMessages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = False, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or many, then generate."""
        self._require("generate", "LLM.chat()")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.engine.tokenizer.apply_chat_template(
            conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template)}
            for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, priority=priority)

    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
              use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        """The embedding of each prompt (a text, a token-id list, ``{"prompt": ...}`` or
        ``{"prompt_token_ids": [...]}``), in input order, pooled and normalised as the model's
        sentence-transformers config says; texts are truncated to ``max_model_len`` tokens (the model's
        ``max_seq_length``). Every prompt is validated first: a bad one raises ``InvalidRequestError``."""
        self._require("pooling", "LLM.embed()")
        prompts = self._as_list(prompts)
        params = list(pooling_params) if isinstance(pooling_params, (list, tuple)) else pooling_params
        return self.engine.embed(prompts, params)

    def _require(self, runner: str, what: str) -> None:
        if self.runner == runner:
            return
        name = self.engine.config.model.name
        if runner == "pooling":
            raise InvalidRequestError(f"{what} is only supported for embedding models; {name} is a generative "
                                      f"model", "model")
        raise InvalidRequestError(f"{what} is only supported for generative models; {name} is an embedding model "
                                  f"(use LLM.embed())", "model")

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        try:
            while len(finished) < len(ids) and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in finished])
            raise
        return [finished[i] for i in ids]

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and isinstance(prompts[0], int):
            return [prompts]  # a single token-id list
        return prompts

    @staticmethod
    def _priorities_for(prompts: list, priority) -> list[int]:
        """One checked priority per prompt (all 0 when None); ValueError when the list's length differs."""
        if priority is None:
            return [0] * len(prompts)
        if isinstance(priority, (int, str, bytes)):
            raise InvalidRequestError(f"priority must be a list with one integer per prompt (as in vLLM), got "
                                      f"{type(priority).__name__}", "priority")
        priority = [check_priority(p) for p in priority]
        if len(priority) != len(prompts):
            raise ValueError(f"{len(priority)} priorities for {len(prompts)} prompts")
        return priority

    @staticmethod
    def _params_for(prompts: list, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in prompts]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        return sampling_params
