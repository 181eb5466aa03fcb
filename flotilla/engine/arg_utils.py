"""EngineArgs: the user-facing knobs (vLLM's names), turned into validated EngineConfig once."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from flotilla.config import (SCHEDULING_POLICIES, SPECULATIVE_METHODS, STRUCTURED_OUTPUTS_BACKENDS, CacheConfig,
                             DeviceConfig, EngineConfig, ModelConfig, OffloadConfig, ParallelConfig, SchedulerConfig,
                             SpeculativeConfig, StructuredOutputsConfig)
from flotilla.distributed.utils import pp_partition
from flotilla.errors import InvalidRequestError, ModelLoadError
from flotilla.models.loader import load_hf_config, resolve_model

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 8192
QUANTIZATION_CHOICES = ("gguf", "int8", "int4", "none")


@dataclass
class EngineArgs:
    """Arguments shared by ``LLM``, ``AsyncLLM`` and the CLI.

    ``create_engine_config`` validates everything that can be checked without loading weights, the parallel
    sizes against the model's heads and layers included (``InvalidRequestError`` before any rank starts).

    ``kv_cache_memory`` is the KV cache budget in GiB (``num_kv_blocks`` overrides it with a block count).
    ``max_model_len`` defaults to the model's context length capped at 8192.

    ``runner`` (vLLM's ``--runner``): "auto" detects it from the architecture, as vLLM does: a decoder
    (``*ForCausalLM``) runs on the "generate" runner, an encoder (``BertModel``) on the "pooling" runner
    (embeddings, ``pooling_engine_config``); naming the other one is an ``InvalidRequestError``.

    ``scheduling_policy`` (vLLM's ``--scheduling-policy``): "fcfs" (the default: first come first served;
    requests with a positive priority, such as batch work, wait behind priority-0 ones but never preempt) or
    "priority" (requests served by their ``priority``, lower first; a better one preempts worse running ones).

    ``speculative_config`` (vLLM's ``--speculative-config`` JSON): ``{"method": "ngram", "num_speculative_tokens":
    k, "prompt_lookup_min": a, "prompt_lookup_max": b}`` or ``{"method": "draft_model", "model": name,
    "num_speculative_tokens": k}`` (``SpeculativeConfig``); other keys are refused. It runs on one rank
    (tensor and pipeline parallel size 1); a draft model must have the target's vocabulary.

    Weight offload (``OffloadConfig``, flotilla/models/offload.py): ``cpu_offload_gb`` (vLLM's
    ``--cpu-offload-gb``, GiB of whole decoder layers kept in pinned CPU memory and streamed to the device ahead of
    use) or ``max_resident_weights`` (GiB, CPU only: the layers that do not fit stay memory-mapped in the model
    file and are materialised ahead of use). One rank only, float weights only (no ``quantization``), not with
    ``batch_invariant`` or a draft model: those combinations are refused (``InvalidRequestError``).
    """

    model: str | None = None
    dtype: str = "auto"
    # None: a GGUF file's own quantization ("gguf") on the CPU, float weights otherwise; "gguf" | "int8" | "int4"
    # | "none" (float weights, a GGUF file dequantized to dtype). See ``_quantization``.
    quantization: str | None = None
    max_model_len: int | None = None
    kv_cache_memory: float = 1.0
    num_kv_blocks: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None
    scheduling_policy: str = "fcfs"  # fcfs | priority (vLLM's --scheduling-policy)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # uni | mp | ray | external (None: uni or mp)
    distributed_backend: str | None = None  # torch.distributed backend (None: nccl on CUDA, gloo on CPU)
    pipeline_partition: list[int] | None = None  # layers per stage (None: even split)
    ray_address: str | None = None
    device: str = "cpu"
    num_threads: int | None = None
    served_model_name: str | None = None
    seed: int = 0
    batch_invariant: bool = False  # per-token results independent of the batch (README: what a seed guarantees)
    enforce_eager: bool = False  # vLLM's --enforce-eager: no CUDA graphs
    runner: str = "auto"  # auto | generate | pooling (vLLM's --runner)
    # vLLM's StructuredOutputsConfig as a dict: {"backend": "auto" | "xgrammar" | "guidance"} (None: auto)
    structured_outputs_config: dict[str, Any] | None = None
    # vLLM's --speculative-config as a dict (None: no speculation); see SpeculativeConfig
    speculative_config: dict[str, Any] | None = None
    cpu_offload_gb: float = 0.0  # vLLM's --cpu-offload-gb (GiB)
    max_resident_weights: float | None = None  # GiB of weights materialised at once (CPU), None: all
    # "gguf": steps of at least this many tokens multiply float copies of the weights (held beside the quantized
    # blocks); 0 keeps no copy (quantized kernels at every step size); None: chosen for this CPU
    # (quant_weight.auto_dense_min_rows)
    gguf_dense_min_tokens: int | None = None

    def create_engine_config(self) -> EngineConfig:
        self._check_finite()  # before anything is read or loaded
        structured = self._structured_outputs()
        resolved = resolve_model(self.model)
        hf_config = load_hf_config(resolved)
        if self._runner(hf_config) == "pooling":
            from flotilla.engine.pooling_config import pooling_engine_config
            return pooling_engine_config(self, resolved, hf_config)
        max_len = self._max_model_len(hf_config)
        dtype = self._dtype(hf_config)
        quantization = self._quantization(dtype, resolved.kind)
        self._check_batch_invariant(quantization)
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise InvalidRequestError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got "
                                      f"{self.scheduling_policy!r}", "scheduling_policy")
        model = ModelConfig(model=resolved.alias or self.model or resolved.source, source=resolved.source,
                            source_kind=resolved.kind, hf_config=hf_config, dtype=dtype,
                            max_model_len=max_len, served_model_name=self.served_model_name,
                            quantization=quantization, dense_min_rows=self._dense_min_rows(quantization),
                            batch_invariant=self.batch_invariant, enforce_eager=self.enforce_eager)
        batched = self.max_num_batched_tokens or (max(2048, max_len) if not self.enable_chunked_prefill
                                                  else 2048)
        cache = CacheConfig(block_size=self.block_size, kv_cache_memory=self.kv_cache_memory,
                            num_blocks=self.num_kv_blocks, enable_prefix_caching=self.enable_prefix_caching)
        scheduler = SchedulerConfig(max_num_batched_tokens=batched, max_num_seqs=self.max_num_seqs,
                                    max_model_len=max_len, enable_chunked_prefill=self.enable_chunked_prefill,
                                    policy=self.scheduling_policy)
        parallel = ParallelConfig(
            self.tensor_parallel_size, self.pipeline_parallel_size, executor_backend=self.distributed_executor_backend,
            distributed_backend=self.distributed_backend,
            pipeline_partition=tuple(self.pipeline_partition) if self.pipeline_partition else None,
            ray_address=self.ray_address)
        _check_pipeline(model, parallel)
        speculative = self._speculative(model, parallel)
        return EngineConfig(model=model, cache=cache, scheduler=scheduler, parallel=parallel,
                            device=DeviceConfig(self.device, self.num_threads),
                            structured_outputs=structured, speculative=speculative,
                            offload=self._offload(quantization, parallel, speculative))

    def _offload(self, quantization: str | None, parallel: ParallelConfig,
                 speculative: SpeculativeConfig) -> OffloadConfig:
        """``cpu_offload_gb`` / ``max_resident_weights`` checked; unsupported combinations are refused
        (InvalidRequestError naming the offload field), never ignored."""
        gb, resident = self.cpu_offload_gb, self.max_resident_weights
        for name, value in (("cpu_offload_gb", gb), ("max_resident_weights", resident)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise InvalidRequestError(f"{name} must be a number of GiB, got {value!r}", name)
        if gb < 0:
            raise InvalidRequestError(f"cpu_offload_gb must be >= 0, got {gb}", "cpu_offload_gb")
        if resident is not None and resident <= 0:
            raise InvalidRequestError(f"max_resident_weights must be > 0 GiB, got {resident}", "max_resident_weights")
        if gb == 0 and resident is None:
            return OffloadConfig()
        name = "cpu_offload_gb" if gb > 0 else "max_resident_weights"
        flag = "--" + name.replace("_", "-")
        if gb > 0 and resident is not None:
            raise InvalidRequestError("--cpu-offload-gb and --max-resident-weights cannot be combined: "
                                      "--cpu-offload-gb streams weights to an accelerator, --max-resident-weights "
                                      "streams them from the model file on the CPU", name)
        if resident is not None and self.device != "cpu":
            raise InvalidRequestError(f"--max-resident-weights streams weights from the model file on the CPU, not "
                                      f"with --device {self.device} (use --cpu-offload-gb)", name)
        refused = [(parallel.world_size > 1, "tensor or pipeline parallelism (it runs on one rank)"),
                   (quantization is not None, f"--quantization {quantization} (offload streams float weights)"),
                   (self.batch_invariant, "--batch-invariant"),
                   (speculative.method == "draft_model", "a draft model (its weights are not offloaded)")]
        for bad, what in refused:
            if bad:
                raise InvalidRequestError(f"{flag} cannot be combined with {what}", name)
        return OffloadConfig(float(gb), None if resident is None else float(resident))

    def _speculative(self, model: ModelConfig, parallel: ParallelConfig) -> SpeculativeConfig:
        """``speculative_config`` checked (InvalidRequestError naming ``speculative_config``); prompt lookup
        bounds default as in vLLM (both 5; one given sets the other)."""
        if not self.speculative_config:
            return SpeculativeConfig()
        given = dict(self.speculative_config)

        def fail(message: str):
            return InvalidRequestError(f"speculative_config: {message}", "speculative_config")
        method = given.pop("method", None)
        if method not in SPECULATIVE_METHODS:
            raise fail(f"method must be one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}")
        allowed = {"num_speculative_tokens"} | ({"prompt_lookup_min", "prompt_lookup_max"} if method == "ngram"
                                               else {"model", "quantization"})
        if set(given) - allowed:
            raise fail(f"unsupported key(s) for method {method!r}: {', '.join(sorted(set(given) - allowed))} "
                       f"(supported: method, {', '.join(sorted(allowed))})")
        k = given.get("num_speculative_tokens")
        lo, hi = given.get("prompt_lookup_min"), given.get("prompt_lookup_max")
        for name, value in (("num_speculative_tokens", k), ("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise fail(f"{name} must be an integer, got {value!r}")
        if k is None:
            raise fail("num_speculative_tokens is required")
        lo, hi = (lo or hi or 5), (hi or lo or 5)
        if parallel.world_size > 1:
            raise fail("speculative decoding runs on one rank; use tensor_parallel_size=1 and "
                       "pipeline_parallel_size=1")
        draft = {}
        if method == "draft_model":
            draft = self._draft_model(given.get("model"), model, fail)
            draft["draft_quantization"] = self._draft_quantization(given.get("quantization"), draft, model, fail)
        try:
            return SpeculativeConfig(method=method, num_speculative_tokens=k, prompt_lookup_min=lo,
                                     prompt_lookup_max=hi, **draft)
        except ValueError as e:
            raise fail(str(e)) from None

    @staticmethod
    def _draft_model(name, target: ModelConfig, fail) -> dict:
        """The draft model's resolved source, checked to share the target's vocabulary."""
        if not isinstance(name, str) or not name:
            raise fail("method 'draft_model' needs a 'model' (alias, directory or .gguf file)")
        resolved = resolve_model(name)
        hf_config = load_hf_config(resolved)
        vocab = int(getattr(hf_config, "vocab_size", 0))
        if vocab != target.vocab_size:
            raise fail(f"the draft model {name!r} has a vocabulary of {vocab} tokens, the target "
                       f"{target.name!r} {target.vocab_size}: they must share one tokenizer")
        return {"draft_model": name, "draft_source": resolved.source, "draft_source_kind": resolved.kind}

    def _draft_quantization(self, q, draft: dict, target: ModelConfig, fail) -> str | None:
        """The draft's "quantization" checked as ``--quantization`` is for a target (None: follow the target)."""
        if q is None:
            return None
        if q not in QUANTIZATION_CHOICES:
            raise fail(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {q!r}")
        if q == "gguf" and draft["draft_source_kind"] != "gguf":
            raise fail(f"quantization gguf keeps a GGUF file's quantized weights: the draft model "
                       f"{draft['draft_model']!r} is not a GGUF file (use int8 or int4 to quantize it)")
        if q in ("gguf", "int4") and self.device != "cpu":
            raise fail(f"quantization {q} runs on the CPU only, not with --device {self.device}")
        if q == "int8" and target.dtype == "float32":
            raise fail("quantization int8 multiplies bfloat16 or float16 activations: use --dtype bfloat16")
        if q != "none" and target.batch_invariant:
            raise fail(f"quantization {q} for the draft cannot be combined with --batch-invariant")
        return q

    def _structured_outputs(self) -> StructuredOutputsConfig:
        """``structured_outputs_config`` checked: only ``backend`` (vLLM's other keys are refused, not ignored)."""
        given = dict(self.structured_outputs_config or {})
        backend = given.pop("backend", "auto")
        if given:
            raise InvalidRequestError(f"structured_outputs_config: unsupported key(s) {', '.join(sorted(given))} "
                                      "(supported: backend)", "structured_outputs_config")
        if backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise InvalidRequestError(f"structured_outputs_config: backend must be one of "
                                      f"{', '.join(STRUCTURED_OUTPUTS_BACKENDS)}, got {backend!r}",
                                      "structured_outputs_config")
        return StructuredOutputsConfig(backend=backend)

    def _runner(self, hf_config) -> str:
        """The runner of this model: detected from its architecture, checked against ``runner``."""
        from flotilla.models.registry import (runner_for, supported_architectures,
                                              supported_pooling_architectures)
        if self.runner not in ("auto", "generate", "pooling"):
            raise InvalidRequestError(f"runner must be auto, generate or pooling, got {self.runner!r}", "runner")
        archs = getattr(hf_config, "architectures", None)
        detected = runner_for(archs)
        if detected is None:
            raise ModelLoadError(f"unsupported model architecture {archs!r}; flotilla supports "
                                 f"{', '.join(supported_architectures())} (generation) and "
                                 f"{', '.join(supported_pooling_architectures())} (embeddings)")
        if self.runner not in ("auto", detected):
            what = "an encoder: it serves embeddings" if detected == "pooling" else "a decoder: it generates text"
            raise InvalidRequestError(f"runner {self.runner!r} does not fit {archs[0] if archs else 'the model'}, "
                                      f"which is {what} (runner {detected!r})", "runner")
        return detected

    def _check_finite(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequestError(f"{f.name} must be a finite number, got {value}", f.name)

    def _max_model_len(self, hf_config) -> int:
        """The context length: ``max_model_len`` if given, else the model's (capped at 8192). A model with a
        sliding window (Mistral) runs full attention, which equals windowed attention only up to the window,
        so the window caps the context (vLLM's ``--disable-sliding-window``)."""
        limit = int(getattr(hf_config, "max_position_embeddings", DEFAULT_MAX_MODEL_LEN))
        what = "the model's context length"
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True) and int(window) < limit:
            logger.info("model uses a %d-token sliding window: capping max_model_len to it", window)
            limit = int(window)
            what = ("the model's sliding window (flotilla runs full attention, which equals the model's "
                    "windowed attention only within the window)")
        if self.max_model_len is None:
            return min(limit, DEFAULT_MAX_MODEL_LEN)
        if self.max_model_len > limit:
            raise InvalidRequestError(f"max_model_len {self.max_model_len} exceeds {what}: {limit}",
                                      "max_model_len")
        return self.max_model_len

    def _quantization(self, dtype: str, source_kind: str) -> str | None:
        """The weight quantization the model runs with (ModelConfig.quantization), like vLLM's: by default a GGUF
        file keeps its quantized blocks ("gguf") on the CPU, with float copies for large steps
        (``gguf_dense_min_tokens``), unless --batch-invariant or weight offload asks for float weights; other
        checkpoints run float weights. "none" (a flotilla value; vLLM cannot run a GGUF file dequantized)
        forces float weights."""
        q = self.quantization
        if q is None:
            offload = bool(self.cpu_offload_gb) or self.max_resident_weights is not None
            keep = source_kind == "gguf" and self.device == "cpu" and not self.batch_invariant and not offload
            return "gguf" if keep else None
        if q not in QUANTIZATION_CHOICES:
            raise InvalidRequestError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {q!r}",
                                      "quantization")
        if q == "none":
            return None
        if q == "gguf" and source_kind != "gguf":
            raise InvalidRequestError("quantization gguf keeps a GGUF file's quantized weights: the model is not a "
                                      "GGUF file (use int8 or int4 to quantize it)", "quantization")
        if q in ("gguf", "int4") and self.device != "cpu":
            raise InvalidRequestError(f"quantization {q} runs on the CPU only (flotilla's CPU kernels), not with "
                                      f"--device {self.device}", "quantization")
        if q == "int8" and dtype == "float32":
            raise InvalidRequestError("quantization int8 multiplies bfloat16 or float16 activations: use "
                                      "--dtype bfloat16 (torch's int8 kernel is slow with float32 on CPU)",
                                      "quantization")
        return q

    def _dense_min_rows(self, quantization: str | None) -> int:
        """ModelConfig.dense_min_rows: ``gguf_dense_min_tokens`` checked, or this CPU's crossover (auto)."""
        n = self.gguf_dense_min_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise InvalidRequestError(f"gguf_dense_min_tokens must be an integer >= 0, got {n!r}",
                                      "gguf_dense_min_tokens")
        if quantization != "gguf":
            if n:
                raise InvalidRequestError(f"gguf_dense_min_tokens applies to GGUF weights kept quantized "
                                          f"(--quantization gguf), not to quantization {quantization}",
                                          "gguf_dense_min_tokens")
            return 0
        if n is None:
            from flotilla.layers.quant_weight import auto_dense_min_rows
            return auto_dense_min_rows()
        return n

    def _check_batch_invariant(self, quantization: str | None) -> None:
        if not self.batch_invariant:
            return
        if quantization is not None:
            raise InvalidRequestError(f"--batch-invariant cannot be combined with --quantization {quantization}: "
                                      "the quantized kernels' reduction order depends on the batch", "batch_invariant")
        if self.device != "cpu":
            raise InvalidRequestError(f"--batch-invariant runs on the CPU only, not with --device {self.device}",
                                      "batch_invariant")

    def _dtype(self, hf_config) -> str:
        if self.dtype != "auto":
            if self.dtype not in ("float32", "bfloat16", "float16"):
                raise InvalidRequestError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}",
                                          "dtype")
            return self.dtype
        declared = getattr(hf_config, "dtype", None)  # transformers >= 5 (torch_dtype is its deprecated alias)
        if isinstance(declared, torch.dtype):
            declared = str(declared).removeprefix("torch.")
        if self.device == "cpu":
            return cpu_auto_dtype(declared)
        return declared if declared in ("bfloat16", "float16", "float32") else "bfloat16"


def _check_pipeline(model: ModelConfig, parallel: ParallelConfig) -> None:
    """InvalidRequestError, before any rank starts, when the pipeline stages cannot split the model's layers."""
    partition = list(parallel.pipeline_partition) if parallel.pipeline_partition else None
    try:
        pp_partition(model.num_layers, parallel.pipeline_parallel_size, partition)
    except ValueError as e:
        param = "pipeline_partition" if partition else "pipeline_parallel_size"
        raise InvalidRequestError(f"pipeline_parallel_size {parallel.pipeline_parallel_size} does not fit "
                                  f"{model.name} ({model.num_layers} layers): {e}", param) from None


def cpu_auto_dtype(declared: str | None) -> str:
    """``dtype="auto"`` on CPU: a float32 checkpoint stays float32 (exact); any other (bfloat16, float16, or a
    GGUF file, which declares none) runs in bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or
    AMX: several times float32's matmul rate, benchmarks/RESULTS.md), else in float32."""
    if declared == "float32":
        return "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX-BF16, by our own detection (flotilla.ops.native_bf16_supported), not torch's private
    ``torch.cpu._is_avx512_bf16_supported``."""
    from flotilla.ops import native_bf16_supported
    return native_bf16_supported()
