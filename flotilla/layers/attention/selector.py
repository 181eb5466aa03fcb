"""Which attention backend a worker runs (vLLM's ``VLLM_ATTENTION_BACKEND``: ``FLOTILLA_ATTENTION_BACKEND``).

``auto`` (the default): the Triton backend (blocks read in place, CUDA graphs for decode) on CUDA when Triton
is installed, else the PyTorch backend (the CPU's, with its fused C++ kernels). ``torch`` or ``triton`` force
one; ``triton`` off CUDA runs only in Triton's interpreter (``TRITON_INTERPRET=1``: the CPU tests).
Batch-invariant mode always runs the PyTorch backend's token-by-token attention.
"""

from __future__ import annotations

import importlib.util

from flotilla import envs
from flotilla.layers.attention.backend import AttentionBackend
from flotilla.layers.attention.torch_paged import TorchPagedAttentionBackend

ENV = "FLOTILLA_ATTENTION_BACKEND"
CHOICES = ("auto", "torch", "triton")


def backend_name(device_type: str, batch_invariant: bool) -> str:
    """"torch" or "triton" for a worker on ``device_type``; ValueError for an unknown name or a forced Triton
    backend that cannot run (no Triton, batch-invariant mode, or neither CUDA nor the interpreter)."""
    name = envs.attention_backend()
    if name not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {name!r}")
    have_triton = importlib.util.find_spec("triton") is not None
    if name == "auto":
        return "triton" if device_type == "cuda" and have_triton and not batch_invariant else "torch"
    if name == "triton":
        if batch_invariant:
            raise ValueError(f"{ENV}=triton cannot run batch-invariant mode (it attends token by token in torch)")
        if not have_triton:
            raise ValueError(f"{ENV}=triton needs the triton package")
        if device_type != "cuda" and not envs.triton_interpreted():
            raise ValueError(f"{ENV}=triton runs on CUDA (or in Triton's interpreter, TRITON_INTERPRET=1), "
                             f"not on {device_type}")
    return name


def attention_backend(device_type: str, batch_invariant: bool) -> AttentionBackend:
    """The backend ``backend_name`` chooses."""
    if backend_name(device_type, batch_invariant) == "torch":
        return TorchPagedAttentionBackend(batch_invariant=batch_invariant)
    from flotilla.layers.attention.triton_paged import TritonPagedAttentionBackend
    return TritonPagedAttentionBackend()
