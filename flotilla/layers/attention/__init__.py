from flotilla.layers.attention.backend import (AttentionBackend, AttentionContext,  # noqa: F401
                                               CommonAttentionMetadata)
from flotilla.layers.attention.encoder import EncoderAttention, PackedSequences  # noqa: F401
from flotilla.layers.attention.layer import Attention  # noqa: F401
from flotilla.layers.attention.torch_paged import TorchPagedAttentionBackend  # noqa: F401

__all__ = ["Attention", "AttentionBackend", "AttentionContext", "CommonAttentionMetadata", "EncoderAttention",
           "PackedSequences", "TorchPagedAttentionBackend"]
