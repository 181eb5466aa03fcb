"""A decoder's shape for planning, read from its config only: no weights are opened.

``load_model_desc(model)`` accepts what ``flotilla serve`` accepts (an alias, a Hugging Face directory, a
.gguf file: its header only) plus what only planning needs: a bare ``config.json`` (or a directory holding
just one) and the public configs shipped in ``flotilla/planner/configs`` (``llama-3.1-8b``,
``llama-3.1-70b``, ``qwen3-32b``; ``shipped_configs()`` lists them with their sources), so a 70B model is
planned without its 140 GB of weights. The config goes through the same reader as the engine's
(``flotilla.models.loader.hf_config``: AutoConfig without remote code, or GGUF metadata).

``ModelDesc`` holds the dimensions and counts parameters and KV bytes per rank of a tensor x pipeline
plan, with flotilla's sharding rules: query heads and the MLP split ``tp`` ways; KV heads split, or are
replicated (one per rank) when there are fewer than ``tp``; the vocabulary splits ``tp`` ways (padded);
stage 0 holds the embedding, the last stage the final norm and the LM head (its own copy of a tied table
when ``pp > 1``); layers split as ``flotilla.distributed.utils.pp_partition`` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from flotilla.config import ModelConfig
from flotilla.distributed.utils import pp_partition
from flotilla.errors import ModelLoadError, ModelNotFoundError

CONFIGS_DIR = os.path.join(os.path.dirname(__file__), "configs")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class ModelDesc:
    """The shape of a Llama-family decoder (Llama, Mistral, Qwen2/3, SmolLM2: RMSNorm, rotary attention with
    GQA, a SwiGLU MLP). ``name`` is what the user gave; ``model`` what a deployment file should load (the
    alias or path, or for a shipped config its Hugging Face repository id); ``declared_dtype`` the config's
    ``torch_dtype`` (None for GGUF); ``source_kind`` "hf_dir", "gguf" or "config" (a config without
    weights)."""

    name: str
    model: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    declared_dtype: str | None
    source_kind: str
    hf_config: Any = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ divisibility
    def tp_problem(self, tp: int) -> str | None:
        """Why flotilla's parallel layers cannot shard this model ``tp`` ways (None when they can): the same
        rule as ``ModelConfig.fits_tensor_parallel``."""
        if self._model_config().fits_tensor_parallel(tp):
            return None
        sizes = ",".join(str(t) for t in self._model_config().tensor_parallel_sizes())
        return (f"TP {tp} does not divide {self.num_heads} heads / {self.num_kv_heads} KV heads / "
                f"MLP {self.intermediate_size} (TP sizes that fit: {sizes})")

    def pp_problem(self, pp: int) -> str | None:
        """Why ``pp`` pipeline stages cannot split the layers (None when they can)."""
        try:
            pp_partition(self.num_layers, pp)
        except ValueError as e:
            return str(e)
        return None

    def stage_layers(self, pp: int) -> list[int]:
        """Decoder layers per pipeline stage (flotilla's even split, earlier stages take the remainder)."""
        return pp_partition(self.num_layers, pp)

    def _model_config(self) -> ModelConfig:
        return ModelConfig(model=self.name, source=self.model, source_kind="hf_dir", hf_config=self.hf_config)

    # ------------------------------------------------------------------ per-rank counts
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    def kv_heads_per_rank(self, tp: int) -> int:
        return max(1, self.num_kv_heads // tp)

    def padded_vocab(self, tp: int) -> int:
        return -(-self.vocab_size // tp) * tp

    def layer_linear_params(self, tp: int) -> int:
        """Weights of one decoder layer's matmuls on one TP rank: q, k, v, o and gate, up, down."""
        h, kv = self.hidden_size, self.kv_heads_per_rank(tp) * self.head_dim
        return h * (self.q_size // tp) + 2 * h * kv + (self.q_size // tp) * h + 3 * h * (self.intermediate_size // tp)

    def layer_other_params(self, tp: int) -> int:
        """The rest of a layer on one rank: two RMSNorm weights (and q/k/v biases)."""
        bias = (self.q_size // tp + 2 * self.kv_heads_per_rank(tp) * self.head_dim) if self.qkv_bias else 0
        return 2 * self.hidden_size + bias

    def lm_head_params(self, tp: int) -> int:
        return self.padded_vocab(tp) // tp * self.hidden_size

    def kv_bytes_per_token(self, tp: int, layers: int, elem: int) -> int:
        """KV cache bytes one token takes on one rank holding ``layers`` layers."""
        return 2 * layers * self.kv_heads_per_rank(tp) * self.head_dim * elem

    def weight_bytes(self, tp: int, pp: int, stage: int, dtype: str, quantization: str | None = None) -> int:
        """Bytes of the weights one rank of pipeline ``stage`` holds. With int8, matmul weights (the LM head
        included) take one byte plus a per-row scale; the embedding table stays in ``dtype`` (and a tied
        table is kept next to the LM head's int8 copy)."""
        elem = DTYPE_BYTES[dtype]
        layers = self.stage_layers(pp)[stage]
        lin = self.layer_linear_params(tp)
        if quantization == "int8":
            rows = self.q_size // tp + 2 * self.kv_heads_per_rank(tp) * self.head_dim + self.hidden_size \
                + 2 * (self.intermediate_size // tp) + self.hidden_size
            lin_bytes = lin + rows * elem
        else:
            lin_bytes = lin * elem
        total = layers * (lin_bytes + self.layer_other_params(tp) * elem)
        table = self.lm_head_params(tp) * elem
        if stage == 0:
            total += table
        if stage == pp - 1:
            total += self.hidden_size * elem  # final norm
            head_elem = 1 if quantization == "int8" else elem
            shares_table = self.tie_word_embeddings and pp == 1 and quantization != "int8"
            if not shares_table:
                total += self.lm_head_params(tp) * head_elem
        return total

    @property
    def num_params(self) -> int:
        """Distinct parameters (a tied table counted once)."""
        table = self.vocab_size * self.hidden_size
        per_layer = self.layer_linear_params(1) + self.layer_other_params(1)
        return table * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + self.hidden_size

    def runtime_dtype(self, device_kind: str, bf16_native: bool, requested: str = "auto") -> str:
        """The dtype the engine runs in: ``requested`` unless "auto". Auto is the engine's rule: on a CPU a
        float32 checkpoint stays float32 and any other runs in bfloat16 where the CPU multiplies it natively
        (``bf16_native``), else float32; on a GPU the declared dtype, or bfloat16."""
        if requested != "auto":
            return requested
        if device_kind == "cpu":
            return "bfloat16" if self.declared_dtype != "float32" and bf16_native else "float32"
        return self.declared_dtype if self.declared_dtype in ("bfloat16", "float16", "float32") else "bfloat16"


# ---------------------------------------------------------------------------------------------- loading

@lru_cache(maxsize=1)
def shipped_configs() -> dict[str, dict]:
    """The public configs shipped with the planner: name -> {"hf_repo", "source", "dir"}."""
    with open(os.path.join(CONFIGS_DIR, "sources.json"), encoding="utf-8") as f:
        table = json.load(f)
    return {name: {**entry, "dir": os.path.join(CONFIGS_DIR, name)} for name, entry in table.items()}


def load_model_desc(model: str | None) -> ModelDesc:
    """The ``ModelDesc`` of ``model``: a shipped config name (or its Hugging Face repo id), an alias, a
    model directory, a .gguf file, a ``config.json`` or a directory holding one (None: the default alias).
    Raises ModelNotFoundError / ModelLoadError with the engine's messages."""
    from flotilla.models.loader import ResolvedModel, load_hf_config, resolve_model
    from flotilla.models.loader.resolve import get_alias

    shipped = _shipped(model) if model else None
    if shipped is not None:
        name, entry = shipped
        return desc_from_hf_config(load_hf_config(ResolvedModel(entry["dir"], "hf_dir")), name, entry["hf_repo"],
                                   "config")
    path = os.path.abspath(os.path.expanduser(model)) if model else ""
    if model and get_alias(model) is None:
        config_dir = _bare_config_dir(path)
        if config_dir is not None:
            kind = "hf_dir" if any(n.endswith(".safetensors") for n in os.listdir(config_dir)) else "config"
            return desc_from_hf_config(load_hf_config(ResolvedModel(config_dir, "hf_dir")), model,
                                       config_dir, kind)
    resolved = resolve_model(model)
    name = resolved.alias or model or resolved.source
    return desc_from_hf_config(load_hf_config(resolved), name, resolved.alias or model or resolved.source,
                               resolved.kind)


def _shipped(model: str) -> tuple[str, dict] | None:
    key = model.strip().lower()
    for name, entry in shipped_configs().items():
        if key in (name, entry["hf_repo"].lower()):
            return name, entry
    return None


def _bare_config_dir(path: str) -> str | None:
    """The directory of a config.json given as a file, or a directory with a config.json (weights or not)."""
    if os.path.isfile(path) and os.path.basename(path) == "config.json":
        return os.path.dirname(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(path) and path.endswith(".json"):
        raise ModelNotFoundError(f"{path}: a model config must be named config.json (as in a Hugging Face "
                                 f"repository); rename it or pass its directory")
    return None


def desc_from_hf_config(cfg: Any, name: str, model: str, source_kind: str) -> ModelDesc:
    """A ``ModelDesc`` from a transformers config. ModelLoadError for a config without the decoder fields
    (an encoder, a mixture-of-experts model: the planner models dense decoders)."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if getattr(cfg, key, None) is None:
            raise ModelLoadError(f"{name}: the config has no {key}; the planner models dense decoder LLMs")
    if getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None):
        raise ModelLoadError(f"{name}: mixture-of-experts models are not modelled by the planner yet")
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
    declared = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    declared = str(declared).removeprefix("torch.") if declared is not None else None
    archs = getattr(cfg, "architectures", None) or [""]
    model_type = str(getattr(cfg, "model_type", "")).lower()
    return ModelDesc(
        name=name, model=model, architecture=archs[0], hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size), num_layers=int(cfg.num_hidden_layers), num_heads=heads,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=int(head_dim),
        vocab_size=int(cfg.vocab_size), tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(cfg, "attention_bias", False)) or model_type == "qwen2",
        max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 2048) or 2048),
        declared_dtype=declared if source_kind != "gguf" else None, source_kind=source_kind, hf_config=cfg)
