"""Embedder: an encoder model turning inputs into sentence embeddings in this process (the pooling runner).

``EmbeddingInputProcessor`` tokenizes and validates one input the way sentence-transformers does (the
model's default prompt prepended, lower-cased when its config says so, truncated to ``max_model_len``
tokens with the closing special tokens kept). ``Embedder.run_batch`` runs one forward pass over a batch of
token-id lists and pools each (``flotilla.layers.pooler``); ``Embedder.embed`` is the offline path over any
number of inputs (sorted by length into batches, as sentence-transformers' ``encode`` does, results in input
order). The server batches through the model repository's dynamic batcher (``flotilla.repository.embedding_model``).
"""

from __future__ import annotations

import logging
import time

import torch

from flotilla.config import EngineConfig
from flotilla.errors import InvalidRequestError
from flotilla.layers.attention import PackedSequences
from flotilla.layers.pooler import finish_embeddings, pool
from flotilla.layers.quantization import prepack_model_
from flotilla.models.loader import ResolvedModel, iterate_weights_filtered
from flotilla.models.registry import get_pooling_model_class
from flotilla.ops import kernels_enabled
from flotilla.outputs import EmbeddingOutput, EmbeddingRequestOutput
from flotilla.pooling_params import PoolingParams
from flotilla.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EmbedPrompt = str | list[int] | dict


class EmbeddingInputProcessor:
    """Turns one input into the token ids the encoder runs (see the module docstring).

    Contract: ``process(prompt, param)`` takes a text, a token-id list or ``{"prompt": text}`` /
    ``{"prompt_token_ids": ids}``; texts are truncated, token ids are taken as given (no special tokens
    added) and must be non-empty, in ``[0, vocab_size)`` and at most ``max_model_len`` long. Anything else
    is an ``InvalidRequestError`` whose ``param`` is ``param``. ``clone()`` has its own tokenizer copy.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, default_prompt: str | None = None):
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len
        self.default_prompt = default_prompt

    def clone(self) -> "EmbeddingInputProcessor":
        return EmbeddingInputProcessor(self.tokenizer.clone(), self.vocab_size, self.max_model_len,
                                       self.default_prompt)

    def process(self, prompt: EmbedPrompt, param: str = "input") -> list[int]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'", param)
        if isinstance(prompt, str):
            return self._tokenize(prompt, param)
        if isinstance(prompt, (list, tuple)):
            return self.check_token_ids(list(prompt), param)
        raise InvalidRequestError(f"an input must be a string or a list of token ids, got {type(prompt).__name__}",
                                  param)

    def _tokenize(self, text: str, param: str) -> list[int]:
        if not text:
            raise InvalidRequestError("an input text is empty", param)
        if self.default_prompt:
            text = self.default_prompt + text
        ids = self.tokenizer.encode(text, max_length=self.max_model_len)
        if not ids:
            raise InvalidRequestError("an input text encodes to no tokens", param)
        return ids

    def check_token_ids(self, ids: list, param: str) -> list[int]:
        if not ids:
            raise InvalidRequestError("an input token-id list is empty", param)
        if len(ids) > self.max_model_len:
            raise InvalidRequestError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                      f"an input has {len(ids)} token ids (token ids are not truncated; texts are)",
                                      param)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InvalidRequestError(f"token id {t!r} is outside the vocabulary [0, {self.vocab_size})", param)
        return ids


def next_batch_size(lengths: list[int], max_seqs: int, max_tokens: int) -> int:
    """How many of ``lengths`` (taken in order) one forward pass takes: at most ``max_seqs`` inputs and at
    most ``max_tokens`` padded tokens (count x the longest); always at least one."""
    n, longest = 0, 0
    for length in lengths[:max_seqs]:
        longest = max(longest, length)
        if n and (n + 1) * longest > max_tokens:
            break
        n += 1
    return max(n, 1) if lengths else 0


class Embedder:
    """One encoder model with its tokenizer and pooler, run in this process.

    Contract: ``config.model.runner`` is "pooling". ``check_params(params)`` validates ``PoolingParams``
    against the model (``dimensions`` only on a Matryoshka model, within its allowed sizes and at most
    ``output_dim``; ``InvalidRequestError`` naming the field). ``run_batch(ids, params)`` embeds one batch
    (already validated token-id lists, one ``PoolingParams`` each) in one forward pass and returns one float32
    CPU tensor per input; it is not thread-safe (one caller at a time). ``embed(prompts, params)`` validates
    every input first (nothing runs if one is bad), then embeds them all in batches of at most
    ``max_num_seqs`` inputs and ``max_num_batched_tokens`` padded tokens.
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_config = mc = config.model
        if config.device.num_threads:
            torch.set_num_threads(config.device.num_threads)
        self.device = torch.device(config.device.device)
        self.tokenizer = Tokenizer.from_pretrained(mc.source)
        if mc.pooler.do_lower_case:
            lower_case_tokenizer(self.tokenizer)
        self.input_processor = EmbeddingInputProcessor(self.tokenizer, mc.vocab_size, mc.max_model_len,
                                                       mc.pooler.default_prompt)
        self.model = self._load_model()
        self.output_dim = len(mc.pooler.pooling_modes) * self.model.hidden_size
        self._counter = 0

    def _load_model(self) -> torch.nn.Module:
        mc = self.model_config
        start = time.perf_counter()
        dtype = _DTYPES[mc.dtype]
        cls = get_pooling_model_class(getattr(mc.hf_config, "architectures", None))
        with torch.device(self.device):
            model = cls(mc.hf_config, dtype=dtype, max_model_len=mc.max_model_len)
        resolved = ResolvedModel(source=mc.source, kind=mc.source_kind)
        model.load_weights(iterate_weights_filtered(resolved, mc.hf_config, dtype, model.wants_weight))
        if kernels_enabled():
            prepack_model_(model)  # CPU bfloat16 only; a no-op elsewhere
        logger.info("loaded %s (%.1fM parameters, %s, pooling %s) in %.1f s", mc.model,
                    sum(p.numel() for p in model.parameters()) / 1e6, mc.dtype, mc.pooler.describe(),
                    time.perf_counter() - start)
        return model.eval()

    def check_params(self, params: PoolingParams | None) -> PoolingParams:
        params = params or PoolingParams()
        params.validate()
        dims, pooler = params.dimensions, self.model_config.pooler
        if dims is None:
            return params
        if not pooler.is_matryoshka:
            raise InvalidRequestError(f'Model "{self.model_config.name}" does not support matryoshka representation, '
                                      f"changing output dimensions will lead to poor results.", "dimensions")
        if pooler.matryoshka_dimensions and dims not in pooler.matryoshka_dimensions:
            allowed = ", ".join(map(str, pooler.matryoshka_dimensions))
            raise InvalidRequestError(f'Model "{self.model_config.name}" only supports {allowed} dimensions, '
                                      f"got {dims}", "dimensions")
        if dims > self.output_dim:
            raise InvalidRequestError(f"dimensions {dims} exceeds the model's embedding size {self.output_dim}",
                                      "dimensions")
        return params

    @torch.inference_mode()
    def run_batch(self, token_ids: list[list[int]], params: list[PoolingParams]) -> list[torch.Tensor]:
        layout = PackedSequences.from_lengths([len(ids) for ids in token_ids], self.device)
        input_ids = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.int64, device=self.device)  # (T,)
        hidden = self.model(input_ids, layout)  # (T, hidden)
        pooled = pool(hidden, layout, self.model_config.pooler.pooling_modes).cpu()  # (B, output_dim) float32
        default = self.model_config.pooler.normalize
        return finish_embeddings(pooled, [p.dimensions for p in params],
                                 [default if p.normalize is None else p.normalize for p in params])

    def embed(self, prompts: list[EmbedPrompt], params: PoolingParams | list[PoolingParams] | None = None,
              param: str = "prompt") -> list[EmbeddingRequestOutput]:
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} pooling params for {len(prompts)} prompts")
        per_prompt = [self.check_params(p) for p in per_prompt]
        ids = [self.input_processor.process(p, param) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: the widest batch runs first
        results: dict[int, torch.Tensor] = {}
        sched = self.config.scheduler
        while order:
            n = next_batch_size([len(ids[i]) for i in order], sched.max_num_seqs, sched.max_num_batched_tokens)
            batch, order = order[:n], order[n:]
            for i, row in zip(batch, self.run_batch([ids[i] for i in batch], [per_prompt[i] for i in batch])):
                results[i] = row
        return [self.make_output(ids[i], results[i]) for i in range(len(ids))]

    def make_output(self, token_ids: list[int], embedding: torch.Tensor) -> EmbeddingRequestOutput:
        self._counter += 1
        return EmbeddingRequestOutput(str(self._counter), EmbeddingOutput(embedding.tolist()), token_ids)


def lower_case_tokenizer(tokenizer: Tokenizer) -> None:
    """Make ``tokenizer`` lower-case its input first, as sentence-transformers does for ``do_lower_case``
    (a Lowercase normalizer in front of the backend's, unless it already lower-cases)."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence
    backend = tokenizer.hf_tokenizer.backend_tokenizer
    normalizer = backend.normalizer
    if isinstance(normalizer, Lowercase) or (isinstance(normalizer, NormalizerSequence)
                                             and any(isinstance(n, Lowercase) for n in normalizer)):
        return
    parts = [Lowercase()]
    if isinstance(normalizer, NormalizerSequence):
        parts += list(normalizer)
    elif normalizer is not None:
        parts.append(normalizer)
    backend.normalizer = NormalizerSequence(parts)
