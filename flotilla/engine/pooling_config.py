"""The ``EngineConfig`` of an embedding model (the "pooling" runner), from ``EngineArgs``.

An encoder runs in the serving process, one forward pass per batch, with no KV cache and no parallelism:
``tensor_parallel_size`` and ``pipeline_parallel_size`` above 1, ``quantization``, ``batch_invariant`` and a
``scheduling_policy`` other than "fcfs" are ``InvalidRequestError``s naming the field. The rest of the engine
arguments mean:

- ``max_model_len``: inputs are truncated to this many tokens, special tokens included (sentence-transformers'
  truncation). Default: the model's ``max_seq_length`` (``sentence_bert_config.json``), else the smaller of
  the tokenizer's ``model_max_length`` and ``max_position_embeddings``, as sentence-transformers does.
- ``max_num_seqs``: at most this many inputs per forward pass.
- ``max_num_batched_tokens``: at most this many padded tokens (inputs x the longest input) per forward pass
  (default ``DEFAULT_POOLING_BATCH_TOKENS``, at least ``max_model_len``); it bounds attention's memory.
- ``dtype="auto"``: float32, unless the checkpoint declares bfloat16 or float16 (then as for decoders:
  bfloat16 where the CPU multiplies it natively, else float32).
"""

from __future__ import annotations

import json
import os

import torch

from flotilla.config import DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from flotilla.errors import InvalidRequestError, ModelLoadError
from flotilla.models.loader import ResolvedModel
from flotilla.models.loader.sentence_transformers import PoolerConfig, load_pooler_config

DEFAULT_POOLING_BATCH_TOKENS = 8192


def pooling_engine_config(args, resolved: ResolvedModel, hf_config) -> EngineConfig:
    """The validated config of the embedding model ``args`` names (``resolved``, ``hf_config`` already read)."""
    if resolved.kind != "hf_dir":
        raise ModelLoadError(f"embedding models load from a Hugging Face directory (config.json + safetensors), "
                             f"not {resolved.kind}: {resolved.source}")
    _check_unsupported(args)
    pooler = load_pooler_config(resolved.source, hf_config)
    max_len = _max_model_len(args, resolved.source, hf_config, pooler)
    model = ModelConfig(model=resolved.alias or args.model or resolved.source, source=resolved.source,
                        source_kind=resolved.kind, hf_config=hf_config, dtype=_dtype(args, hf_config),
                        max_model_len=max_len, served_model_name=args.served_model_name, runner="pooling",
                        pooler=pooler)
    batched = args.max_num_batched_tokens or max(DEFAULT_POOLING_BATCH_TOKENS, max_len)
    if batched < max_len:
        raise InvalidRequestError(f"max_num_batched_tokens ({batched}) must be at least max_model_len ({max_len}) "
                                  f"for an embedding model, so that one input of full length fits a batch",
                                  "max_num_batched_tokens")
    scheduler = SchedulerConfig(max_num_batched_tokens=batched, max_num_seqs=args.max_num_seqs, max_model_len=max_len)
    return EngineConfig(model=model, scheduler=scheduler, device=DeviceConfig(args.device, args.num_threads))


def _check_unsupported(args) -> None:
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(args, name) != 1:
            raise InvalidRequestError(f"{name} {getattr(args, name)}: embedding models run on one rank", name)
    if args.quantization not in (None, "none"):
        raise InvalidRequestError("quantization is not supported for embedding models", "quantization")
    if args.batch_invariant:
        raise InvalidRequestError("--batch-invariant is not supported for embedding models", "batch_invariant")
    for name in ("cpu_offload_gb", "max_resident_weights"):
        if getattr(args, name) not in (None, 0, 0.0):
            raise InvalidRequestError(f"{name}: weight offload is not supported for embedding models", name)
    if args.scheduling_policy != "fcfs":
        raise InvalidRequestError(f"scheduling_policy {args.scheduling_policy!r}: embedding models batch their "
                                  f"inputs first come first served (request priorities are for generation)",
                                  "scheduling_policy")


def _max_model_len(args, directory: str, hf_config, pooler: PoolerConfig) -> int:
    positions = int(getattr(hf_config, "max_position_embeddings", 512))
    if args.max_model_len is not None:
        if args.max_model_len > positions:
            raise InvalidRequestError(f"max_model_len {args.max_model_len} exceeds the model's "
                                      f"max_position_embeddings: {positions}", "max_model_len")
        return args.max_model_len
    if pooler.max_seq_length is not None:
        return min(pooler.max_seq_length, positions)
    return min(_tokenizer_max_length(directory) or positions, positions)


def _tokenizer_max_length(directory: str) -> int | None:
    """``model_max_length`` of ``tokenizer_config.json``, when it is a sane positive integer."""
    try:
        with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
            value = json.load(f).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**6 else None


def _dtype(args, hf_config) -> str:
    from flotilla.engine.arg_utils import cpu_auto_dtype
    if args.dtype != "auto":
        if args.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"dtype must be auto, float32, bfloat16 or float16, got {args.dtype!r}", "dtype")
        return args.dtype
    declared = getattr(hf_config, "dtype", None)
    if isinstance(declared, torch.dtype):
        declared = str(declared).removeprefix("torch.")
    if declared in ("bfloat16", "float16"):
        return cpu_auto_dtype(declared) if args.device == "cpu" else declared
    return "float32"
