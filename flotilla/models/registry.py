"""Maps Hugging Face architecture names to flotilla model classes, and each to its runner.

Decoders (``*ForCausalLM``) run on the ``generate`` runner (the engine, the paged KV cache); encoders run on
the ``pooling`` runner (embeddings: one forward pass per batch, no cache). ``runner_for`` tells which an
architecture list belongs to, as vLLM detects a pooling model from its architecture.
"""

from __future__ import annotations

from flotilla.errors import ModelLoadError
from flotilla.models.bert import BertModel
from flotilla.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}

_POOLING_REGISTRY = {
    "BertModel": BertModel,
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def supported_pooling_architectures() -> list[str]:
    return sorted(_POOLING_REGISTRY)


def runner_for(architectures: list[str] | None) -> str | None:
    """``"generate"`` or ``"pooling"`` for the first supported architecture, or None if none is."""
    for arch in architectures or []:
        if arch in _REGISTRY:
            return "generate"
        if arch in _POOLING_REGISTRY:
            return "pooling"
    return None


def get_model_class(architectures: list[str] | None):
    """The class for the first supported architecture, or ModelLoadError listing what is supported."""
    for arch in architectures or []:
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise ModelLoadError(f"unsupported model architecture {architectures!r}; flotilla supports "
                         f"{', '.join(supported_architectures())}")


def get_pooling_model_class(architectures: list[str] | None):
    """The encoder class for the first supported pooling architecture, or ModelLoadError."""
    for arch in architectures or []:
        if arch in _POOLING_REGISTRY:
            return _POOLING_REGISTRY[arch]
    raise ModelLoadError(f"unsupported embedding model architecture {architectures!r}; flotilla runs "
                         f"{', '.join(supported_pooling_architectures())} for embeddings")
