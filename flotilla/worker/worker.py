"""Worker: one rank's device, model, KV cache and model runner."""

from __future__ import annotations

import logging
import os
import time

import torch

from flotilla.config import EngineConfig
from flotilla.errors import ModelLoadError
from flotilla.layers.attention.selector import attention_backend
from flotilla.models.loader import ResolvedModel, iterate_weights_filtered
from flotilla.models.offload import WeightOffloader, build_device
from flotilla.models.registry import get_model_class
from flotilla.models.weight_prep import can_keep_quantized, prepare_weights_
from flotilla.scheduler.output import ModelRunnerOutput, SchedulerOutput
from flotilla.structured.decoding import StructuredDecoding
from flotilla.structured.grammar import GrammarCache
from flotilla.structured.tokenizer_cache import TokenizerAssets
from flotilla.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GiB = 1 << 30


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


class Worker:
    """Owns one rank's model and KV cache.

    Lifecycle: ``load_model()`` -> ``determine_num_blocks()`` -> ``initialize_cache(num_blocks)`` ->
    ``execute_model(scheduler_output)`` per step.
    """

    def __init__(self, config: EngineConfig, rank: int = 0):
        self.config = config
        self.rank = rank
        self.device = torch.device(config.device.device)
        self.dtype = torch_dtype(config.model.dtype)
        threads = config.device.num_threads
        if threads is None and self.device.type == "cpu" and config.parallel.world_size > 1:
            # Ranks share this machine's cores: oversubscribed OpenMP threads spin against each other.
            threads = max(1, (os.cpu_count() or 1) // config.parallel.world_size)
        if threads:
            torch.set_num_threads(threads)
        self.backend = attention_backend(self.device.type, config.model.batch_invariant)
        self.model: torch.nn.Module | None = None
        self.offloaded = False
        self.runner: ModelRunner | None = None

    def load_model(self) -> None:
        mc = self.config.model
        cls = get_model_class(getattr(mc.hf_config, "architectures", None))
        start = time.perf_counter()
        partition = self.config.parallel.pipeline_partition
        with torch.device(build_device(self.config.offload, self.device)):
            model = cls(mc.hf_config, dtype=self.dtype, max_model_len=mc.max_model_len,
                        pp_partition=list(partition) if partition else None)
        resolved = ResolvedModel(source=mc.source, kind=mc.source_kind, alias=None)
        offloader = WeightOffloader.create(model, self.config.offload, resolved, mc.hf_config, self.dtype,
                                           self.device)
        # Each rank reads only the tensors of its own pipeline stage (and not those of layers streamed from the file).
        wanted = offloader.wants_weight if offloader is not None else model.wants_weight
        lazy = self.config.parallel.tensor_parallel_size > 1  # each TP rank reads only its shards
        keep = mc.quantization == "gguf" and can_keep_quantized(self.device, mc.dtype)
        self.offloaded = offloader is not None
        model.load_weights(iterate_weights_filtered(resolved, mc.hf_config, self.dtype, wanted,
                                                    lazy=lazy, keep_quantized=keep))
        if offloader is not None:
            offloader.attach()  # before prepacking: streamed layers run F.linear (bit-identical to the prepacked path)
        prepare_weights_(model, keep_quantized=keep, quantization=mc.quantization,
                         dense_min_rows=mc.dense_min_rows if keep else 0, batch_invariant=mc.batch_invariant)
        self.model = model.eval()
        nparams = sum(p.numel() for p in model.parameters())
        logger.info("loaded %s (%.1fM parameters, %s) in %.1f s", mc.model, nparams / 1e6, mc.dtype,
                    time.perf_counter() - start)

    def _num_local_layers(self) -> int:
        return len(self.model.local_layer_indices) if self.model is not None else self.config.model.num_layers

    def kv_bytes_per_block(self) -> int:
        """Bytes one block takes on this rank: its own layers and its share of the KV heads."""
        mc, cc = self.config.model, self.config.cache
        kv_heads = max(1, mc.num_kv_heads // self.config.parallel.tensor_parallel_size)
        elem = torch.empty((), dtype=self.dtype).element_size()
        target = 2 * self._num_local_layers() * cc.block_size * kv_heads * mc.head_dim * elem
        if self.config.speculative.method != "draft_model":
            return target
        from flotilla.spec_decode.draft_model import draft_hf_config, kv_bytes_per_block
        return target + kv_bytes_per_block(draft_hf_config(self.config.speculative), cc.block_size, self.dtype)

    def determine_num_blocks(self) -> int:
        cc = self.config.cache
        if cc.num_blocks is not None:
            return cc.num_blocks
        return int(cc.kv_cache_memory * GiB // self.kv_bytes_per_block())

    def initialize_cache(self, num_blocks: int) -> None:
        if self.model is None:
            raise ModelLoadError("initialize_cache() called before load_model()")
        mc, cc = self.config.model, self.config.cache
        kv_heads = max(1, mc.num_kv_heads // self.config.parallel.tensor_parallel_size)
        shape = self.backend.kv_cache_shape(num_blocks, cc.block_size, kv_heads, mc.head_dim)
        # Indexed by global layer index; other pipeline stages' layers hold None.
        caches: list[torch.Tensor | None] = [None] * mc.num_layers
        for i in self.model.local_layer_indices:
            caches[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        grammars = GrammarCache(TokenizerAssets(mc.source, mc.source_kind, mc.vocab_size, hf_config=mc.hf_config))
        if ModelRunner.is_sampling_rank():
            grammars.prewarm()  # a tokenizer not cached on disk yet is cached now, not at the first request
        self.runner = ModelRunner(self.model, self.backend, caches, cc.block_size, self.device,
                                  StructuredDecoding(grammars, mc.vocab_size), self.config.speculative,
                                  self._make_proposer(num_blocks))
        self.runner.graphs = self._decode_graphs(caches)
        logger.info("rank %d KV cache: %d blocks of %d tokens (%.2f GiB)", self.rank, num_blocks,
                    cc.block_size, num_blocks * self.kv_bytes_per_block() / GiB)

    def _decode_graphs(self, caches):
        """Captured CUDA graphs for decode steps (worker/cuda_graphs.py), or None: not on CUDA, ``enforce_eager``,
        a backend that reads the step on the host, or a configuration the graphs do not cover (several ranks,
        weight offload, whose layers stream through host hooks)."""
        mc = self.config.model
        if self.device.type != "cuda" or mc.enforce_eager or not getattr(self.backend, "supports_cuda_graphs", False):
            return None
        if self.config.parallel.world_size > 1 or self.offloaded:
            logger.info("decode steps run eagerly: CUDA graphs cover one rank without weight offload")
            return None
        from flotilla.worker.cuda_graphs import DecodeGraphs, capture_sizes
        block_size = self.config.cache.block_size
        graphs = DecodeGraphs(self.model, self.backend, caches, self.device,
                              capture_sizes(self.config.scheduler.max_num_seqs), -(-mc.max_model_len // block_size))
        graphs.capture_all()
        return graphs

    def _make_proposer(self, num_blocks: int):
        """The speculative decoding proposer of ``config.speculative`` (None when speculation is off)."""
        spec = self.config.speculative
        if spec.method == "ngram":
            from flotilla.spec_decode.ngram import NgramProposer
            return NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)
        if spec.method == "draft_model":
            from flotilla.spec_decode.draft_model import DraftModelProposer
            return DraftModelProposer.load(spec, self.config, self.backend, num_blocks, self.device, self.dtype)
        return None

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def comm_stats(self) -> dict:
        """Cumulative seconds this rank spent in tensor- and pipeline-parallel communication (benchmarks)."""
        from flotilla.distributed.parallel_state import get_pp_group, get_tp_group
        return {"tp": get_tp_group().comm_seconds, "pp": get_pp_group().comm_seconds}
