"""Activations: the SwiGLU gate of the decoders and the GELU family of the encoders."""

import torch
import torch.nn.functional as F
from torch import nn

from flotilla.layers.batch_invariant import per_row
from flotilla.ops import use_kernels


class SiluAndMul(nn.Module):
    """SwiGLU gate: input (num_tokens, 2 * d) = [gate | up] -> silu(gate) * up, shape (num_tokens, d).

    Eager ``F.silu`` takes its vectorized or scalar exp by an element's place in the thread's chunk, so in
    batch-invariant mode (``batch_invariant``) the eager path runs row by row; the fused kernel's exp is the same
    arithmetic in every lane."""

    batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        ops = use_kernels(x) if x.dim() == 2 and x.stride(-1) == 1 else None
        if ops is not None:
            out = torch.empty(x.shape[0], d, dtype=x.dtype)
            ops.silu_and_mul(out, x)
            return out
        if self.batch_invariant and x.dim() == 2:
            return per_row(lambda row: F.silu(row[..., :d]) * row[..., d:], x)
        return F.silu(x[..., :d]) * x[..., d:]


class GELU(nn.Module):
    """GELU, exact (``approximate="none"``, BERT's ``gelu``) or its tanh approximation (``gelu_new``)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)  # same shape as x


# Hugging Face ``hidden_act`` names of the encoder MLPs flotilla runs -> their module.
_ACTIVATIONS = {
    "gelu": lambda: GELU("none"),
    "gelu_new": lambda: GELU("tanh"),
    "gelu_pytorch_tanh": lambda: GELU("tanh"),
    "relu": nn.ReLU,
}


def get_act_fn(name: str) -> nn.Module:
    """The activation module of a Hugging Face ``hidden_act`` name; ValueError naming the supported ones."""
    make = _ACTIVATIONS.get(name) if isinstance(name, str) else None
    if make is None:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(_ACTIVATIONS))}")
    return make()
