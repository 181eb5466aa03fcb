"""Finding models and reading their config and weights (safetensors directories and GGUF files).

    resolved = resolve_model("smollm2-135m-instruct")        # or None, a directory, a .gguf path
    hf_config = load_hf_config(resolved)                     # transformers PretrainedConfig
    for name, tensor in iterate_weights(resolved, hf_config, torch.float32):
        ...                                                  # HF parameter names, one tensor at a time

Pickled checkpoints (.bin/.pt/.pth/.ckpt) are refused and repository code is never run.

Modules: ``resolve`` (aliases, paths, pickle refusal), ``assemble`` (an alias shipped in several packages,
assembled once into the cache), ``hf_config`` (AutoConfig / GGUF metadata -> config), ``safetensors_loader``
and ``gguf_loader`` (tensor iteration per format), ``gguf_file`` (opening and validating GGUF files, reading
their headers), ``gguf_dequant`` (dequantizing GGUF blocks in torch),
``checkpoint`` (the format-independent entry points and completeness check).
"""

from flotilla.models.loader.checkpoint import (
    expected_weight_names,
    iterate_weights,
    iterate_weights_filtered,
)
from flotilla.models.loader.gguf_loader import gguf_to_hf_name
from flotilla.models.loader.hf_config import get_rope_theta, load_hf_config
from flotilla.models.loader.resolve import (
    DEFAULT_ALIAS,
    AliasInfo,
    ModelAlias,
    PackagedFile,
    ResolvedModel,
    get_alias,
    list_aliases,
    resolve_model,
)

__all__ = [
    "DEFAULT_ALIAS",
    "AliasInfo",
    "ModelAlias",
    "PackagedFile",
    "ResolvedModel",
    "expected_weight_names",
    "get_alias",
    "get_rope_theta",
    "gguf_to_hf_name",
    "iterate_weights",
    "iterate_weights_filtered",
    "list_aliases",
    "load_hf_config",
    "resolve_model",
]
