"""Activations."""

import torch
import torch.nn.functional as F
from torch import nn

from flotilla.ops import use_kernels


class SiluAndMul(nn.Module):
    """SwiGLU gate: input (num_tokens, 2 * d) = [gate | up] -> silu(gate) * up, shape (num_tokens, d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        ops = use_kernels(x) if x.dim() == 2 and x.stride(-1) == 1 else None
        if ops is not None:
            out = torch.empty(x.shape[0], d, dtype=x.dtype)
            ops.silu_and_mul(out, x)
            return out
        return F.silu(x[..., :d]) * x[..., d:]
