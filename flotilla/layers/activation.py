"""Activations."""

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
