"""RMSNorm (optionally fused with the residual add) and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flotilla.layers.batch_invariant import per_row
from flotilla.ops import use_kernels


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 (as Hugging Face does).

    ``forward(x, residual)`` first adds the residual and returns ``(normed, x + residual)`` so decoder
    layers carry the residual stream without extra copies. On the CPU with the fused kernels (flotilla/ops.py)
    this is one kernel that works in place: ``x`` and ``residual`` are overwritten (the returned tensors are
    them), so callers must not reuse either afterwards. The kernels normalize row by row; in batch-invariant
    mode (``batch_invariant``, set by ``make_batch_invariant_``) the eager path does too.
    """

    batch_invariant = False

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        ops = use_kernels(x) if x.dim() == 2 and x.dtype == self.weight.dtype else None
        if ops is not None:
            if residual is None and x.stride(1) == 1:
                out = torch.empty(x.shape, dtype=x.dtype)
                ops.rms_norm(out, x, self.weight, self.eps)
                return out
            if residual is not None and x.is_contiguous() and residual.is_contiguous() and residual.dtype == x.dtype:
                ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
                return x, residual
        norm = (lambda t: per_row(self._norm, t)) if self.batch_invariant and x.dim() == 2 else self._norm
        if residual is None:
            return norm(x)
        x = x + residual
        return norm(x), x


class LayerNorm(nn.Module):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * w + b over the last dimension (BERT-family encoders).

    Computed in the input's dtype, as Hugging Face's ``nn.LayerNorm`` does; x (..., hidden) -> (..., hidden).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-12, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
