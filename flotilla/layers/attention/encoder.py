"""Bidirectional (encoder) attention over a batch of packed sequences, without a KV cache.

Encoders see every token of their own sequence and none of the others'. Tokens arrive packed, sequence by
sequence (``T`` = the sum of the lengths, no padding), which is what the linear layers and the pooler want;
attention alone pads them into ``(B, L)`` with ``L`` the longest sequence, masks the padded keys and packs
the result back. ``PackedSequences`` describes one batch and is built once per forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PackedSequences:
    """The layout of a packed batch: ``seq_lens`` (B,) int64, ``starts`` (B,) the offset of each sequence
    in the packed tokens, ``positions`` (T,) each token's index within its sequence, ``seq_of_token`` (T,),
    ``gather_index`` (B * L,) the packed token that fills each slot of the padded layout (padding slots
    repeat their sequence's first token: finite values that the mask hides) and ``key_mask`` (B, 1, 1, L)
    True for real keys. ``uniform``: every sequence has length L, so packed and padded are the same memory."""

    seq_lens: torch.Tensor
    starts: torch.Tensor
    positions: torch.Tensor
    seq_of_token: torch.Tensor
    gather_index: torch.Tensor
    key_mask: torch.Tensor
    max_len: int
    uniform: bool

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str = "cpu") -> "PackedSequences":
        """The layout of sequences of ``lengths`` (each >= 1) packed in this order."""
        if not lengths or min(lengths) < 1:
            raise ValueError(f"every sequence needs at least one token, got lengths {lengths}")
        seq_lens = torch.tensor(lengths, dtype=torch.int64, device=device)  # (B,)
        starts = torch.cumsum(seq_lens, 0) - seq_lens  # (B,)
        max_len = max(lengths)
        seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device), seq_lens)  # (T,)
        positions = torch.arange(int(seq_lens.sum()), device=device) - starts[seq_of_token]  # (T,)
        slots = torch.arange(max_len, device=device)[None, :]  # (1, L)
        key_mask = slots < seq_lens[:, None]  # (B, L)
        gather_index = torch.where(key_mask, starts[:, None] + slots, starts[:, None]).reshape(-1)  # (B * L,)
        return cls(seq_lens, starts, positions, seq_of_token, gather_index, key_mask[:, None, None, :], max_len,
                   uniform=min(lengths) == max_len)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


class EncoderAttention(nn.Module):
    """Multi-head attention of every token over the tokens of its own sequence (no causal mask).

    forward(qkv (T, 3 * h * d) = [q | k | v], layout) -> (T, h * d). Padded query rows are computed and
    dropped; padded keys are masked out.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale

    def forward(self, qkv: torch.Tensor, layout: PackedSequences) -> torch.Tensor:
        h, d = self.num_heads, self.head_dim
        b, length = layout.num_seqs, layout.max_len
        padded = qkv if layout.uniform else qkv.index_select(0, layout.gather_index)  # (B * L, 3 * h * d)
        q, k, v = padded.view(b, length, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, L, d) each
        mask = None if layout.uniform else layout.key_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, h, L, d)
        out = out.transpose(1, 2)  # (B, L, h, d)
        if layout.uniform:
            return out.reshape(b * length, h * d)  # (T, h * d)
        return out[layout.seq_of_token, layout.positions].reshape(-1, h * d)  # (T, h * d)
