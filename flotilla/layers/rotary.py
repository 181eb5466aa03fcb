"""Rotary position embeddings (neox/HF "rotate_half" layout), with Llama 3 frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from flotilla.ops import use_kernels


def rope_parameters(hf_config) -> dict:
    """The rope settings of a transformers config, whether it uses v4 ``rope_scaling``/``rope_theta`` or
    v5 ``rope_parameters``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling:
        params.update(scaling)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default") or "default")
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k at given positions. Supports rope_type "default" and "llama3".

    The cos/sin table (max_positions, head_dim) is precomputed in float32 exactly as transformers computes
    it, so results match the oracle bit for bit at fp32.
    """

    def __init__(self, head_dim: int, max_positions: int, params: dict):
        super().__init__()
        rope_type = params.get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, llama3)")
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, params)
        positions = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]  # (max_positions, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_positions, head_dim)
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions (num_tokens,); q (num_tokens, heads, head_dim); k (num_tokens, kv_heads, head_dim).

        With the CPU kernels, q and k are rotated in place (and returned)."""
        ops = use_kernels(q, k)
        if ops is not None and q.stride(1) == q.shape[2] and k.stride(1) == k.shape[2] and q.stride(2) == 1 \
                and k.stride(2) == 1 and positions.dtype == torch.long:
            ops.rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache)
            return q, k
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)  # (num_tokens, 1, head_dim)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        q = q * cos + self._rotate_half(q) * sin
        k = k * cos + self._rotate_half(k) * sin
        return q, k
