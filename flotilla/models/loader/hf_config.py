"""The transformers ``PretrainedConfig`` of a resolved model.

For a Hugging Face directory it is read by ``AutoConfig`` with ``trust_remote_code=False`` (custom code is
never run). For a GGUF file it is built from the file's metadata, matching what transformers' own GGUF
loader derives, plus ``architectures`` so the model registry can pick the family.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from flotilla.errors import ModelLoadError
from flotilla.models.loader.gguf_file import GGUFFile, field_length, field_value, gguf_architecture, open_gguf
from flotilla.models.loader.resolve import ResolvedModel

logger = logging.getLogger(__name__)

_DEFAULT_ROPE_THETA = 10000.0

# GGUF architecture -> (transformers config class name, HF architecture name)
_GGUF_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def load_hf_config(resolved: ResolvedModel) -> Any:
    """The ``transformers.PretrainedConfig`` of ``resolved``; raises ModelLoadError if it cannot be made.

    The rope base is readable both as ``config.rope_theta`` (transformers 4 style) and as
    ``config.rope_parameters["rope_theta"]`` (transformers 5 style); see also ``get_rope_theta``.
    """
    if resolved.kind == "hf_dir":
        config = _load_dir_config(resolved.source)
    elif resolved.kind == "gguf":
        config = gguf_to_hf_config(open_gguf(resolved.source), resolved.source)
    else:
        raise ModelLoadError(f"unknown model source kind {resolved.kind!r}")
    _normalize_rope(config)
    return config


def get_rope_theta(config: Any) -> float:
    """The rope base of a transformers config in either the v4 (``rope_theta``) or v5 (``rope_parameters``)
    style; 10000.0 when neither is set."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else _DEFAULT_ROPE_THETA


def _normalize_rope(config: Any) -> None:
    theta = get_rope_theta(config)
    if getattr(config, "rope_theta", None) is None:
        config.rope_theta = theta
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        scaling = getattr(config, "rope_scaling", None)
        params = dict(scaling) if isinstance(scaling, dict) else {"rope_type": "default"}
        params.setdefault("rope_type", params.get("type", "default"))
        params["rope_theta"] = theta
        config.rope_parameters = params


# --- Hugging Face directories -------------------------------------------------------------------------

def _load_dir_config(directory: str) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = os.path.join(directory, "config.json")
    raw = _read_config_json(path)
    model_type = raw.get("model_type")
    if not model_type:
        raise ModelLoadError(f"{path} has no 'model_type'; cannot tell which model family it is")
    known = model_type in CONFIG_MAPPING
    if raw.get("auto_map") and not known:
        raise ModelLoadError(
            f"{path} declares custom code (auto_map) for model_type {model_type!r}, which transformers does "
            f"not implement. flotilla never runs repository code (trust_remote_code is always off); use a "
            f"model whose architecture transformers supports natively.")
    if not known:
        raise ModelLoadError(f"{path} has model_type {model_type!r}, which this transformers version does "
                             f"not recognize; flotilla cannot build its config")
    if raw.get("auto_map"):
        logger.warning("%s lists custom code in auto_map; ignoring it and using the built-in %r "
                       "implementation (trust_remote_code is always off)", path, model_type)
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (ValueError, OSError, TypeError, KeyError) as e:
        raise ModelLoadError(f"cannot load {path}: {e}") from None


def _read_config_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"model directory {os.path.dirname(path)} has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(raw).__name__}")
    return raw


# --- GGUF metadata ------------------------------------------------------------------------------------

def gguf_to_hf_config(reader: GGUFFile, path: str) -> Any:
    """Build the transformers config of a GGUF file from its metadata (see module docstring)."""
    import transformers

    arch = gguf_architecture(reader, path)
    cls_name, hf_arch = _GGUF_FAMILIES[arch]
    kwargs = _gguf_config_kwargs(reader, path, arch)
    config = getattr(transformers, cls_name)(**kwargs)
    config.architectures = [hf_arch]
    config.rope_theta = kwargs["rope_theta"]
    unk = field_value(reader, "tokenizer.ggml.unknown_token_id")
    if unk is not None:
        config.unk_token_id = int(unk)
    return config


def _gguf_config_kwargs(reader: GGUFFile, path: str, arch: str) -> dict[str, Any]:
    def meta(key: str, default: Any = None, required: bool = False) -> Any:
        value = field_value(reader, f"{arch}.{key}", default)
        if value is None and required:
            raise ModelLoadError(f"GGUF file {path} lacks required metadata {arch}.{key}")
        return value

    hidden = int(meta("embedding_length", required=True))
    heads = int(meta("attention.head_count", required=True))
    kwargs: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length", required=True)),
        "num_hidden_layers": int(meta("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta("rope.freq_base", _DEFAULT_ROPE_THETA)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "vocab_size": _gguf_vocab_size(reader, path, arch),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": _int_or_none(field_value(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": _int_or_none(field_value(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": _int_or_none(field_value(reader, "tokenizer.ggml.padding_token_id")),
        "name_or_path": path,
    }
    head_dim = meta("attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = meta("rope.dimension_count")  # llama/mistral: the rope dimension is the head dim
    if head_dim is not None:
        kwargs["head_dim"] = int(head_dim)
    if arch == "llama":
        kwargs["attention_bias"] = any(t.name == "blk.0.attn_q.bias" for t in reader.tensors)
    if meta("rope.scaling.type") not in (None, "none"):
        logger.warning("GGUF file %s declares rope scaling %r, which is not carried into the config",
                       path, meta("rope.scaling.type"))
    return kwargs


def _gguf_vocab_size(reader: GGUFFile, path: str, arch: str) -> int:
    vocab = field_value(reader, f"{arch}.vocab_size")
    if vocab is not None:
        return int(vocab)
    n_tokens = field_length(reader, "tokenizer.ggml.tokens")
    if n_tokens:
        return n_tokens
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            return int(t.shape[-1])  # GGUF shape is (hidden, vocab)
    raise ModelLoadError(f"GGUF file {path} has no vocab size: no {arch}.vocab_size, tokens or token_embd")


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)
