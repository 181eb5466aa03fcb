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
    in the packed tokens, ``positions`` (T,) each token's index within its sequence, ``token_index`` (T,)
    each token's slot in the padded ``(B * L)`` layout and ``key_mask`` (B, 1, 1, L) True for real keys."""

    seq_lens: torch.Tensor
    starts: torch.Tensor
    positions: torch.Tensor
    token_index: torch.Tensor
    key_mask: torch.Tensor
    max_len: int

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
        token_index = seq_of_token * max_len + positions  # (T,)
        key_mask = torch.arange(max_len, device=device)[None, :] < seq_lens[:, None]  # (B, L)
        return cls(seq_lens, starts, positions, token_index, key_mask[:, None, None, :], max_len)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


class EncoderAttention(nn.Module):
    """Multi-head attention of every token over the tokens of its own sequence (no causal mask).

    forward(q, k, v (T, h * d), layout) -> (T, h * d). Padded query rows are computed and dropped; every
    row has at least one real key, so none is NaN.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedSequences) -> torch.Tensor:
        h, d = self.num_heads, self.head_dim
        b, length = layout.num_seqs, layout.max_len
        qp, kp, vp = (self._pad(x, layout).view(b, length, h, d).transpose(1, 2) for x in (q, k, v))  # (B, h, L, d)
        mask = layout.key_mask if b > 1 else None  # one sequence: nothing is padded
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=self.scale)  # (B, h, L, d)
        out = out.transpose(1, 2).reshape(b * length, h * d)  # (B * L, h * d)
        return out.index_select(0, layout.token_index)  # (T, h * d)

    @staticmethod
    def _pad(x: torch.Tensor, layout: PackedSequences) -> torch.Tensor:
        if layout.num_seqs == 1:
            return x  # (T, h * d) is already (1 * L, h * d)
        padded = x.new_zeros(layout.num_seqs * layout.max_len, x.shape[-1])  # (B * L, h * d)
        return padded.index_copy_(0, layout.token_index, x)
