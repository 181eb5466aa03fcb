"""Maps Hugging Face architecture names to flotilla model classes."""

from __future__ import annotations

from flotilla.errors import ModelLoadError
from flotilla.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(architectures: list[str] | None):
    """The class for the first supported architecture, or ModelLoadError listing what is supported."""
    for arch in architectures or []:
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise ModelLoadError(f"unsupported model architecture {architectures!r}; flotilla supports "
                         f"{', '.join(supported_architectures())}")
