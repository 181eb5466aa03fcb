"""Frozen configuration objects, validated once at construction and passed down (never global)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flotilla.errors import InvalidRequestError

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_finite(config) -> None:
    """Every float field of a config dataclass is a finite number (NaN compares False with every bound)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run and how.

    ``source`` is the resolved location: a Hugging Face directory (config.json + safetensors) or a .gguf
    file. ``hf_config`` is a transformers ``PretrainedConfig`` (for GGUF, built from its metadata).
    ``dtype`` is the resolved torch dtype name; ``max_model_len`` the context limit (prompt + output);
    ``quantization`` (weight-only; activations stay ``dtype``): "gguf" keeps a GGUF file's quantized weights
    in their blocks (layers/quant_weight.py; with ``dense_min_rows`` > 0 also a float copy that steps of at
    least that many tokens multiply instead), "int8" stores linear weights as int8 with per-row scales, "int4"
    quantizes them group-wise to 4 bits (layers/quantization.py), None runs float weights.
    ``batch_invariant`` computes every token's activations, logits and logprobs with reductions whose order
    does not depend on the rest of the batch (layers/batch_invariant.py); it excludes ``quantization``.
    ``enforce_eager`` (CUDA): decode steps run eagerly instead of from captured CUDA graphs (worker/cuda_graphs.py).
    ``runner`` is "generate" (a decoder on the engine) or "pooling" (an encoder serving embeddings; its
    ``pooler`` is the ``PoolerConfig`` read from the sentence-transformers config, and ``max_model_len`` is
    the length inputs are truncated to).
    """

    model: str
    source: str
    source_kind: str  # "hf_dir" | "gguf"
    hf_config: Any
    dtype: str = "float32"
    max_model_len: int = 2048
    served_model_name: str | None = None
    quantization: str | None = None  # None, "gguf", "int8" or "int4" (weight-only)
    dense_min_rows: int = 0  # "gguf": steps of at least this many tokens use float copies of the weights; 0: none
    batch_invariant: bool = False
    enforce_eager: bool = False  # vLLM's: no CUDA graphs (decode steps launch their kernels one by one)
    runner: str = "generate"
    pooler: Any = None

    def __post_init__(self) -> None:
        if self.runner not in ("generate", "pooling"):
            raise ValueError(f"runner must be 'generate' or 'pooling', got {self.runner!r}")
        if (self.runner == "pooling") != (self.pooler is not None):
            raise ValueError("a pooling model needs a pooler config, and only a pooling model has one")
        if self.quantization not in (None, "gguf", "int8", "int4"):
            raise ValueError(f"quantization must be None, 'gguf', 'int8' or 'int4', got {self.quantization!r}")
        if self.quantization == "gguf" and self.source_kind != "gguf":
            raise ValueError("quantization 'gguf' needs a GGUF model file")
        if self.dense_min_rows < 0:  # read only with quantization "gguf" (EngineArgs sets it only then)
            raise ValueError(f"dense_min_rows must be >= 0, got {self.dense_min_rows}")
        if self.batch_invariant and self.quantization is not None:
            raise ValueError(f"batch_invariant cannot be combined with quantization {self.quantization!r}")
        if self.source_kind not in ("hf_dir", "gguf"):
            raise ValueError(f"source_kind must be 'hf_dir' or 'gguf', got {self.source_kind!r}")
        if self.dtype not in _DTYPES[1:]:
            raise ValueError(f"dtype must be one of {_DTYPES[1:]}, got {self.dtype!r}")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else ""

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def num_layers(self) -> int:
        return int(self.hf_config.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        hd = getattr(self.hf_config, "head_dim", None)
        return int(hd) if hd else self.hf_config.hidden_size // self.hf_config.num_attention_heads

    @property
    def num_heads(self) -> int:
        return int(self.hf_config.num_attention_heads)

    @property
    def intermediate_size(self) -> int | None:
        size = getattr(self.hf_config, "intermediate_size", None)
        return int(size) if size else None

    def fits_tensor_parallel(self, tp: int) -> bool:
        """Whether the parallel layers can shard this model ``tp`` ways: query heads split evenly; KV heads
        split evenly, or (fewer KV heads than ranks) each is replicated on ``tp / kv_heads`` ranks; the MLP's
        intermediate size splits evenly. (The vocabulary is padded to a multiple of ``tp``.)"""
        kv = self.num_kv_heads
        return (tp >= 1 and self.num_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)
                and (self.intermediate_size is None or self.intermediate_size % tp == 0))

    def tensor_parallel_sizes(self) -> list[int]:
        """Every tensor-parallel size this model can be sharded to (all divide the attention heads)."""
        return [tp for tp in range(1, self.num_heads + 1) if self.fits_tensor_parallel(tp)]


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: ``block_size`` tokens per block; size from ``num_blocks`` if given, else from
    ``kv_cache_memory`` GiB. ``enable_prefix_caching`` turns on sha256-chained block reuse (a request's
    ``cache_salt`` separates tenants)."""

    block_size: int = 16
    kv_cache_memory: float = 1.0
    num_blocks: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check_finite(self)
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    """Token-budget scheduling: at most ``max_num_batched_tokens`` tokens and ``max_num_seqs`` requests per
    step. With ``enable_chunked_prefill`` a prompt larger than the remaining budget is split across steps.
    ``policy`` (vLLM's ``--scheduling-policy``): "fcfs" or "priority" (how request priorities are honoured:
    ``flotilla.scheduler.scheduler.Scheduler``)."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.policy!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len})")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor and pipeline parallel sizes (world size = tp * pp) and how the ranks are run.

    ``executor_backend``: "uni" (in-process, world size 1), "mp" (local worker processes), "ray" (one Ray
    actor per rank) or "external" (ranks started by torchrun/mpirun/srun); None picks "uni" or "mp".
    ``distributed_backend``: torch.distributed backend (None: nccl on CUDA, gloo on CPU).
    ``pipeline_partition``: layers per stage (None: an even split). ``collective_timeout_s`` bounds every
    collective so a dead or hung rank surfaces as an error.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    executor_backend: str | None = None
    distributed_backend: str | None = None
    pipeline_partition: tuple[int, ...] | None = None
    ray_address: str | None = None
    collective_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _check_finite(self)
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("parallel sizes must be >= 1")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.executor_backend not in (None, "uni", "mp", "ray", "external"):
            raise ValueError(f"executor backend must be uni, mp, ray or external, got {self.executor_backend!r}")
        if self.executor_backend == "uni" and self.world_size > 1:
            raise ValueError("the uni executor runs one rank; use mp, ray or external for world size > 1")
        if self.pipeline_partition is not None and (len(self.pipeline_partition) != self.pipeline_parallel_size):
            raise ValueError(f"pipeline_partition needs {self.pipeline_parallel_size} entries, "
                             f"got {list(self.pipeline_partition)}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def resolved_executor(self) -> str:
        return self.executor_backend or ("uni" if self.world_size == 1 else "mp")


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs: "cpu" or "cuda"; ``num_threads`` sets torch's intra-op threads on CPU."""

    device: str = "cpu"
    num_threads: int | None = None


@dataclass(frozen=True)
class OffloadConfig:
    """Weight offload (``flotilla.models.offload``); at most one of the two is set.

    ``cpu_offload_gb`` (vLLM's ``--cpu-offload-gb``, GiB): that much of the weights (whole decoder layers, the
    first ones) lives in (pinned) CPU memory and is copied to the device layer by layer ahead of use.
    ``max_resident_weights`` (GiB, CPU): at most this many bytes of weights are materialised at once; the decoder
    layers that do not fit stay memory-mapped in the model file and are read (dequantized) ahead of use.
    """

    cpu_offload_gb: float = 0.0
    max_resident_weights: float | None = None

    def __post_init__(self) -> None:
        _check_finite(self)
        if self.cpu_offload_gb < 0:
            raise ValueError(f"cpu_offload_gb must be >= 0, got {self.cpu_offload_gb}")
        if self.max_resident_weights is not None and self.max_resident_weights <= 0:
            raise ValueError(f"max_resident_weights must be > 0, got {self.max_resident_weights}")
        if self.cpu_offload_gb > 0 and self.max_resident_weights is not None:
            raise ValueError("cpu_offload_gb and max_resident_weights cannot be combined: use cpu_offload_gb "
                             "with an accelerator, max_resident_weights on the CPU")

    @property
    def enabled(self) -> bool:
        return self.cpu_offload_gb > 0 or self.max_resident_weights is not None


STRUCTURED_OUTPUTS_BACKENDS = ("auto", "xgrammar", "guidance")


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """vLLM's ``StructuredOutputsConfig``: ``backend`` is the grammar engine of structured output, "xgrammar",
    "guidance" (llguidance) or "auto" (xgrammar, and llguidance for a spec xgrammar rejects). A request's own
    ``structured_outputs.backend`` overrides it."""

    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(f"structured outputs backend must be one of {', '.join(STRUCTURED_OUTPUTS_BACKENDS)}, "
                             f"got {self.backend!r}")


SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``--speculative-config``: propose ``num_speculative_tokens`` (k) tokens per running request and step,
    verified by the target model in the same forward pass as the request's next token (speculative tokens are
    scheduled tokens). ``method`` None disables speculation.

    - "ngram" (prompt lookup, no draft model): the last n tokens (n from ``prompt_lookup_max`` down to
      ``prompt_lookup_min``) are searched for earlier in the request's prompt + output; the k tokens that
      followed the most recent match are proposed.
    - "draft_model": a smaller model with the same vocabulary (``draft_source``/``draft_source_kind``, the
      resolved ``model`` of the JSON; ``draft_model`` the name the user gave) proposes k tokens
      autoregressively, run by the same worker in its own KV cache over the target's block tables.
      ``draft_quantization`` (the JSON's "quantization", as vLLM's key for the draft's weights): "gguf", "int8",
      "int4" or "none" as ``--quantization`` chooses for a target; None follows the target's choice.
    Acceptance keeps the target's distribution exactly (``flotilla.spec_decode.rejection``).
    """

    method: str | None = None
    num_speculative_tokens: int = 0
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    draft_model: str | None = None
    draft_source: str | None = None
    draft_source_kind: str | None = None
    draft_quantization: str | None = None  # the JSON's "quantization": None follows the target's weights

    def __post_init__(self) -> None:
        if self.method is None:
            return
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be 1 to 16, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({self.prompt_lookup_min}) <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if (self.method == "draft_model") != (self.draft_source is not None):
            raise ValueError("a draft_model speculative config needs a draft model source, and only it has one")

    @property
    def enabled(self) -> bool:
        return self.method is not None

    @property
    def k(self) -> int:
        """Speculative tokens per step (0 when disabled)."""
        return self.num_speculative_tokens if self.enabled else 0


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs, validated together (the tensor-parallel size must fit the model:
    ``ModelConfig.fits_tensor_parallel``; InvalidRequestError naming the sizes that work otherwise)."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)

    def __post_init__(self) -> None:
        if self.scheduler.max_model_len != self.model.max_model_len:
            raise ValueError("scheduler.max_model_len must equal model.max_model_len")
        self._check_tensor_parallel()

    def _check_tensor_parallel(self) -> None:
        """InvalidRequestError naming the model's head counts and the sizes that work, before any rank starts
        (a size that does not fit would otherwise fail inside the workers' layers)."""
        tp, model = self.parallel.tensor_parallel_size, self.model
        if model.fits_tensor_parallel(tp):
            return
        mlp = f" and an MLP intermediate size of {model.intermediate_size}" if model.intermediate_size else ""
        sizes = ", ".join(str(t) for t in model.tensor_parallel_sizes())
        raise InvalidRequestError(
            f"tensor_parallel_size {tp} does not fit {model.name}: it has {model.num_heads} attention heads, "
            f"{model.num_kv_heads} KV heads{mlp}. The TP size must divide the attention heads, divide the KV "
            f"heads or be a multiple of them (KV heads are then replicated), and divide the MLP size. "
            f"Tensor-parallel sizes that work for this model: {sizes}.", "tensor_parallel_size")
